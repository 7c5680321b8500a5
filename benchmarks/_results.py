"""Where benchmark rows go: one CSV per run, each row stamped with card, versions and date."""

from __future__ import annotations

import csv
import datetime as _dt
import os
import platform
import statistics
import time
from typing import Callable, Dict, List

import torch


def machine_info() -> Dict[str, str]:
    if torch.cuda.is_available():
        card = torch.cuda.get_device_name()
    else:
        card = f"CPU: {platform.processor() or platform.machine()} x{os.cpu_count()}"
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = "none"
    return {
        "card": card,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda or "none",
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def time_it(fn: Callable[[], object], *, warmup: int = 3, repeats: int = 20) -> Dict[str, float]:
    """Median and 20/80 % quantiles of one call, in milliseconds (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    samples: List[float] = []
    cuda = torch.cuda.is_available()
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    samples.sort()
    q = statistics.quantiles(samples, n=5) if len(samples) >= 5 else [samples[0]] * 4
    return {"ms": statistics.median(samples), "ms_p20": q[0], "ms_p80": q[3]}


def write_rows(path: str, rows: List[Dict[str, object]]) -> None:
    if not rows:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fields = list(rows[0].keys())
    for row in rows[1:]:
        fields += [k for k in row if k not in fields]
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
