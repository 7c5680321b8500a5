"""Timing and peak memory of one step, on a GPU (CUDA events, max allocated) or a CPU
(wall clock, peak resident memory sampled while the step runs)."""

from __future__ import annotations

import os
import statistics
import threading
import time
from typing import Callable, Dict, List

import torch


def release_freed_memory_eagerly() -> bool:
    """Make glibc return large freed blocks to the OS at once, so resident memory follows
    what is live and a peak can be read off it. (By default glibc raises its mmap threshold
    after the first large free and keeps later blocks in the heap, where a second step
    reuses them without the resident size moving.)"""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        ok = libc.mallopt(M_MMAP_THRESHOLD, 128 * 1024) == 1 and libc.mallopt(M_TRIM_THRESHOLD, 128 * 1024) == 1
        libc.malloc_trim(0)
        return ok
    except (OSError, AttributeError):
        return False


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class RssPeak:
    """Peak resident memory above the level at entry, sampled every millisecond."""

    def __init__(self):
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self):
        self.base = _rss_bytes()
        self.peak = self.base
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())

    @property
    def bytes(self) -> int:
        return self.peak - self.base


def run_once(step: Callable[[], object], device: torch.device) -> float:
    """Seconds for one call of ``step``."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    step()
    return time.perf_counter() - t0


def peak_memory(step: Callable[[], object], device: torch.device) -> int:
    """Bytes one call of ``step`` needs above what was allocated before it."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    with RssPeak() as rss:
        step()
    return rss.bytes


def capture_memory(first_call: Callable[[], object]) -> int:
    """Bytes a CUDA-graph step holds, read over its first call (warm-up and capture).

    A replay allocates nothing, and what the captured graph keeps lives in its private
    memory pool, which ``max_memory_allocated`` read around a replay does not see. So this
    reads the larger of the peak allocated while the first call warms up and captures (above
    what was allocated before it) and what stays reserved after it once the free cached
    blocks are returned (the graph's private pool, its static input and anything else the
    first call made, such as the folded weights of the saliency twin: a slight overcount).
    """
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base_allocated = torch.cuda.memory_allocated()
    base_reserved = torch.cuda.memory_reserved()
    torch.cuda.reset_peak_memory_stats()
    first_call()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base_allocated
    torch.cuda.empty_cache()  # private pools of live graphs stay reserved
    kept = torch.cuda.memory_reserved() - base_reserved
    return max(peak, kept, 0)


def summarize(samples: List[float]) -> Dict[str, float]:
    s = sorted(samples)
    q = statistics.quantiles(s, n=5) if len(s) >= 5 else [s[0], s[0], s[-1], s[-1]]
    return {"median": statistics.median(s), "p20": q[0], "p80": q[3]}
