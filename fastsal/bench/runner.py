"""One benchmark run: every engine on every (model, batch size, dtype), interleaved, with
images/s, peak memory and the largest batch that fits a memory budget."""

from __future__ import annotations

import datetime as _dt
import gc
import math
import os
import platform
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Tuple, Union

import torch

from fastsal.bench.engines import build_engines
from fastsal.bench.measure import capture_memory, peak_memory, run_once, summarize

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ENGINES = ("inference", "autograd", "captum", "fastsal", "fastsal-compile", "fastsal-graph")

# the columns of a result row, in the order they are written (the machine's columns last)
FIELDS = ["engine", "method", "model", "batch_size", "dtype", "device", "image_size", "images_per_s",
          "images_per_s_p20", "images_per_s_p80", "ms_median", "peak_mem_mib", "peak_mem_kind",
          "largest_batch_in_budget", "memory_budget_gib", "error", "card", "torch", "triton", "captum", "fastsal",
          "date", "cpu_peak_memory"]


@dataclass(frozen=True)
class Case:
    """One configuration: a model at one dtype and batch size, with the engines to run on it
    (None: every engine the run asks for)."""

    model: str
    dtype: str
    batch_size: int
    engines: Optional[Tuple[str, ...]] = None


def parse_case(text: str) -> Case:
    """``MODEL:DTYPE:BATCH`` or ``MODEL:DTYPE:BATCH:ENGINE+ENGINE...``."""
    parts = text.split(":")
    if len(parts) not in (3, 4) or parts[1] not in DTYPES or not parts[2].isdigit() or int(parts[2]) < 1:
        raise ValueError(f"a case is MODEL:DTYPE:BATCH[:ENGINE+ENGINE...] with DTYPE in {sorted(DTYPES)}, "
                         f"got {text!r}")
    engines = tuple(e for e in parts[3].split("+") if e) if len(parts) == 4 else None
    unknown = sorted(set(engines or ()) - set(ENGINES))
    if unknown:
        raise ValueError(f"unknown engine(s) {unknown} in case {text!r}; known: {list(ENGINES)}")
    return Case(parts[0], parts[1], int(parts[2]), engines)


def product_cases(models: Iterable[str], dtypes: Iterable[str], batch_sizes: Iterable[int]) -> List[Case]:
    return [Case(m, d, b) for m in models for d in dtypes for b in batch_sizes]


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


def _cases(cases: List[Case], device, size):
    """(case, model, input, target) for every case, in order; a model is built once for the
    cases next to each other that use it."""
    model_name, model = None, None
    for case in cases:
        if case.model != model_name:
            model = None
            gc.collect()
            model = build_model(case.model).to(device)
            for p in model.parameters():
                p.requires_grad_(True)  # as a user's model is: autograd then keeps what weight grads need
            if device.type == "cuda":
                model = model.to(memory_format=torch.channels_last)
            model_name = case.model
        g = torch.Generator().manual_seed(0)
        x = torch.randn(case.batch_size, 3, size, size, generator=g).to(device)
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            target = model(x).argmax(dim=1)
        yield case, model, x, target.clone()
        del x, target
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _engines_for(case: Case, engines: List[str]) -> List[str]:
    return [e for e in engines if case.engines is None or e in case.engines]


def _failure(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc)[:200]}"


def _step_memory(step, device: torch.device) -> Union[int, str]:
    """Peak bytes of one call of a warm step, or why it could not be measured (an
    out-of-memory error at a large batch is a result, not a reason to lose the run)."""
    try:
        return peak_memory(step, device)
    except Exception as exc:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return _failure(exc)


