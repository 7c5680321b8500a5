"""``fastsal run``: saliency maps and weak-localization boxes for every image of a data set.

Batches are the unit of work: batch K is items [K*B, (K+1)*B) of the job's item list. Each
rank (``torchrun``) takes the batches K with K % world_size == rank that have no shard yet,
so a rerun resumes and several ranks split the work, and every batch is computed on the
same images whichever run or rank does it.
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
from fastsal.jobs.sources import discover
from fastsal.jobs.store import ConfigMismatch, ResultStore, atomic_write_json

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


class _Images(torch.utils.data.Dataset):
    """Item i -> (i, tensor or None, original (w, h), error, raw JPEG bytes or None)."""

    def __init__(self, paths: List[str], pre: imgs.Preprocess, raw_jpeg: bool):
        self.paths, self.pre, self.raw_jpeg = paths, pre, raw_jpeg

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        path = self.paths[i]
        if self.raw_jpeg and path.lower().endswith((".jpg", ".jpeg")):
            try:
                with open(path, "rb") as fh:
                    data = fh.read()
                if data:
                    return i, None, (0, 0), None, torch.frombuffer(bytearray(data), dtype=torch.uint8)
            except OSError:
                pass  # let the CPU path name the problem
        tensor, size, error = imgs.load(path, self.pre)
        return i, tensor, size, error, None


def _collate(samples):
    return samples


def _decode_on_gpu(samples, dataset: _Images, device: torch.device):
    """Decode the batch's raw JPEGs on the GPU; any that fail take the CPU path instead."""
    from torchvision.io import ImageReadMode, decode_jpeg

    raw = [(k, s) for k, s in enumerate(samples) if s[4] is not None]
    if not raw:
        return samples
    out = list(samples)
    try:
        decoded = decode_jpeg([s[4] for _, s in raw], mode=ImageReadMode.RGB, device=device)
    except Exception:
        decoded = [None] * len(raw)
    h, w = dataset.pre.size
    for (k, s), img in zip(raw, decoded):
        if img is None:
            out[k] = (s[0],) + imgs.load(dataset.paths[s[0]], dataset.pre) + (None,)
            continue
        size = (int(img.shape[2]), int(img.shape[1]))
        resized = F.interpolate(img.unsqueeze(0).float(), size=(h, w), mode="bilinear", antialias=True, align_corners=False)
        tensor = imgs.normalize_on_device(resized.clamp(0, 255), dataset.pre)[0]
        out[k] = (s[0], tensor, size, None, None)
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
            source = discover(opts.src)
            if opts.target == "label" and any(it.label is None for it in source.items):
                raise JobError("--target label needs a label for every image: an ImageFolder tree "
                               "(class subfolders) or a list file with path,label lines")
            items = [(it.key, it.label) for it in source.items]
            extra = {"versions": _versions(), "class_names": loaded.class_names or source.class_names,
                     "dataset_classes": source.class_names, "created": _dt.datetime.now(_dt.timezone.utc).isoformat(),
                     "preprocess": pre.as_dict(), "source_kind": source.kind}
            resumed = store.prepare(config, items, extra, opts.overwrite)
            status = ("ok", resumed, len(source.skipped))
        except (JobError, ConfigMismatch, FileNotFoundError, ValueError) as exc:
            status = ("error", str(exc), 0)
    status = dist.broadcast(status)
    if status[0] == "error":
        raise JobError(status[1])
    resumed, skipped = status[1], status[2]
    items = store.items()
    src_root = os.path.abspath(opts.src)
    base = src_root if os.path.isdir(src_root) else os.path.dirname(src_root)
    paths = [k if os.path.isabs(k) else os.path.join(base, k) for k, _ in items]
    labels = [lab for _, lab in items]

    b = opts.batch_size
    n_batches = (len(items) + b - 1) // b
    done = store.done_batches()
    mine = [k for k in range(n_batches) if k % dist.world == dist.rank and k not in done]
    use_gpu_decode = device.type == "cuda" and opts.decode in ("auto", "gpu")
    if opts.decode == "gpu" and device.type != "cuda":
        raise JobError("--decode gpu needs --device cuda")
    dataset = _Images(paths, pre, raw_jpeg=use_gpu_decode)
    batches = [list(range(k * b, min((k + 1) * b, len(items)))) for k in mine]

    def loader_for(batch_lists):
        return torch.utils.data.DataLoader(
            dataset, batch_sampler=batch_lists, num_workers=opts.workers, collate_fn=_collate,
            pin_memory=device.type == "cuda", persistent_workers=False,
            prefetch_factor=4 if opts.workers > 0 else None,
        )

    # the loader alone, on a sample of this rank's batches: can it keep up?
    loader_ips = None
    if opts.loader_probe > 0 and batches:
        probe, count = [], 0
        for bl in batches:
            if count >= opts.loader_probe:
                break
            probe.append(bl)
            count += len(bl)
        t0 = time.perf_counter()
        for samples in loader_for(probe):
            if use_gpu_decode:
                _decode_on_gpu(samples, dataset, device)
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

            bar = tqdm(total=sum(len(bl) for bl in batches) * dist.world, unit="img", desc="fastsal run",
                       dynamic_ncols=True, file=sys.stderr)
        except ImportError:
            bar = None
    interrupted = False
    t_start = time.perf_counter()
    try:
        for samples in loader_for(batches):
            if use_gpu_decode:
                samples = _decode_on_gpu(samples, dataset, device)
            batch_index = samples[0][0] // b
            good = [s for s in samples if s[1] is not None]
            bad = [s for s in samples if s[1] is None]
            arrays = _explain_batch(explainer, good, labels, target_spec, items, device, opts, pre)
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
            "device": str(device),
            "out": os.path.abspath(opts.out),
        }
        atomic_write_json(os.path.join(opts.out, "summary.json"), summary)
    return summary


def _explain_batch(explainer, good, labels, target_spec, items, device, opts, pre) -> dict:
    h, w = pre.size
    n = len(good)
    if n == 0:
        empty_i = np.zeros((0,), np.int64)
        return {"keys": np.array([], dtype=str), "labels": empty_i, "preds": empty_i, "targets": empty_i,
                "scores": np.zeros((0,), np.float32), "maps": np.zeros((0, h, w), np.float16),
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
    for row in range(n):
        box = weak_box(maps[row], opts.box_threshold, sizes[row], opts.box_smooth)
        if box is not None:
            boxes[row] = box
        if opts.save_original_size:
            ow, oh = sizes[row]
            resized = F.interpolate(torch.from_numpy(maps[row])[None, None], size=(oh, ow), mode="bilinear",
                                    align_corners=False)[0, 0]
            extra[f"orig_{row}"] = resized.numpy().astype(np.float16)
    lab = [labels[i] for i in idx]
    return {
        "keys": np.array([items[i][0] for i in idx], dtype=str),
        "labels": np.array([-1 if v is None else v for v in lab], dtype=np.int64),
        "preds": preds.cpu().numpy().astype(np.int64),
        "targets": result.targets.cpu().numpy().astype(np.int64),
        "scores": scores.cpu().numpy().astype(np.float32),
        "maps": maps.astype(np.float16),
        "boxes": boxes,
        "sizes": np.array(sizes, dtype=np.int32).reshape(n, 2),
        **extra,
    }
