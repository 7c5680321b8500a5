"""Shared test setup.

On a machine without CUDA the Triton kernels run in the interpreter, which Triton reads
when a kernel is decorated: TRITON_INTERPRET must be set before fastsal's kernel modules
are imported, so it is set here, before any test module imports them.
"""

import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# tests/ on sys.path so test files can share `models.py` and `helpers` modules
sys.path.insert(0, os.path.dirname(__file__))

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (run benchmarks/gpu_check.sh on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