def bench(cases: List[Case], device: torch.device, engines: List[str], methods: List[str], size: int,
          repeats: int, warmup: int, memory_budget_gib: float, log=print,
          on_row: Optional[Callable[[Dict[str, object]], None]] = None) -> List[Dict[str, object]]:
    """Every engine on every case: images/s (engines interleaved), peak memory, and the
    largest batch that fits a memory budget. ``on_row`` gets each row once its case is timed
    (on CUDA with its peak memory), so a run cut short keeps what it measured.

    On CUDA the peak memory of a case is read right after its timings, from the same steps
    (nothing is compiled twice); a CUDA-graph engine's is read over its first call, where the
    graph is captured (see :func:`fastsal.bench.measure.capture_memory`). On a CPU a second
    pass in a fresh process reads the peaks once every case is timed: it switches glibc to
    returning freed memory at once, which would slow the timings if it came first."""
    info = machine()
    cuda = device.type == "cuda"
    if not cuda:
        # glibc keeps freed blocks for reuse once the timings have run, so the resident size
        # would not move: a fresh process, told at start to return freed memory at once,
        # measures the peaks instead
        info["cpu_peak_memory"] = "peak RSS above the level before the step, in a fresh process"
    rows: Dict[tuple, Dict[str, object]] = {}
    mem_bytes: Dict[tuple, int] = {}
    for case, model, x, target in _cases(cases, device, size):
        amp = None if case.dtype == "fp32" else DTYPES[case.dtype]
        batch = case.batch_size
        steps = []
        for e in build_engines(model, device, amp, _engines_for(case, engines), methods):
            try:
                step = e.make_step(x, target)
                first_mem = None
                calls = warmup
                if cuda and e.memory == "capture":
                    first_mem = capture_memory(step)  # the first call captures the graph
                    calls = max(warmup - 1, 0)
                for _ in range(calls):
                    step()
                steps.append((e, step, None, first_mem))
            except Exception as exc:  # an engine that cannot run this case is reported, not hidden
                steps.append((e, None, _failure(exc), None))
                log(f"  {e.engine}/{e.method}: failed: {_failure(exc)}")
                if cuda:
                    torch.cuda.empty_cache()
        if cuda and any(e.memory == "capture" for e, _, _, _ in steps):
            # the capture's reading emptied the allocator's cache: one untimed call of each
            # engine fills it again, so no engine pays for cudaMalloc in its first timed call
            for _e, step, _err, _mem in steps:
                if step is not None:
                    step()
        times = {id(e): [] for e, _, _, _ in steps}
        for _ in range(repeats):  # interleaved, so drift on a shared machine hits every engine alike
            for e, step, _err, _mem in steps:
                if step is not None:
                    if not cuda:
                        # one untimed call after switching engines: on a CPU the first call after
                        # another engine ran pays for the allocator and caches that engine left
                        # behind (up to 2x on resnet50), which a job running one engine never does
                        step()
                    times[id(e)].append(run_once(step, device))
        for e, step, err, first_mem in steps:
            key = (case.model, case.dtype, batch, e.engine, e.method)
            row = {"engine": e.engine, "method": e.method, "model": case.model, "batch_size": batch,
                   "dtype": case.dtype, "device": device.type, "image_size": size}
            if step is None:
                row.update(images_per_s=None, error=err)
            else:
                t = summarize(times[id(e)])
                row.update(images_per_s=round(batch / t["median"], 3),
                           images_per_s_p20=round(batch / t["p80"], 3),
                           images_per_s_p80=round(batch / t["p20"], 3),
                           ms_median=round(t["median"] * 1e3, 3), error="")
                log(f"{case.model:10s} {case.dtype:4s} b={batch:<4d} {e.engine:16s} {e.method:9s} "
                    f"{row['images_per_s']:9.2f} img/s")
                if cuda:
                    mem = first_mem if first_mem is not None else _step_memory(step, device)
                    _set_memory(row, key, mem, e.memory, mem_bytes, log)
            row.update(info)
            rows[key] = row
            if on_row is not None:
                on_row(row)
        del steps

    if not cuda:
        try:
            peaks = _memory_in_child(cases, engines, methods, size)
        except Exception as exc:  # the timings stand; every row says why it has no memory figure
            log(f"peak memory pass failed: {_failure(exc)}")
            peaks = {k: _failure(exc) for k, r in rows.items() if r.get("images_per_s") is not None}
        for key, mem in peaks.items():
            row = rows.get(key)
            if row is None or row.get("images_per_s") is None:
                continue
            _set_memory(row, key, mem, "step", mem_bytes, log)

    # the largest batch for the budget, on the line through the smallest and largest batch
    per_batch_mem: Dict[tuple, Dict[int, int]] = {}
    for (model_name, dtype_name, batch, engine, method), mem in mem_bytes.items():
        per_batch_mem.setdefault((model_name, dtype_name, engine, method), {})[batch] = mem
    budget = int(memory_budget_gib * 2**30)
    for (model_name, dtype_name, _batch, engine, method), row in rows.items():
        mems = per_batch_mem.get((model_name, dtype_name, engine, method))
        if mems:
            bs = sorted(mems)
            row["largest_batch_in_budget"] = _largest_batch(mems[bs[0]], bs[0], mems[bs[-1]], bs[-1], budget)
            row["memory_budget_gib"] = memory_budget_gib
    return list(rows.values())


