"""``fastsal bench --top-k K``: K classes per image from one forward, against K separate calls.

Engines, interleaved in every repeat (so drift on a shared machine hits them alike):

* ``captum-k-calls``: Captum's class for the method, ``attribute(x, target=top[:, k])`` for
  each of the K classes: K forwards and K backwards. The top-K classes are given to it,
  computed once beforehand and not timed (a real caller would pay one more forward for them);
* ``fastsal-k-calls``: fastsal's Captum-compatible class the same way (what changing the
  import alone gives);
* ``fastsal-topk``: ``Explainer(model, method).explain(x, top_k=K)``: one forward, K backward
  passes, the top-K classes found from that forward;
* ``inference``: the forward alone, for scale.

Each row records the machine (CPU or card name, threads, versions), the date and the load
average before and after the run; rows are appended to the CSV, so repeated runs add up.
"""

from __future__ import annotations

import csv
import datetime as _dt
import os
from typing import Dict, List, Optional

import torch

from fastsal.bench.engines import CAPTUM_CLASSES
from fastsal.bench.measure import run_once, summarize
from fastsal.bench.runner import build_model

ENGINES = ("inference", "captum-k-calls", "fastsal-k-calls", "fastsal-topk")
FIELDS = ["engine", "method", "model", "batch_size", "top_k", "image_size", "device", "images_per_s",
          "images_per_s_p20", "images_per_s_p80", "ms_median", "repeats", "vs_captum_throughput", "error",
          "card", "threads", "torch", "captum", "fastsal", "date", "load_before", "load_after"]


def _card(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    from fastsal._machine import cpu_name

    return cpu_name()


def _load() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return ""


def _steps(model, x: torch.Tensor, top: torch.Tensor, k: int, method: str, engines: List[str]):
    import fastsal

    steps = {}
    if "inference" in engines:
        def inference():
            with torch.inference_mode():
                return model(x)
        steps["inference"] = inference
    classes = {"gradient": fastsal.Saliency, "deconvnet": fastsal.Deconvolution, "guided": fastsal.GuidedBackprop}
    per_call = []
    if "captum-k-calls" in engines:
        import captum.attr

        per_call.append(("captum-k-calls", getattr(captum.attr, CAPTUM_CLASSES[method])(model)))
    if "fastsal-k-calls" in engines:
        per_call.append(("fastsal-k-calls", classes[method](model)))
    for name, attr in per_call:
        def k_calls(attr=attr):
            return [attr.attribute(x, target=top[:, j]) for j in range(k)]
        steps[name] = k_calls
    if "fastsal-topk" in engines:
        explainer = fastsal.Explainer(model, method=method, reduce=None, check_finite=False)

        def one_forward():
            return explainer.explain(x, top_k=k)
        steps["fastsal-topk"] = one_forward
    return steps


def bench_topk(model_name: str, batch_size: int, k: int, methods: List[str], device: torch.device, size: int,
               repeats: int, warmup: int, engines: Optional[List[str]] = None, log=print) -> List[Dict[str, object]]:
    """Rows of images/s per engine and method (each engine's output: K maps per image)."""
    import fastsal

    engines = engines or list(ENGINES)
    unknown = sorted(set(engines) - set(ENGINES)) + sorted(set(methods) - set(CAPTUM_CLASSES))
    if unknown:
        raise ValueError(f"unknown engine or method {unknown}: engines {list(ENGINES)}, methods {list(CAPTUM_CLASSES)}")
    try:
        import captum

        captum_version = captum.__version__
    except ImportError:
        captum_version = "none"
        engines = [e for e in engines if e != "captum-k-calls"]
        log("captum is not installed: no captum-k-calls rows")
    load_before = _load()
    model = build_model(model_name).to(device)
    for p in model.parameters():
        p.requires_grad_(True)  # as a user's model is
    x = torch.randn(batch_size, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():  # not inference mode: Captum's backward uses the targets
        logits = model(x)
    if not 1 <= k <= logits.shape[1]:
        raise ValueError(f"--top-k must be between 1 and the model's {logits.shape[1]} classes, got {k}")
    top = logits.topk(k, dim=1).indices
    rows = []
    for method in methods:
        steps = _steps(model, x, top, k, method, [e for e in engines if e != "inference" or not rows])
        for _ in range(warmup):
            for step in steps.values():
                step()
        times: Dict[str, List[float]] = {name: [] for name in steps}
        for _ in range(repeats):
            for name, step in steps.items():
                if device.type == "cpu":
                    step()  # untimed: the first call after another engine pays for its caches
                times[name].append(run_once(step, device))
        for name in steps:
            t = summarize(times[name])
            row = {"engine": name, "method": "-" if name == "inference" else method, "model": model_name,
                   "batch_size": batch_size, "top_k": k, "image_size": size, "device": device.type,
                   "images_per_s": round(batch_size / t["median"], 3),
                   "images_per_s_p20": round(batch_size / t["p80"], 3),
                   "images_per_s_p80": round(batch_size / t["p20"], 3),
                   "ms_median": round(t["median"] * 1e3, 1), "repeats": repeats, "error": ""}
            rows.append(row)
            log(f"{model_name} b={batch_size} K={k} {name:16s} {row['method']:9s} {row['images_per_s']:8.2f} img/s")
        captum = [r["images_per_s"] for r in rows if r["engine"] == "captum-k-calls" and r["method"] == method]
        captum_ips = captum[0] if captum else None
        for r in rows:
            if r["method"] == method and captum_ips:
                r["vs_captum_throughput"] = round(r["images_per_s"] / captum_ips, 3)
    info = {"card": _card(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "captum": captum_version, "fastsal": fastsal.__version__,
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "load_before": load_before, "load_after": _load()}
    for r in rows:
        r.update(info)
    return rows


def append_csv(path: str, rows: List[Dict[str, object]]) -> None:
    """Append ``rows`` to ``path`` (the header is written when the file is new)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    with open(path, "a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=FIELDS, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerows(rows)


__all__ = ["bench_topk", "append_csv", "ENGINES", "FIELDS"]
