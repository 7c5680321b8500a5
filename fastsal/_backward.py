"""The backward passes of a saliency step: one class per sample, or K classes per sample.

K classes (``classes`` of shape ``(N, K)``) take K backward passes through one forward's
graph, retained for all but the last; each gradient is reduced as soon as it exists, so at
most one raw input gradient is alive at a time. The maps are stacked to ``(N, K, ...)``.

Why not one batched backward (``torch.autograd.grad(..., is_grads_batched=True)``): it runs
the backward under ``vmap``, which the int8-switch max-pool backward of the plain-torch path
refuses (an ``out=`` aten call has no batching rule) and which the Triton ops would need
vmap rules for; on a ResNet-50 without its max-pool, where it does run, it was 28 % slower
on a 2-core CPU (K = 5, batch 4, 112 px: 1.40 s against 1.09 s for the K passes, median of
5), and it keeps K gradients of every layer alive at once.
"""

from __future__ import annotations

import torch

from fastsal.reductions import Reduction, apply_reduction


def _grad(seed: torch.Tensor, x: torch.Tensor, retain: bool) -> torch.Tensor:
    if not seed.requires_grad:  # the logits do not depend on the input
        return torch.zeros_like(x)
    return torch.autograd.grad(seed, x, retain_graph=retain)[0]


def maps_of(logits: torch.Tensor, classes: torch.Tensor, x: torch.Tensor, reduce: Reduction) -> torch.Tensor:
    """The reduced input gradients of ``logits[i, classes[i]]`` (``(N,)``) or of each column of
    ``classes`` (``(N, K)``: K backward passes, maps ``(N, K, ...)``)."""
    if classes.dim() == 1:
        return apply_reduction(_grad(logits.gather(1, classes[:, None]).sum(), x, False), reduce)
    k = classes.shape[1]
    maps = [
        apply_reduction(_grad(logits.gather(1, classes[:, j : j + 1]).sum(), x, j < k - 1), reduce) for j in range(k)
    ]
    return torch.stack(maps, dim=1)


__all__ = ["maps_of"]
