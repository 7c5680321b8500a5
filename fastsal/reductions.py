"""Reductions: from the raw input gradient ``(N, C, H, W)`` to the map people look at.

``"abs_max"`` is Simonyan et al.'s saliency map, ``max_c |g_c|``, of shape ``(N, H, W)``.
``None`` keeps the raw gradient. The channel dimension is dim 1, whatever the memory layout.
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch

Reduction = Union[None, str, Callable[[torch.Tensor], torch.Tensor]]


def _abs_max(g: torch.Tensor) -> torch.Tensor:
    return g.abs().amax(dim=1)


def _abs_sum(g: torch.Tensor) -> torch.Tensor:
    return g.abs().sum(dim=1)


def _l2(g: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(g, dim=1)


def _max(g: torch.Tensor) -> torch.Tensor:
    return g.amax(dim=1)


def _sum(g: torch.Tensor) -> torch.Tensor:
    return g.sum(dim=1)


def _abs(g: torch.Tensor) -> torch.Tensor:
    return g.abs()


REDUCTIONS = {
    "abs_max": _abs_max,  # Simonyan: max over channels of |g|
    "abs_sum": _abs_sum,  # L1 over channels
    "l2": _l2,  # Euclidean norm over channels
    "max": _max,  # signed max over channels (positive evidence only)
    "sum": _sum,  # signed sum over channels
    "abs": _abs,  # |g|, channels kept (Captum's Saliency with abs=True)
}

# reductions that keep the channel dimension (they work on any input shape)
_KEEPS_CHANNELS = {"abs"}


def get_reduction(reduce: Reduction) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
    """The function for ``reduce`` (``None``/``"none"`` -> ``None``: keep the raw gradient)."""
    if reduce is None:
        return None
    if callable(reduce):
        return reduce
    if isinstance(reduce, str):
        key = reduce.strip().lower()
        if key in ("none", "raw"):
            return None
        if key in REDUCTIONS:
            return REDUCTIONS[key]
    valid = ", ".join(repr(k) for k in REDUCTIONS)
    raise ValueError(f"unknown reduce {reduce!r}: expected None, one of {valid}, or a callable")


def apply_reduction(grad: torch.Tensor, reduce: Reduction) -> torch.Tensor:
    """Reduce one input's gradient; channel reductions need a ``(N, C, ...)`` gradient."""
    fn = get_reduction(reduce)
    if fn is None:
        return grad
    if isinstance(reduce, str) and reduce.strip().lower() not in _KEEPS_CHANNELS and grad.dim() < 3:
        raise ValueError(
            f"reduce={reduce!r} reduces over the channel dimension (dim 1) of an (N, C, H, W) input, but the "
            f"input has shape {tuple(grad.shape)}; use reduce=None for the raw gradient"
        )
    return fn(grad)


__all__ = ["REDUCTIONS", "Reduction", "get_reduction", "apply_reduction"]
