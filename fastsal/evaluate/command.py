"""``fastsal eval``: the sanity checks, localization and faithfulness metrics of
:mod:`fastsal.evaluate` run on a model and a data set, written to a folder.

What it writes in ``--out``:

* ``results.json``: the protocol (seed, convention, n, tolerance, σ, steps, the model and the
  data), every check's summary and the tidy rows;
* ``results.csv``: one row per check × method × step × metric, columns :data:`CSV_COLUMNS`;
* ``summary.md``: the tables printed at the end;
* ``mprt_grid.png`` (the cascading randomization of one image: rows are methods, columns
  randomization steps), ``mprt_curves.png`` (similarity vs layer, one panel per metric) and
  ``deletion_insertion.png`` (the mean curves), each when its check ran.

The checks (``--checks``, comma-separated):

============== ===================================================================================
``mprt``       cascading model-parameter randomization (rows: check ``mprt-cascading``)
``mprt-        the independent variant (check ``mprt-independent``); not in the default set
independent``
``random-logit`` the map of the true class vs the map of a random other class
``pointing``   the pointing game (TorchRay protocol) with the centre baseline (method ``centre``):
               metrics ``accuracy``/``accuracy_exact`` (averaged over classes: std and n are
               over the classes) and ``*_overall`` (over images); plus the attribution mass in
               the box (check ``mass-in-box``) and the IoU of ``fastsal run``'s weak box
               (check ``box-iou``); needs boxes
``deletion``,  RISE curves (metric ``auc``, step ``all``; the mean curve as metric ``probability``
``insertion``  with the fraction of pixels changed as the step)
============== ===================================================================================

Data: no ``--data`` means the embedded model's synthetic *test* split (samples ``0..n-1``,
rendered in memory, offline). ``--data`` is a CSV with a header ``path,label,x0,y0,x1,y1`` (any
other columns, such as ``write_dataset``'s ``class_name``, are ignored; boxes in the pixels of
the original image, half-open), or anything ``fastsal run`` reads (a folder, an ImageFolder
tree, a ``path[,label]`` list), which has no boxes. The first ``n`` images are used. Without
labels the predicted classes stand in for them (``results.json`` says which).
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

# _layers and _reset: the grid picture re-traces mprt's cascade on one image with its exact layers and seeds
from fastsal.evaluate.randomization import (
    CONVENTIONS,
    METHODS,
    SanityResult,
    _layers,
    _reset,
    data_randomization,
    mprt,
    random_logit,
)
from fastsal._machine import cpu_name
from fastsal.evaluate.similarity import SIMILARITIES

CHECKS: Tuple[str, ...] = ("mprt", "mprt-independent", "random-logit", "data-randomization", "pointing", "deletion",
                           "insertion")
DEFAULT_CHECKS: Tuple[str, ...] = ("mprt", "random-logit", "pointing", "deletion", "insertion")
CSV_COLUMNS: Tuple[str, ...] = ("check", "method", "step", "metric", "mean", "std", "n")
BOX_COLUMNS = ("x0", "y0", "x1", "y1")


class EvalError(Exception):
    """A bad request or input, reported as one line without a traceback."""


@dataclass
class EvalOptions:
    out: str
    model: Optional[str] = None
    weights: Optional[str] = None
    data: Optional[str] = None
    checks: Sequence[str] = DEFAULT_CHECKS
    methods: Sequence[str] = METHODS
    n: int = 200
    batch_size: int = 64
    seed: int = 0
    convention: str = "adebayo"
    steps: int = 20  # deletion/insertion curve steps
    size: Optional[int] = None
    permuted_weights: Optional[str] = None  # data randomization: the same model trained on permuted labels
    progress: bool = True


@dataclass
class EvalData:
    x: torch.Tensor  # (N, C, H, W) normalized
    labels: Optional[np.ndarray]  # (N,) or None
    boxes: Optional[np.ndarray]  # (N, 4) in input pixels, or None
    keys: List[str]
    description: str


# ----- arguments -----------------------------------------------------------------------------------


def parse_names(value, allowed: Sequence[str], what: str) -> Tuple[str, ...]:
    """``"a,b"`` (or a list) -> ``("a", "b")``, in order, without repeats; a clear error otherwise."""
    items = value.split(",") if isinstance(value, str) else list(value)
    names: List[str] = []
    for item in items:
        name = item.strip()
        if not name:
            continue
        if name == "mprt-cascading" and what == "check":
            name = "mprt"
        if name not in allowed:
            raise EvalError(f"unknown {what} {name!r}: choose from {', '.join(allowed)}")
        if name not in names:
            names.append(name)
    if not names:
        raise EvalError(f"no {what} given: choose from {', '.join(allowed)}")
    return tuple(names)


def _check_options(opts: EvalOptions) -> Tuple[Tuple[str, ...], Tuple[str, ...]]:
    checks = parse_names(opts.checks, CHECKS, "check")
    methods = parse_names(opts.methods, METHODS, "method")
    if opts.convention not in CONVENTIONS:
        raise EvalError(f"unknown convention {opts.convention!r}: choose from {', '.join(CONVENTIONS)}")
    for name, value, low in (("--n", opts.n, 1), ("--batch-size", opts.batch_size, 1), ("--steps", opts.steps, 1)):
        if not isinstance(value, int) or value < low:
            raise EvalError(f"{name} must be an integer >= {low}, got {value!r}")
    if "data-randomization" in checks and opts.permuted_weights is None and opts.model is not None:
        raise EvalError("the data-randomization check compares the model with the same architecture trained on "
                        "permuted labels: give that state dict with --permuted-weights PATH")
    if opts.model is not None and opts.data is None:
        raise EvalError("--model needs --data: without it fastsal eval uses the synthetic test split, "
                        "which only the embedded model knows")
    return checks, methods


# ----- data ----------------------------------------------------------------------------------------


def _synthetic(n: int, pre) -> EvalData:
    from fastsal.default_model import synthetic

    if tuple(pre.size) != (synthetic.SIZE, synthetic.SIZE):
        raise EvalError(f"the synthetic test split is {synthetic.SIZE}x{synthetic.SIZE}; drop --size")
    images, labels, boxes = synthetic.batch(range(n), split="test")
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(pre.mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(pre.std, dtype=torch.float32).view(1, 3, 1, 1)
    keys = [f"test_{i:06d}" for i in range(n)]
    return EvalData((x - mean) / std, labels, boxes, keys,
                    f"synthetic test split, samples 0..{n - 1} (fastsal.default_model.synthetic)")


def _box_header(path: str) -> Optional[List[str]]:
    """The header of a CSV that has box columns, else None."""
    if not path.lower().endswith(".csv") or not os.path.isfile(path):
        return None
    with open(path, newline="") as fh:
        header = next(csv.reader(fh), [])
    header = [h.strip().lower() for h in header]
    return header if all(c in header for c in BOX_COLUMNS) else None


def _scale_box(box, orig_wh, size_hw):
    (w0, h0), (h, w) = orig_wh, size_hw
    x0, y0, x1, y1 = box
    if (w0, h0) == (w, h):
        return box
    return (int(math.floor(x0 * w / w0)), int(math.floor(y0 * h / h0)),
            min(w, int(math.ceil(x1 * w / w0))), min(h, int(math.ceil(y1 * h / h0))))


def _read_box_csv(path: str, n: int, pre) -> EvalData:
    from fastsal.jobs.images import ImageError, read_rgb, to_tensor

    base = os.path.dirname(os.path.abspath(path))
    tensors, labels, boxes, keys = [], [], [], []
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        reader.fieldnames = [f.strip().lower() for f in reader.fieldnames or []]
        if "path" not in reader.fieldnames:
            raise EvalError(f"{path}: a CSV with boxes needs the columns path,label,x0,y0,x1,y1")
        for lineno, row in enumerate(reader, start=2):
            if len(keys) >= n:
                break
            key = (row.get("path") or "").strip()
            if not key:
                continue
            file = key if os.path.isabs(key) else os.path.join(base, key)
            try:
                box = tuple(int(float(row[c])) for c in BOX_COLUMNS)
            except (TypeError, ValueError):
                raise EvalError(f"{path}:{lineno}: the box of {key} is not four numbers x0,y0,x1,y1") from None
            label = (row.get("label") or "").strip()
            try:
                labels.append(int(label) if label else None)
            except ValueError:
                raise EvalError(f"{path}:{lineno}: label {label!r} of {key} is not a class index") from None
            try:
                image = read_rgb(file)
            except ImageError as exc:
                raise EvalError(f"{path}:{lineno}: image {key}: {exc}") from None
            w0, h0 = image.size
            x0, y0, x1, y1 = box
            if not (0 <= x0 <= x1 <= w0 and 0 <= y0 <= y1 <= h0):
                raise EvalError(f"{path}:{lineno}: the box {box} of {key} is outside its {w0}x{h0} (W x H) image "
                                "(boxes are x0,y0,x1,y1 in pixels, half-open: 0 <= x0 <= x1 <= W)")
            tensors.append(to_tensor(image, pre))
            boxes.append(_scale_box(box, (w0, h0), tuple(pre.size)))
            keys.append(key)
    if not keys:
        raise EvalError(f"{path} lists no image")
    lab = np.array(labels, dtype=np.int64) if all(v is not None for v in labels) else None
    return EvalData(torch.stack(tensors), lab, np.array(boxes, dtype=np.int64).reshape(-1, 4), keys,
                    f"{os.path.abspath(path)} (first {len(keys)} rows, with boxes)")


def _read_source(src: str, n: int, pre) -> EvalData:
    from fastsal.jobs.images import load_bytes
    from fastsal.jobs.sources import discover, open_reader

    try:
        source = discover(src)
    except (FileNotFoundError, ValueError) as exc:
        raise EvalError(str(exc)) from None
    items = source.items[:n]
    if not items:
        raise EvalError(f"no image found in {src}")
    # bytes through the job's reader: loose files and tar-shard members alike
    reader = open_reader(src, source.kind, [it.key for it in source.items])
    tensors = {}
    for i, data, error in reader.read(range(len(items))):
        if error is None:
            tensor, _size, error = load_bytes(data, pre)
        if error is not None:
            raise EvalError(f"image {items[i].key}: {error}")
        tensors[i] = tensor
    lab = np.array([it.label for it in items], dtype=np.int64) if all(it.label is not None for it in items) else None
    return EvalData(torch.stack([tensors[i] for i in range(len(items))]), lab, None, [it.key for it in items],
                    f"{os.path.abspath(src)} ({source.kind}, first {len(items)} images, no boxes)")


# ----- the checks ----------------------------------------------------------------------------------


def _nan_stats(values) -> Tuple[float, float, int]:
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if not v.size:
        return float("nan"), float("nan"), 0
    return float(v.mean()), float(v.std()), int(v.size)


def _row(check, method, step, metric, mean, std, n) -> dict:
    return dict(check=check, method=method, step=str(step), metric=metric, mean=float(mean), std=float(std), n=int(n))


def _merge(results: List[SanityResult]) -> SanityResult:
    """One :class:`SanityResult` from per-method runs of the same check."""
    first = results[0]
    scores, original = {}, {} if first.original is not None else None
    for r in results:
        scores.update(r.scores)
        if original is not None:
            original.update(r.original)
    return SanityResult(check=first.check, methods=tuple(m for r in results for m in r.methods),
                        similarities=first.similarities, steps=first.steps, scores=scores, original=original,
                        info=first.info)


def _sanity_json(r: SanityResult) -> dict:
    summary = r.summary()
    out = {"steps": list(r.steps), "info": {k: (v.tolist() if isinstance(v, np.ndarray) else v)
                                           for k, v in r.info.items() if k != "other"}, "summary": {}}
    for m in r.methods:
        out["summary"][m] = {}
        for metric in r.similarities:
            s = summary[m][metric]
            entry = {"mean": s["mean"].tolist(), "std": s["std"].tolist(), "n": s["n"].tolist()}
            if r.original is not None:
                entry["original"] = _nan_stats(r.original[m][metric])[0]
            out["summary"][m][metric] = entry
    return out


def cascade_maps(model, x1: torch.Tensor, methods, convention: str, seed: int, label: Optional[int],
                 batch_size=None) -> Tuple[List[str], Dict[str, np.ndarray]]:
    """The ``max_c |g_c|`` maps of one image ``(1, C, H, W)`` along the cascading randomization,
    with the same layers, seeds and classes as :func:`~fastsal.evaluate.randomization.mprt`:
    ``(["original", layer names...], {method: (steps + 1, H, W)})``."""
    import copy

    from fastsal.saliency import saliency

    work = copy.deepcopy(model).eval()
    layers, _ = _layers(work, x1)
    target = torch.tensor([label]) if (convention == "quantus" and label is not None) else None
    maps = {m: [] for m in methods}

    def explain():
        for m in methods:
            maps[m].append(saliency(work, x1, target=target, method=m, reduce="abs_max")[0].detach().float().numpy())

    explain()
    for i, name in enumerate(layers):
        _reset(work.get_submodule(name), name, convention, seed + i if convention == "adebayo" else seed + 1)
        explain()
    return ["original"] + layers, {m: np.stack(v) for m, v in maps.items()}


def _pointing(model, data: EvalData, labels, methods, batch_size) -> Tuple[dict, List[dict], Dict[str, np.ndarray]]:
    from fastsal.evaluate.localization import mass_in_box, pointing_game_maps, saliency_maps, weak_box_iou

    size = tuple(data.x.shape[-2:])
    summary, rows, all_maps = {}, [], {}
    for m in methods:
        maps = saliency_maps(model, data.x, labels, m, batch_size)
        all_maps[m] = maps
        p = pointing_game_maps(maps, labels, data.boxes, None, size)
        mass = mass_in_box(maps, data.boxes)
        iou = weak_box_iou(maps, data.boxes, size)
        summary[m] = {"pointing": p.summary(),
                      "mass_in_box": {"mean": mass.mean, "n": mass.n, "n_excluded": mass.n_excluded},
                      "box_iou": {"mean": iou.mean, "n": iou.n, "n_excluded": iou.n_excluded}}
        variants = [(m, p.saliency, p.saliency_exact)]
        if "centre" not in summary:
            summary["centre"] = {"pointing": {k: v for k, v in p.summary().items() if not k.startswith("saliency")}}
            variants.append(("centre", p.centre, p.centre_exact))
        for name, tol, exact in variants:
            for metric, score in (("accuracy", tol), ("accuracy_exact", exact)):
                per_class = list(score.class_accuracy.values())
                rows.append(_row("pointing", name, "all", metric, score.accuracy,
                                 np.std(per_class) if per_class else float("nan"), len(per_class)))
                hits = score.hits[p.valid].astype(np.float64)
                rows.append(_row("pointing", name, "all", metric + "_overall", *_nan_stats(hits)))
        rows.append(_row("mass-in-box", m, "all", "fraction", *_nan_stats(mass.values)))
        rows.append(_row("box-iou", m, "all", "iou", *_nan_stats(iou.iou)))
    # the centre baseline after the methods
    rows.sort(key=lambda r: (r["check"] != "pointing", r["method"] == "centre"))
    summary["centre"] = summary.pop("centre")
    return summary, rows, all_maps


def _curves(model, data: EvalData, method, modes, steps) -> Tuple[dict, List[dict]]:
    from fastsal.evaluate.faithfulness import deletion_insertion

    r = deletion_insertion(model, data.x, method=method, steps=steps, modes=modes)
    out, rows = {"steps": steps, "blur_sigma_px": r.blur_sigma, "x": r.x.tolist()}, []
    for mode in modes:
        curves, aucs = getattr(r, mode), getattr(r, f"{mode}_auc")
        out[mode] = {"auc": float(aucs.mean()), "auc_std": float(aucs.std()), "curve": curves.mean(axis=0).tolist()}
        rows.append(_row(mode, method, "all", "auc", *_nan_stats(aucs)))
        for j, xv in enumerate(r.x):
            rows.append(_row(mode, method, f"{xv:.4f}", "probability", *_nan_stats(curves[:, j])))
    return out, rows



def _json_clean(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _json_clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_clean(v) for v in obj]
    if isinstance(obj, np.generic):
        return _json_clean(obj.item())
    return obj


def evaluate(opts: EvalOptions) -> dict:
    """Run ``fastsal eval``; returns what ``results.json`` holds. Raises :class:`EvalError` on bad input."""
    from tqdm import tqdm

    from fastsal.jobs.models import load_model

    t_start = time.perf_counter()
    checks, methods = _check_options(opts)
    box_header = _box_header(opts.data) if opts.data is not None else None
    if "pointing" in checks and opts.data is not None and box_header is None:
        raise EvalError(f"the pointing check needs boxes, and {opts.data} has none: give a CSV with the columns "
                        "path,label,x0,y0,x1,y1 (fastsal.default_model.synthetic.write_dataset writes one), "
                        "or leave pointing out of --checks")
    try:
        loaded = load_model(opts.model, opts.weights, opts.size)
    except (ValueError, TypeError, FileNotFoundError, RuntimeError) as exc:
        raise EvalError(f"cannot load the model: {exc}") from None
    model, pre = loaded.model.eval(), loaded.preprocess
    permuted = None
    if "data-randomization" in checks:
        permuted_weights = opts.permuted_weights
        if permuted_weights is None:  # the embedded model ships its permuted-label twin
            from fastsal.default_model.model import permuted_weights_path

            permuted_weights = permuted_weights_path()
        try:
            permuted = load_model(opts.model, permuted_weights, opts.size).model.eval()
        except (ValueError, TypeError, FileNotFoundError, RuntimeError) as exc:
            raise EvalError(f"cannot load the permuted-label model ({permuted_weights}): {exc}") from None
    if opts.data is None:
        data = _synthetic(opts.n, pre)
    elif box_header is not None:
        data = _read_box_csv(opts.data, opts.n, pre)
    else:
        data = _read_source(opts.data, opts.n, pre)
    os.makedirs(opts.out, exist_ok=True)

    n = int(data.x.shape[0])
    with torch.no_grad():
        logits = torch.cat([model(data.x[i:i + opts.batch_size]) for i in range(0, n, opts.batch_size)])
    predicted = logits.argmax(dim=1).numpy()
    num_classes = int(logits.shape[1])
    if data.labels is not None and ((data.labels < 0) | (data.labels >= num_classes)).any():
        raise EvalError(f"the labels must be class indices 0..{num_classes - 1} of the model")
    labels = data.labels if data.labels is not None else predicted

    tasks = []
    for check in checks:
        if check in ("mprt", "mprt-independent", "random-logit", "data-randomization", "pointing"):
            tasks += [(check, m) for m in methods]
    curve_modes = tuple(c for c in ("deletion", "insertion") if c in checks)
    if curve_modes:
        tasks += [("+".join(curve_modes), m) for m in methods]
    tasks.append(("pictures", ""))

    results = {"checks": {}}
    rows: List[dict] = []
    seconds: Dict[str, float] = {}
    partial: Dict[str, List[SanityResult]] = {}
    pictures: Dict[str, str] = {}
    curve_summary: Dict[str, dict] = {}
    pointing_maps = None
    bar = tqdm(total=len(tasks), desc="fastsal eval", unit="task", disable=not opts.progress)
    try:
        for check, m in tasks:
            bar.set_postfix_str(f"{check} {m}".strip())
            t0 = time.perf_counter()
            if check in ("mprt", "mprt-independent"):
                mode = "cascading" if check == "mprt" else "independent"
                r = mprt(model, data.x, methods=(m,), mode=mode, convention=opts.convention,
                         target=torch.as_tensor(labels) if opts.convention == "quantus" else None,
                         seed=opts.seed, batch_size=opts.batch_size)
                partial.setdefault(r.check, []).append(r)
            elif check == "random-logit":
                r = random_logit(model, data.x, torch.as_tensor(labels), methods=(m,), seed=opts.seed,
                                 batch_size=opts.batch_size)
                partial.setdefault(r.check, []).append(r)
            elif check == "data-randomization":
                # each model explains its own top class (Adebayo et al.); the labels are arbitrary to the other
                r = data_randomization(model, permuted, data.x, methods=(m,), batch_size=opts.batch_size)
                partial.setdefault(r.check, []).append(r)
            elif check == "pointing":
                if pointing_maps is None:
                    summary, prow, pointing_maps = _pointing(model, data, labels, methods, opts.batch_size)
                    results["checks"]["pointing"] = summary
                    rows += prow
            elif check == "pictures":
                pictures = _pictures(opts, model, data, labels, predicted, methods, partial, curve_summary, pre)
            else:
                summary, crow = _curves(model, data, m, curve_modes, opts.steps)
                curve_summary[m] = summary
                rows += crow
            seconds[check] = seconds.get(check, 0.0) + time.perf_counter() - t0
            bar.update(1)
    finally:
        bar.close()

    sanity_rows: List[dict] = []
    for name, parts in partial.items():
        merged = _merge(parts)
        results["checks"][name] = _sanity_json(merged)
        sanity_rows += merged.rows()
    if curve_summary:
        results["checks"]["deletion_insertion"] = curve_summary
    rows = sanity_rows + rows

    first = next(iter(results["checks"].get("pointing", {}).values()), {}).get("pointing", {})
    height, width = (int(s) for s in data.x.shape[-2:])
    results = {
        "fastsal_eval": 1,
        "model": loaded.description,
        "weights": opts.weights,
        "data": {"source": data.description, "n": n, "image_size": [height, width],
                 "labels": "true" if data.labels is not None else "predicted (the data has no labels)",
                 "boxes": data.boxes is not None,
                 "accuracy": float((predicted == data.labels).mean()) if data.labels is not None else None},
        "protocol": {
            "checks": list(checks), "methods": list(methods), "n": n, "seed": opts.seed,
            "convention": opts.convention, "batch_size": opts.batch_size, "similarities": list(SIMILARITIES),
            "mprt": {"layers": "parameter-holding modules the forward calls, output first",
                     "normalization": "adebayo" if opts.convention == "adebayo" else "max",
                     "class": "each model's own top class" if opts.convention == "adebayo" else "the labels"},
            "random_logit": {"class": "the label vs (label + k) % C, k uniform in 1..C-1, seed"},
            "data_randomization": {"permuted_weights": opts.permuted_weights or (
                "the embedded model's shipped permuted-label twin" if permuted is not None else None),
                "class": "each model's own top class"},
            "pointing": {"tolerance_px": first.get("tolerance_px"), "sigma_px": first.get("sigma_px"),
                         "smooth": 0.02, "map": "max_c |g_c| of the label", "class_averaged": True},
            "deletion_insertion": {"steps": opts.steps, "score": "softmax probability of the original top-1 class",
                                   "deletion_baseline": "zeros in normalized space",
                                   "insertion_start": "Gaussian blur, sigma = 0.05 max(H, W)",
                                   "blur_sigma_px": next(iter(curve_summary.values()), {}).get("blur_sigma_px")},
        },
        "checks": results["checks"],
        "rows": rows,
        "pictures": pictures,
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
        "wall_s": round(time.perf_counter() - t_start, 2),
        "machine": {"cpu": cpu_name(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__, "device": "cpu"},
    }
    _write(opts.out, results)
    return results


def _pictures(opts, model, data, labels, predicted, methods, partial, curve_summary, pre) -> Dict[str, str]:
    from fastsal.evaluate import plots

    out: Dict[str, str] = {}
    if "mprt-cascading" in partial:
        right = np.nonzero(predicted == labels)[0]
        j = int(right[0]) if len(right) else 0
        steps, maps = cascade_maps(model, data.x[j:j + 1], methods, opts.convention, opts.seed, int(labels[j]))
        path = os.path.join(opts.out, "mprt_grid.png")
        plots.mprt_grid(data.x[j], maps, steps, path, mean=pre.mean, std=pre.std)
        out["mprt_grid"] = path
        out["mprt_grid_image"] = data.keys[j]
    for name, parts in partial.items():
        if name.startswith("mprt"):
            merged = _merge(parts)
            path = os.path.join(opts.out, f"{name.replace('-', '_')}_curves.png" if name != "mprt-cascading"
                                else "mprt_curves.png")
            plots.similarity_curves(merged, path)
            out[name + "_curves"] = path
    if curve_summary:
        path = os.path.join(opts.out, "deletion_insertion.png")
        plots.deletion_insertion_curves(curve_summary, path)
        out["deletion_insertion"] = path
    return out


# ----- outputs -------------------------------------------------------------------------------------


def _write(out: str, results: dict) -> None:
    with open(os.path.join(out, "results.json"), "w") as fh:
        json.dump(_json_clean(results), fh, indent=1)
    with open(os.path.join(out, "results.csv"), "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(CSV_COLUMNS))
        writer.writeheader()
        for row in results["rows"]:
            writer.writerow({k: ("" if isinstance(row[k], float) and not math.isfinite(row[k]) else row[k])
                             for k in CSV_COLUMNS})
    with open(os.path.join(out, "summary.md"), "w") as fh:
        fh.write(summary_tables(results) + "\n")


def _fmt(v, digits=3) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{digits}f}"


def _table(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines)


def summary_tables(results: dict, layers: Optional[int] = None) -> str:
    """Markdown tables of a ``results.json`` dict: MPRT (rank_abs and ssim per layer), RandomLogit,
    pointing with the centre baseline, deletion/insertion AUC. ``layers`` keeps the top ones only."""
    parts = []
    checks = results["checks"]
    for name in ("mprt-cascading", "mprt-independent"):
        if name not in checks:
            continue
        c = checks[name]
        steps = c["steps"] if layers is None else c["steps"][:layers]
        body = []
        for m, by_metric in c["summary"].items():
            for metric in ("rank_abs", "ssim"):
                body.append([m, metric] + [_fmt(v, 2) for v in by_metric[metric]["mean"][:len(steps)]])
        parts.append(f"{name} (mean over images; steps re-initialize from the output down)\n\n"
                     + _table(["method", "metric"] + list(steps), body))
    if "random-logit" in checks:
        c = checks["random-logit"]
        body = [[m] + [_fmt(c["summary"][m][k]["mean"][0]) for k in SIMILARITIES] for m in c["summary"]]
        parts.append("random-logit (true class vs a random other class)\n\n" + _table(["method", *SIMILARITIES], body))
    if "pointing" in checks:
        c = checks["pointing"]
        p0 = next(v["pointing"] for k, v in c.items() if k != "centre")
        body = []
        for m, v in c.items():
            p = v["pointing"]
            key, key0 = ("centre", "centre_exact") if m == "centre" else ("saliency", "saliency_exact")
            body.append([m, _fmt(p[key]["accuracy"]), _fmt(p[key0]["accuracy"]), _fmt(p[key]["accuracy_overall"]),
                         _fmt(v.get("mass_in_box", {}).get("mean")), _fmt(v.get("box_iou", {}).get("mean"))])
        parts.append(f"pointing game (tolerance {p0['tolerance_px']} px, sigma {_fmt(p0['sigma_px'], 2)} px, "
                     f"{p0['n']} images, {p0['n_excluded']} excluded)\n\n"
                     + _table(["method", "accuracy (class avg)", "exact", "accuracy (images)", "mass in box",
                               "weak-box IoU"], body))
    if "deletion_insertion" in checks:
        c = checks["deletion_insertion"]
        body = [[m, _fmt(v.get("deletion", {}).get("auc")), _fmt(v.get("insertion", {}).get("auc"))]
                for m, v in c.items()]
        parts.append("deletion / insertion AUC (lower / higher is better)\n\n"
                     + _table(["method", "deletion AUC", "insertion AUC"], body))
    return "\n\n".join(parts)


def eval_from_args(args) -> int:
    """The ``fastsal eval`` subcommand: run, print the summary, return the exit status."""
    import sys

    opts = EvalOptions(out=args.out, model=args.model, weights=args.weights, data=args.data, checks=args.checks,
                       methods=args.methods, n=args.n, batch_size=args.batch_size, seed=args.seed,
                       convention=args.convention, steps=args.steps, size=args.size, progress=not args.quiet,
                       permuted_weights=args.permuted_weights)
    try:
        results = evaluate(opts)
    except EvalError as exc:
        print(f"fastsal eval: {exc}", file=sys.stderr)
        return 2
    except ImportError as exc:  # scikit-image (SSIM, HOG) is the eval extra
        print(f"fastsal eval: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    print(summary_tables(results))
    d = results["data"]
    print(f"\n{d['n']} images ({d['source']}), model {results['model']}; "
          f"{results['wall_s']:.1f} s on {results['machine']['cpu']} ({results['machine']['torch_threads']} threads)")
    print(f"results: {os.path.join(opts.out, 'results.json')}, results.csv, summary.md and the PNGs in {opts.out}")
    return 0


__all__ = ["CHECKS", "CSV_COLUMNS", "DEFAULT_CHECKS", "EvalError", "EvalOptions", "cascade_maps", "evaluate",
           "eval_from_args", "parse_names", "summary_tables"]
