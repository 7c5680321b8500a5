"""``fastsal run``: saliency maps and weak-localization boxes for every image of a data set.

Batches are the unit of work, planned by the source (:func:`~fastsal.jobs.sources.plan_batches`)
from the job's item list alone, so every batch is computed on the same images whichever run
or rank does it. Batches come in *groups* read together (a tar shard; one batch of loose
files): each rank (``torchrun``) takes the groups G with G % world_size == rank, and each of
its loader workers a share of those groups; of them, only the batches with no results file
yet are computed, so a rerun resumes.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import sys
import time
from dataclasses import dataclass
from typing import List, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F

from fastsal.jobs import images as imgs
from fastsal.jobs.boxes import weak_box
from fastsal.jobs.models import load_model
from fastsal.jobs.sources import Batch, discover, labels_missing, open_reader, plan_batches, relisted
from fastsal.jobs.sources import fingerprint as source_fingerprint
from fastsal.jobs.store import MAP_DTYPES, ConfigMismatch, ResultStore, atomic_write_json, encode_maps

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class RunOptions:
    src: str
    out: str
    model: Optional[str] = None
    weights: Optional[str] = None
    method: str = "guided"
    target: Union[str, int] = "predicted"  # "predicted", "label" or a class index
    batch_size: int = 32
    dtype: str = "fp32"
    device: str = "auto"
    workers: int = 2
    size: Optional[int] = None
    box_threshold: float = 0.2
    box_smooth: float = 0.03
    save_original_size: bool = False
    overwrite: bool = False
    decode: str = "auto"  # "cpu", "gpu" (JPEGs with torchvision.io.decode_jpeg on CUDA) or "auto"
    map_dtype: str = "float16"  # or "uint8": scaled by each map's maximum, the scale kept
    exif_transpose: bool = True  # turn images as their EXIF orientation says before anything else
    parquet: str = "auto"  # items.parquet at the end: "auto" (when pyarrow is installed), "yes", "no"
    loader_probe: int = 256  # images read by the loader alone to report its throughput; 0 skips
    progress: bool = True


class JobError(Exception):
    """A job that cannot start, with what to do about it."""


# -- distributed setup ---------------------------------------------------------------------


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    def broadcast(self, obj):
        """rank 0's ``obj`` on every rank."""
        if not self.active:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def gather_sum(self, values: List[float]) -> List[float]:
        if not self.active:
            return values
        # NCCL reduces only CUDA tensors; gloo only CPU ones
        device = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
        t = torch.tensor(values, dtype=torch.float64, device=device)
        torch.distributed.all_reduce(t)
        return t.cpu().tolist()


