"""Small helpers shared by the kernel and op tests."""

from __future__ import annotations

import torch


def rel_l2(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Relative L2 error, computed in float64; 0 when both are zero."""
    a, e = actual.double(), expected.double()
    denom = e.norm()
    diff = (a - e).norm()
    if denom == 0:
        return float(diff)
    return float(diff / denom)


def first_mismatches(actual: torch.Tensor, expected: torch.Tensor, atol: float = 0.0, k: int = 5) -> str:
    """A readable list of the first positions where two tensors differ."""
    a, e = actual.double(), expected.double()
    bad = ~torch.isclose(a, e, atol=atol, rtol=0, equal_nan=True)
    where = bad.nonzero()[:k]
    rows = [f"{tuple(i.tolist())}: got {a[tuple(i)].item()!r}, expected {e[tuple(i)].item()!r}" for i in where]
    return f"{int(bad.sum())} mismatches; first: " + "; ".join(rows)


def layouts(x: torch.Tensor):
    """(name, tensor) for the memory layouts a 4-D activation can arrive in."""
    yield "contiguous", x.contiguous()
    yield "channels_last", x.contiguous(memory_format=torch.channels_last)
    # a strided view: every other channel of a tensor twice as wide
    wide = torch.repeat_interleave(x, 2, dim=1)
    yield "non_contiguous", wide[:, ::2]


TOLERANCES = {
    torch.float32: 1e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 2e-2,
}
