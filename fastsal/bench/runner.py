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
from fastsal.bench.measure import peak_memory, release_freed_memory_eagerly, run_once, summarize

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


def bench(models: List[str], batch_sizes: List[int], dtypes: List[str], device: torch.device, engines: List[str],
          methods: List[str], size: int, repeats: int, warmup: int, memory_budget_gib: float,
          log=print) -> List[Dict[str, object]]:
    info = machine()
    if device.type == "cpu":
        info["cpu_peak_memory"] = "rss" if release_freed_memory_eagerly() else "rss-unreliable"
    rows: List[Dict[str, object]] = []
    budget = int(memory_budget_gib * 2**30)
    for model_name in models:
        model = build_model(model_name).to(device)
        for p in model.parameters():
            p.requires_grad_(True)  # as a user's model is: autograd then keeps what weight grads need
        for dtype_name in dtypes:
            dtype = DTYPES[dtype_name]
            channels_last = device.type == "cuda"
            if channels_last:
                model = model.to(memory_format=torch.channels_last)
            engs = build_engines(model, device, None if dtype_name == "fp32" else dtype, engines, methods)
            per_batch_mem: Dict[tuple, Dict[int, int]] = {}
            for batch in batch_sizes:
                g = torch.Generator().manual_seed(0)
                x = torch.randn(batch, 3, size, size, generator=g).to(device)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                with torch.inference_mode():
                    target = model(x).argmax(dim=1).clone()
                target = target.clone()
                steps = []
                for e in engs:
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
                    for e, step, err in steps:
                        if step is not None:
                            times[id(e)].append(run_once(step, device))
                for e, step, err in steps:
                    row = {"engine": e.engine, "method": e.method, "model": model_name, "batch_size": batch,
                           "dtype": dtype_name, "device": device.type, "image_size": size}
                    if step is None:
                        row.update(images_per_s=None, error=err)
                    else:
                        gc.collect()
                        mem = peak_memory(step, device)
                        per_batch_mem.setdefault((e.engine, e.method), {})[batch] = mem
                        t = summarize(times[id(e)])
                        row.update(images_per_s=round(batch / t["median"], 3),
                                   images_per_s_p20=round(batch / t["p80"], 3),
                                   images_per_s_p80=round(batch / t["p20"], 3),
                                   ms_median=round(t["median"] * 1e3, 3),
                                   peak_mem_mib=round(mem / 2**20, 1), error="")
                    row.update(info)
                    rows.append(row)
                    log(f"{model_name:10s} {dtype_name:4s} b={batch:<4d} {e.engine:16s} {e.method:9s} "
                        + (f"{row['images_per_s']:9.2f} img/s {row['peak_mem_mib']:9.1f} MiB" if step else "failed"))
                del steps, x, target
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            # the largest batch for the budget, from the peak memory at the smallest and largest batch
            for row in rows:
                if row["model"] != model_name or row["dtype"] != dtype_name or row.get("error"):
                    continue
                mems = per_batch_mem.get((row["engine"], row["method"]), {})
                if len(mems) >= 1:
                    bs = sorted(mems)
                    row["largest_batch_in_budget"] = _largest_batch(mems[bs[0]], bs[0], mems[bs[-1]], bs[-1], budget)
                    row["memory_budget_gib"] = memory_budget_gib
        del model
        gc.collect()
    return rows


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
