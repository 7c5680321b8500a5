"""One benchmark run: every engine on every (model, batch size, dtype), interleaved, with
images/s, peak memory and the largest batch that fits a memory budget."""

from __future__ import annotations

import datetime as _dt
import gc
import os
import platform
from typing import Dict, List, Optional

import torch

from fastsal.bench.engines import build_engines
from fastsal.bench.measure import peak_memory, run_once, summarize

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def machine() -> Dict[str, str]:
    import fastsal

    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = "none"
    try:
        import captum

        captum_version = captum.__version__
    except Exception:
        captum_version = "none"
    card = torch.cuda.get_device_name() if torch.cuda.is_available() else \
        f"CPU {platform.machine()} x{os.cpu_count()} threads={torch.get_num_threads()}"
    return {"card": card, "torch": torch.__version__, "triton": triton_version, "captum": captum_version,
            "fastsal": fastsal.__version__, "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}


def build_model(name: str) -> torch.nn.Module:
    import torchvision

    kwargs = {"aux_logits": False, "init_weights": True} if name in ("googlenet", "inception_v3") else {}
    return torchvision.models.get_model(name, weights=None, **kwargs).eval()


def _largest_batch(bytes_small: int, b_small: int, bytes_big: int, b_big: int, budget: int) -> Optional[int]:
    """The batch whose peak memory reaches ``budget``, on the line through two measurements."""
    if b_big == b_small:
        per_image = bytes_big / max(b_big, 1)
        fixed = 0.0
    else:
        per_image = (bytes_big - bytes_small) / (b_big - b_small)
        fixed = bytes_small - per_image * b_small
    if per_image <= 0:
        return None
    return max(0, int((budget - max(fixed, 0.0)) // per_image))


def _cases(models, dtypes, batch_sizes, device, size):
    """(model name, model, dtype name, batch, input, target) for every configuration."""
    for model_name in models:
        model = build_model(model_name).to(device)
        for p in model.parameters():
            p.requires_grad_(True)  # as a user's model is: autograd then keeps what weight grads need
        if device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        for dtype_name in dtypes:
            for batch in batch_sizes:
                g = torch.Generator().manual_seed(0)
                x = torch.randn(batch, 3, size, size, generator=g).to(device)
                if device.type == "cuda":
                    x = x.contiguous(memory_format=torch.channels_last)
                with torch.inference_mode():
                    target = model(x).argmax(dim=1)
                yield model_name, model, dtype_name, batch, x, target.clone()
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        del model
        gc.collect()


def bench(models: List[str], batch_sizes: List[int], dtypes: List[str], device: torch.device, engines: List[str],
          methods: List[str], size: int, repeats: int, warmup: int, memory_budget_gib: float,
          log=print) -> List[Dict[str, object]]:
    """Two passes over every configuration: first the timings (engines interleaved), then
    the peak memory of one step of each engine. On a CPU the second pass switches glibc to
    returning freed memory at once, which would slow the timings if it came first."""
    info = machine()
    rows: Dict[tuple, Dict[str, object]] = {}
    for model_name, model, dtype_name, batch, x, target in _cases(models, dtypes, batch_sizes, device, size):
        amp = None if dtype_name == "fp32" else DTYPES[dtype_name]
        steps = []
        for e in build_engines(model, device, amp, engines, methods):
            try:
                step = e.make_step(x, target)
                for _ in range(warmup):
                    step()
                steps.append((e, step, None))
            except Exception as exc:  # an engine that cannot run this case is reported, not hidden
                steps.append((e, None, f"{type(exc).__name__}: {str(exc)[:200]}"))
                log(f"  {e.engine}/{e.method}: failed: {type(exc).__name__}: {str(exc)[:200]}")
        times = {id(e): [] for e, _, _ in steps}
        for _ in range(repeats):  # interleaved, so drift on a shared machine hits every engine alike
            for e, step, _err in steps:
                if step is not None:
                    if device.type == "cpu":
                        # one untimed call after switching engines: on a CPU the first call after
                        # another engine ran pays for the allocator and caches that engine left
                        # behind (up to 2x on resnet50), which a job running one engine never does
                        step()
                    times[id(e)].append(run_once(step, device))
        for e, step, err in steps:
            row = {"engine": e.engine, "method": e.method, "model": model_name, "batch_size": batch,
                   "dtype": dtype_name, "device": device.type, "image_size": size}
            if step is None:
                row.update(images_per_s=None, error=err)
            else:
                t = summarize(times[id(e)])
                row.update(images_per_s=round(batch / t["median"], 3),
                           images_per_s_p20=round(batch / t["p80"], 3),
                           images_per_s_p80=round(batch / t["p20"], 3),
                           ms_median=round(t["median"] * 1e3, 3), error="")
                log(f"{model_name:10s} {dtype_name:4s} b={batch:<4d} {e.engine:16s} {e.method:9s} "
                    f"{row['images_per_s']:9.2f} img/s")
            rows[(model_name, dtype_name, batch, e.engine, e.method)] = row
        del steps

    if device.type == "cpu":
        # glibc keeps freed blocks for reuse once the timings have run, so the resident size
        # would not move: a fresh process, told at start to return freed memory at once,
        # measures the peaks instead
        info["cpu_peak_memory"] = "peak RSS above the level before the step, in a fresh process"
        peaks = _memory_in_child(models, dtypes, batch_sizes, engines, methods, size)
    else:
        peaks = memory_pass(models, dtypes, batch_sizes, device, engines, methods, size)
    per_batch_mem: Dict[tuple, Dict[int, int]] = {}
    for (model_name, dtype_name, batch, engine, method), mem in peaks.items():
        row = rows.get((model_name, dtype_name, batch, engine, method))
        if row is None or row.get("error"):
            continue
        row["peak_mem_mib"] = round(mem / 2**20, 1)
        per_batch_mem.setdefault((model_name, dtype_name, engine, method), {})[batch] = mem
        log(f"{model_name:10s} {dtype_name:4s} b={batch:<4d} {engine:16s} {method:9s} peak {row['peak_mem_mib']:9.1f} MiB")

    # the largest batch for the budget, on the line through the smallest and largest batch
    budget = int(memory_budget_gib * 2**30)
    for (model_name, dtype_name, _batch, engine, method), row in rows.items():
        mems = per_batch_mem.get((model_name, dtype_name, engine, method))
        if mems:
            bs = sorted(mems)
            row["largest_batch_in_budget"] = _largest_batch(mems[bs[0]], bs[0], mems[bs[-1]], bs[-1], budget)
            row["memory_budget_gib"] = memory_budget_gib
        row.update(info)
    return list(rows.values())


def memory_pass(models, dtypes, batch_sizes, device, engines, methods, size) -> Dict[tuple, int]:
    """Peak bytes of one step of every engine on every configuration."""
    peaks: Dict[tuple, int] = {}
    for model_name, model, dtype_name, batch, x, target in _cases(models, dtypes, batch_sizes, device, size):
        amp = None if dtype_name == "fp32" else DTYPES[dtype_name]
        for e in build_engines(model, device, amp, engines, methods):
            try:
                step = e.make_step(x, target)
                step()  # one-time allocations (workspaces, compiled graphs) are not the step's peak
            except Exception:
                continue
            gc.collect()
            peaks[(model_name, dtype_name, batch, e.engine, e.method)] = peak_memory(step, device)
            del step
    return peaks


def _memory_in_child(models, dtypes, batch_sizes, engines, methods, size) -> Dict[tuple, int]:
    import json
    import subprocess
    import sys

    spec = json.dumps(dict(models=models, dtypes=dtypes, batch_sizes=batch_sizes, engines=engines,
                           methods=methods, size=size))
    proc = subprocess.run([sys.executable, "-m", "fastsal.bench.memory_child", spec], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"the memory measurement failed:\n{proc.stderr[-2000:]}")
    return {tuple(k): v for k, v in json.loads(proc.stdout.strip().splitlines()[-1])}


def ratios(rows: List[Dict[str, object]]) -> List[Dict[str, object]]:
    """Per (model, batch, dtype, method): fastsal vs inference, autograd and Captum."""
    out = []
    key = lambda r: (r["model"], r["batch_size"], r["dtype"])  # noqa: E731
    groups: Dict[tuple, List[dict]] = {}
    for r in rows:
        if r.get("images_per_s"):
            groups.setdefault(key(r), []).append(r)
    for k, rs in groups.items():
        by = {(r["engine"], r["method"]): r for r in rs}
        inf = by.get(("inference", "-"))
        auto = by.get(("autograd", "gradient"))
        for method in ("gradient", "deconvnet", "guided"):
            for engine in ("fastsal", "fastsal-compile", "fastsal-graph"):
                f = by.get((engine, method))
                if f is None:
                    continue
                c = by.get(("captum", method))
                out.append({
                    "model": k[0], "batch_size": k[1], "dtype": k[2], "method": method, "engine": engine,
                    "vs_inference_throughput": round(f["images_per_s"] / inf["images_per_s"], 3) if inf else None,
                    "vs_autograd_throughput": round(f["images_per_s"] / auto["images_per_s"], 3) if auto else None,
                    "vs_captum_throughput": round(f["images_per_s"] / c["images_per_s"], 3) if c else None,
                    "vs_captum_peak_mem": round(f["peak_mem_mib"] / c["peak_mem_mib"], 3) if c and c["peak_mem_mib"] else None,
                    "vs_captum_largest_batch": round(f["largest_batch_in_budget"] / c["largest_batch_in_budget"], 2)
                    if c and c.get("largest_batch_in_budget") and f.get("largest_batch_in_budget") else None,
                })
    return out
