"""Helpers shared by the job tests: subprocess environment, reading results back, kill -9 mid-job."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from typing import List, Sequence

import numpy as np

from fastsal.jobs.store import load_results

TESTS = os.path.dirname(__file__)


def job_env() -> dict:
    """The environment of a `python -m fastsal` child: tests/ importable, real kernels path, one thread."""
    env = dict(os.environ)
    env["PYTHONPATH"] = TESTS + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("TRITON_INTERPRET", None)
    env["OMP_NUM_THREADS"] = "1"  # torchrun's default per rank: the single run must match it
    return env


def read_records(out: str):
    """({key: record}, {key: error}) of a results folder."""
    res = load_results(out)
    return {k: res[k] for k in res}, res.errors


def assert_same_results(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert np.array_equal(a[k].map, b[k].map), k
        assert a[k].box == b[k].box and a[k].label == b[k].label and a[k].score == b[k].score, k


def kill_after_first_batch(cmd: Sequence[str], out: str, timeout: float = 120) -> List[str]:
    """Start ``cmd`` (a job writing to ``out``), SIGKILL it once a batch file exists; the batch files left."""
    proc = subprocess.Popen(list(cmd), env=job_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    batches = os.path.join(out, "shards")
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.isdir(batches) and any(n.startswith("batch-") for n in os.listdir(batches)):
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return [n for n in os.listdir(batches) if n.startswith("batch-")]
