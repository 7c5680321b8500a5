"""pytest-benchmark micro-benchmarks of fastsal's ops against their eager-torch equivalents
(forward + backward of one op on one activation), on whatever device is present.

    python -m pytest benchmarks/test_ops_benchmark.py --benchmark-only --benchmark-columns=median,iqr

Not part of the test suite (pytest's testpaths is tests/); compare rows within one run.
"""

import pytest
import torch
import torch.nn.functional as F

from fastsal import ops

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPE = (8, 64, 56, 56)


def _step(fn):
    x = torch.randn(SHAPE, device=DEVICE).contiguous(memory_format=torch.channels_last).requires_grad_(True)

    def run():
        out = fn(x)
        out.backward(torch.ones_like(out))
        x.grad = None
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    return run


class _GuidedReLU(torch.autograd.Function):
    """What a hook-based tool does: torch.relu forward, the full input saved, the rule in Python."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.relu(x)

    @staticmethod
    def backward(ctx, r):
        (f,) = ctx.saved_tensors
        return torch.where((f > 0) & (r > 0), r, torch.zeros_like(r))


CASES = {
    "fastsal.relu guided": lambda x: ops.relu(x, "guided"),
    "torch relu + guided hook": lambda x: _GuidedReLU.apply(x),
    "torch relu (plain gradient)": lambda x: torch.relu(x),
    "fastsal.relu_max_pool2d guided": lambda x: ops.relu_max_pool2d(x, "guided", 2),
    "torch relu + max_pool2d": lambda x: F.max_pool2d(torch.relu(x), 2),
    "fastsal.max_pool2d 3x3/2": lambda x: ops.max_pool2d(x, 3, 2, 1),
    "torch max_pool2d 3x3/2": lambda x: F.max_pool2d(x, 3, 2, 1),
}


@pytest.mark.parametrize("name", list(CASES))
def test_forward_backward(benchmark, name):
    benchmark.group = "relu" if "pool" not in name else ("relu+pool" if "relu" in name else "pool")
    benchmark(_step(CASES[name]))