def _dist_from_env() -> Dist:
    """This process's place under ``torchrun`` (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    return Dist(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))


def _init_dist(dist: Dist, device: torch.device) -> None:
    """Join the process group; NCCL is bound to ``device``, the one this rank computes on."""
    if not dist.active or torch.distributed.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {"device_id": device} if backend == "nccl" else {}
    torch.distributed.init_process_group(backend=backend, timeout=_dt.timedelta(minutes=30), **kwargs)


def _pick_device(choice: str, dist: Dist) -> torch.device:
    """The device to run on: an explicit ``cuda:N`` wins; plain ``cuda`` (or ``auto`` with a
    GPU) is ``cuda:LOCAL_RANK``. Made current with ``torch.cuda.set_device``."""
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" or choice.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise JobError("--device cuda but no CUDA device is visible; use --device cpu")
        explicit = choice != "cuda"
        try:
            index = int(choice.split(":", 1)[1]) if explicit else dist.local_rank
        except ValueError:
            raise JobError(f"--device must be auto, cpu, cuda or cuda:N, got {choice!r}") from None
        count = torch.cuda.device_count()
        if not 0 <= index < count:
            raise JobError(f"--device {choice}: cuda:{index} does not exist ({count} CUDA device(s) visible)"
                           + ("; under torchrun plain --device cuda takes cuda:LOCAL_RANK" if not explicit else ""))
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    if choice != "cpu":
        raise JobError(f"--device must be auto, cpu, cuda or cuda:N, got {choice!r}")
    return torch.device("cpu")


# -- loading -------------------------------------------------------------------------------


JPEG_MAGIC = b"\xff\xd8\xff"

# a loaded item: (index, tensor or None, original (w, h), error, raw JPEG bytes or None, EXIF orientation)


class _BatchStream(torch.utils.data.IterableDataset):
    """Yields (batch index, [loaded item, ...]) for the batches of ``groups``; loader worker
    w of W reads the groups w, w + W, ... (whole tar shards, front to back)."""

    def __init__(self, reader, groups: List[List[Batch]], pre: imgs.Preprocess, exif: bool, raw_jpeg: bool):
        self.reader, self.groups, self.pre, self.exif, self.raw_jpeg = reader, groups, pre, exif, raw_jpeg

    def _load(self, i: int, data: Optional[bytes], error: Optional[str]):
        if error is not None:
            return i, None, (0, 0), error, None, 1
        if self.raw_jpeg and data[:3] == JPEG_MAGIC:
            orientation = imgs.exif_orientation(data) if self.exif else 1
            return i, None, (0, 0), None, torch.frombuffer(bytearray(data), dtype=torch.uint8), orientation
        tensor, size, error = imgs.load_bytes(data, self.pre, self.exif)
        return i, tensor, size, error, None, 1

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for group in self.groups[worker::workers]:
            batch_of = {i: b for b in group for i in b.items}
            pending = {b.index: {} for b in group}
            for i, data, error in self.reader.read([i for b in group for i in b.items]):
                b = batch_of[i]
                got = pending[b.index]
                got[i] = self._load(i, data, error)
                if len(got) == len(b.items):
                    yield b.index, [got[j] for j in b.items]
                    del pending[b.index]
            for b in group:  # a reader that lost items: say so rather than hang or drop them
                if b.index in pending:
                    got = pending.pop(b.index)
                    lost = (None, (0, 0), "not read from the source", None, 1)
                    yield b.index, [got.get(j) or (j,) + lost for j in b.items]


def _unbatched(sample):
    return sample


def _decode_on_gpu(samples, pre: imgs.Preprocess, exif: bool, device: torch.device):
    """Decode the batch's raw JPEGs on the GPU (``decode_jpeg`` there ignores EXIF, so the
    orientation read from the header is applied to the decoded tensor); any that fail
    take the CPU path instead."""
    from torchvision.io import ImageReadMode, decode_jpeg

    raw = [(k, s) for k, s in enumerate(samples) if s[4] is not None]
    if not raw:
        return samples
    out = list(samples)
    try:
        decoded = decode_jpeg([s[4] for _, s in raw], mode=ImageReadMode.RGB, device=device)
    except Exception:
        decoded = [None] * len(raw)
    h, w = pre.size
    for (k, s), img in zip(raw, decoded):
        if img is None:
            out[k] = (s[0],) + imgs.load_bytes(s[4].numpy().tobytes(), pre, exif) + (None, 1)
            continue
        img = imgs.apply_orientation(img, s[5])
        size = (int(img.shape[2]), int(img.shape[1]))
        resized = F.interpolate(img.unsqueeze(0).float(), size=(h, w), mode="bilinear", antialias=True, align_corners=False)
        tensor = imgs.normalize_on_device(resized.clamp(0, 255), pre)[0]
        out[k] = (s[0], tensor, size, None, None, 1)
    return out


# -- the job -------------------------------------------------------------------------------


def _config(opts: RunOptions, loaded, pre) -> dict:
    return {
        "src": os.path.abspath(opts.src),
        "model": opts.model or "default",
        "model_description": loaded.description,
        "weights": opts.weights,
        "method": opts.method,
        "target": opts.target,
        "batch_size": opts.batch_size,
        "dtype": opts.dtype,
        "input_size": list(pre.size),
        "box_threshold": opts.box_threshold,
        "box_smooth": opts.box_smooth,
        "save_original_size": opts.save_original_size,
        "map_dtype": opts.map_dtype,
        "exif_transpose": opts.exif_transpose,
    }


def _versions() -> dict:
    import fastsal

    return {"fastsal": fastsal.__version__, "torch": torch.__version__, "python": platform.python_version(),
            "numpy": np.__version__}


def _targets_for(opts: RunOptions, labels: List[Optional[int]]):
    if opts.target == "predicted":
        return None
    if opts.target == "label":
        return labels
    return int(opts.target)


def run(opts: RunOptions) -> dict:
    """Run (or resume) a job; returns the summary that is also written to DIR/summary.json."""
    from fastsal.explainer import Explainer
    from fastsal.rules import as_rule

    as_rule(opts.method)
    if opts.dtype not in DTYPES:
        raise JobError(f"--dtype must be one of {', '.join(DTYPES)}, got {opts.dtype!r}")
    if opts.batch_size < 1:
        raise JobError("--batch-size must be at least 1")
    if opts.map_dtype not in MAP_DTYPES:
        raise JobError(f"--map-dtype must be one of {', '.join(MAP_DTYPES)}, got {opts.map_dtype!r}")
    if opts.parquet not in ("auto", "yes", "no"):
        raise JobError(f"--parquet must be auto, yes or no, got {opts.parquet!r}")
    write_table = opts.parquet == "yes" or (opts.parquet == "auto" and _have_pyarrow())
    if opts.parquet == "yes" and not _have_pyarrow():
        raise JobError("--parquet yes needs pyarrow: pip install 'fastsal[parquet]'")
    if not 0 < opts.box_threshold <= 1:
        raise JobError("--box-threshold must be in (0, 1]")
    if isinstance(opts.target, str) and opts.target not in ("predicted", "label"):
        try:
            opts.target = int(opts.target)
        except ValueError:
            raise JobError(f"--target must be predicted, label or a class index, got {opts.target!r}") from None

    # the device first (an explicit cuda:N wins over LOCAL_RANK), then NCCL bound to it
    dist = _dist_from_env()
    device = _pick_device(opts.device, dist)
    _init_dist(dist, device)
    try:
        loaded = load_model(opts.model, opts.weights, opts.size)
    except (ValueError, FileNotFoundError, RuntimeError, TypeError) as exc:
        raise JobError(str(exc)) from None
    pre = loaded.preprocess
    config = _config(opts, loaded, pre)
    store = ResultStore(opts.out)

    # rank 0 lists the images and sets up (or checks) the results folder; the others follow
    status = None
    if dist.rank == 0:
        try:
            # tar shards that did not change since a run of this same job listed them are not
            # listed again (minutes per million samples)
            shards_now = source_fingerprint(opts.src)
            previous = store.manifest()
            if (shards_now is not None and previous is not None and previous.get("config") == config
                    and previous.get("source_fingerprint") == shards_now):
                source = relisted(opts.src, store.items(), previous)
            else:
                source = discover(opts.src)
            if opts.target == "label" and any(it.label is None for it in source.items):
                missing = ", ".join(labels_missing(source))
                raise JobError("--target label needs a label for every image: an ImageFolder tree "
                               "(class subfolders), a list file with path,label lines, or tar shards with a "
                               f".cls member per sample (no label: {missing}, ...)")
            items = [(it.key, it.label) for it in source.items]
            extra = {"versions": _versions(), "class_names": loaded.class_names or source.class_names,
                     "dataset_classes": source.class_names, "created": _dt.datetime.now(_dt.timezone.utc).isoformat(),
                     "preprocess": pre.as_dict(), "source_kind": source.kind,
                     "source_errors": dict(sorted(source.problems.items())),
                     "source_fingerprint": shards_now, "source_skipped": source.skipped[:1000],
                     "source_skipped_count": len(source.skipped)}
            resumed = store.prepare(config, items, extra, opts.overwrite)
            kept = store.manifest()
            if resumed and shards_now is not None and kept.get("source_fingerprint") != shards_now:
                # listed again and found the same samples (a shard touched, say): remember the new state
                atomic_write_json(os.path.join(opts.out, "manifest.json"), {**kept, "source_fingerprint": shards_now})
            status = ("ok", resumed, (store.manifest() or extra).get("source_skipped_count", len(source.skipped)),
                      source.kind)
        except (JobError, ConfigMismatch, FileNotFoundError, ValueError) as exc:
            status = ("error", str(exc), 0, None)
    status = dist.broadcast(status)
    if status[0] == "error":
        raise JobError(status[1])
    resumed, skipped, kind = status[1], status[2], status[3]
    items = store.items()
    keys = [k for k, _ in items]
    labels = [lab for _, lab in items]
    reader = open_reader(opts.src, kind, keys)

    plan = plan_batches(kind, keys, opts.batch_size)
    n_batches = len(plan)
    done = store.done_batches()
    groups: dict = {}
    for batch in plan:
        if batch.group % dist.world == dist.rank and batch.index not in done:
            groups.setdefault(batch.group, []).append(batch)
    mine = list(groups.values())
    use_gpu_decode = device.type == "cuda" and opts.decode in ("auto", "gpu")
    if opts.decode == "gpu" and device.type != "cuda":
        raise JobError("--decode gpu needs --device cuda")

    def loader_for(group_lists):
        return torch.utils.data.DataLoader(
            _BatchStream(reader, group_lists, pre, opts.exif_transpose, raw_jpeg=use_gpu_decode),
            batch_size=None, num_workers=min(opts.workers, len(group_lists)), collate_fn=_unbatched,
            pin_memory=device.type == "cuda", persistent_workers=False,
            prefetch_factor=4 if opts.workers > 0 and group_lists else None,
        )

    # the loader alone, on a sample of this rank's batches: can it keep up?
    loader_ips = None
    if opts.loader_probe > 0 and mine:
        probe, count = [], 0
        for group in mine:
            if count >= opts.loader_probe:
                break
            take = []
            for batch in group:
                if count >= opts.loader_probe:
                    break
                take.append(batch)
                count += len(batch.items)
            probe.append(take)
        t0 = time.perf_counter()
        for _index, samples in loader_for(probe):
            if use_gpu_decode:
                _decode_on_gpu(samples, pre, opts.exif_transpose, device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        loader_ips = count / max(time.perf_counter() - t0, 1e-9)

    explainer = Explainer(loaded.model.to(device), method=opts.method, dtype=DTYPES[opts.dtype],
                          check_finite=False)
    target_spec = _targets_for(opts, labels)
    n_images = n_errors = 0
    bar = None
    if opts.progress and dist.rank == 0:
        try:
            from tqdm import tqdm

            bar = tqdm(total=sum(len(b.items) for g in mine for b in g) * dist.world, unit="img", desc="fastsal run",
                       dynamic_ncols=True, file=sys.stderr)
        except ImportError:
            bar = None
    interrupted = False
    t_start = time.perf_counter()
    try:
        for batch_index, samples in (loader_for(mine) if mine else []):
            if use_gpu_decode:
                samples = _decode_on_gpu(samples, pre, opts.exif_transpose, device)
            good = [s for s in samples if s[1] is not None]
            bad = [s for s in samples if s[1] is None]
            try:
                arrays = _explain_batch(explainer, good, labels, target_spec, items, device, opts, pre)
            except IndexError as exc:  # a class index the model does not have
                where = "the labels of SRC (.cls members, class subfolders or the list's labels)" \
                    if opts.target == "label" else "--target"
                raise JobError(f"{exc}: {where} must be class indices of the model; batch {batch_index} "
                               f"starts at {items[samples[0][0]][0]}") from None
            arrays["err_keys"] = np.array([items[s[0]][0] for s in bad], dtype=str)
            arrays["err_msgs"] = np.array([s[3] for s in bad], dtype=str)
            store.write_shard(batch_index, arrays)
            n_images += len(good)
            n_errors += len(bad)
            if bar is not None:
                bar.update(len(samples) * dist.world)
    except KeyboardInterrupt:
        interrupted = True
    elapsed = time.perf_counter() - t_start
    if bar is not None:
        bar.close()
    if interrupted:
        print(f"\ninterrupted: {n_images} images written to {opts.out}; rerun the same command to finish",
              file=sys.stderr)
        raise KeyboardInterrupt

    totals = dist.gather_sum([n_images, n_errors, elapsed])
    dist.barrier()
    summary = None
    if dist.rank == 0:
        errors = store.collect_errors()
        store.write_errors(errors)
        total_done = sum(1 for _ in store.shard_paths())
        table = None
        if write_table and total_done == n_batches:
            table = os.path.abspath(store.write_table())
        summary = {
            "images_total": len(items),
            "errors_total": len(errors),
            "batches_done": total_done,
            "batches_total": n_batches,
            "this_run": {"images": int(totals[0]), "errors": int(totals[1]), "ranks": dist.world,
                         "seconds": round(elapsed, 3),
                         "saliency_images_per_s": round(totals[0] / elapsed, 2) if elapsed > 0 and totals[0] else None,
                         "loader_only_images_per_s_rank0": round(loader_ips, 2) if loader_ips else None,
                         "resumed": bool(resumed)},
            "skipped_non_image_files": skipped,
            "table": table or ("not written: pip install pyarrow (fastsal[parquet])" if opts.parquet == "auto"
                               and not write_table else None),
            "device": str(device),
            "out": os.path.abspath(opts.out),
        }
        atomic_write_json(os.path.join(opts.out, "summary.json"), summary)
    return summary


def _have_pyarrow() -> bool:
    try:
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        return False
    return True


def _maps_arrays(maps: np.ndarray, dtype: str) -> dict:
    stored, scales = encode_maps(maps, dtype)
    return {"maps": stored} if scales is None else {"maps": stored, "map_scales": scales}


def _explain_batch(explainer, good, labels, target_spec, items, device, opts, pre) -> dict:
    h, w = pre.size
    n = len(good)
    if n == 0:
        empty_i = np.zeros((0,), np.int64)
        return {"keys": np.array([], dtype=str), "labels": empty_i, "preds": empty_i, "targets": empty_i,
                "scores": np.zeros((0,), np.float32), **_maps_arrays(np.zeros((0, h, w), np.float32), opts.map_dtype),
                "boxes": np.zeros((0, 4), np.int32), "sizes": np.zeros((0, 2), np.int32)}
    idx = [s[0] for s in good]
    x = torch.stack([s[1].to(device, non_blocking=True) for s in good])
    if isinstance(target_spec, list):
        target = torch.tensor([target_spec[i] for i in idx], device=device)
    else:
        target = target_spec
    result = explainer.explain(x, target=target)
    probs = torch.softmax(result.logits.float(), dim=1)
    preds = probs.argmax(dim=1)
    scores = probs.gather(1, preds[:, None])[:, 0]
    maps = result.maps.float().cpu().numpy()
    sizes = [s[2] for s in good]
    boxes = np.full((n, 4), -1, dtype=np.int32)
    extra = {}
    orig_scales = []
    for row in range(n):
        box = weak_box(maps[row], opts.box_threshold, sizes[row], opts.box_smooth)
        if box is not None:
            boxes[row] = box
        if opts.save_original_size:
            ow, oh = sizes[row]
            resized = F.interpolate(torch.from_numpy(maps[row])[None, None], size=(oh, ow), mode="bilinear",
                                    align_corners=False)[0, 0]
            stored, scale = encode_maps(resized.numpy()[None], opts.map_dtype)
            extra[f"orig_{row}"] = stored[0]
            if scale is not None:
                orig_scales.append(scale[0])
    if orig_scales:
        extra["orig_scales"] = np.array(orig_scales, dtype=np.float32)
    lab = [labels[i] for i in idx]
    return {
        "keys": np.array([items[i][0] for i in idx], dtype=str),
        "labels": np.array([-1 if v is None else v for v in lab], dtype=np.int64),
        "preds": preds.cpu().numpy().astype(np.int64),
        "targets": result.targets.cpu().numpy().astype(np.int64),
        "scores": scores.cpu().numpy().astype(np.float32),
        **_maps_arrays(maps, opts.map_dtype),
        "boxes": boxes,
        "sizes": np.array(sizes, dtype=np.int32).reshape(n, 2),
        **extra,
    }