def _set_memory(row, key, mem: Union[int, str], kind: str, mem_bytes: Dict[tuple, int], log) -> None:
    """Put a peak (bytes) or the reason there is none (a string) into ``row``."""
    name = f"{key[0]:10s} {key[1]:4s} b={key[2]:<4d} {key[3]:16s} {key[4]:9s}"
    if isinstance(mem, str):
        row["peak_mem_mib"] = None
        row["error"] = f"peak memory: {mem}"
        log(f"{name} peak memory failed: {mem}")
        return
    row["peak_mem_mib"] = round(mem / 2**20, 1)
    row["peak_mem_kind"] = kind
    mem_bytes[key] = mem
    log(f"{name} peak {row['peak_mem_mib']:9.1f} MiB" + (" (over the graph capture)" if kind == "capture" else ""))


def memory_pass(cases: List[Case], device, engines, methods, size) -> Dict[tuple, Union[int, str]]:
    """Peak bytes of one step of every engine on every case, or why it could not be read.
    A CUDA-graph engine is read over its first call, where the graph is captured."""
    peaks: Dict[tuple, Union[int, str]] = {}
    for case, model, x, target in _cases(cases, device, size):
        amp = None if case.dtype == "fp32" else DTYPES[case.dtype]
        for e in build_engines(model, device, amp, _engines_for(case, engines), methods):
            key = (case.model, case.dtype, case.batch_size, e.engine, e.method)
            try:
                step = e.make_step(x, target)
                if device.type == "cuda" and e.memory == "capture":
                    peaks[key] = capture_memory(step)
                    continue
                step()  # one-time allocations (workspaces, compiled graphs) are not the step's peak
            except Exception as exc:
                peaks[key] = _failure(exc)
                continue
            gc.collect()
            peaks[key] = _step_memory(step, device)
            del step
    return peaks


def _memory_in_child(cases: List[Case], engines, methods, size) -> Dict[tuple, Union[int, str]]:
    import json
    import subprocess
    import sys

    spec = json.dumps(dict(cases=[[c.model, c.dtype, c.batch_size, list(c.engines) if c.engines else None]
                                  for c in cases], engines=engines, methods=methods, size=size))
    proc = subprocess.run([sys.executable, "-m", "fastsal.bench.memory_child", spec], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"the memory measurement failed:\n{proc.stderr[-2000:]}")
    return {tuple(k): v for k, v in json.loads(proc.stdout.strip().splitlines()[-1])}


def _num(row: Optional[Dict[str, object]], key: str) -> Optional[float]:
    """``row[key]`` as a finite float, or None when the row, the key or the value is missing
    (a failed case: None, an empty CSV cell, NaN)."""
    if row is None:
        return None
    try:
        v = float(row.get(key))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _ratio(a: Optional[float], b: Optional[float], digits: int) -> Optional[float]:
    return round(a / b, digits) if a is not None and b else None


def ratios(rows: List[Dict[str, object]]) -> List[Dict[str, object]]:
    """Per (model, batch, dtype, method): fastsal vs inference, autograd and Captum. A value
    missing on either side (a failed engine or memory pass) leaves that ratio empty."""
    out = []
    key = lambda r: (r["model"], r["batch_size"], r["dtype"])  # noqa: E731
    groups: Dict[tuple, List[dict]] = {}
    for r in rows:
        if _num(r, "images_per_s"):
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
                ips = _num(f, "images_per_s")
                out.append({
                    "model": k[0], "batch_size": k[1], "dtype": k[2], "method": method, "engine": engine,
                    "vs_inference_throughput": _ratio(ips, _num(inf, "images_per_s"), 3),
                    "vs_autograd_throughput": _ratio(ips, _num(auto, "images_per_s"), 3),
                    "vs_captum_throughput": _ratio(ips, _num(c, "images_per_s"), 3),
                    "vs_captum_peak_mem": _ratio(_num(f, "peak_mem_mib"), _num(c, "peak_mem_mib"), 3),
                    "vs_captum_largest_batch": _ratio(_num(f, "largest_batch_in_budget"),
                                                      _num(c, "largest_batch_in_budget"), 2),
                })
    return out
