"""The module ``torch.export`` traces: image (and class) in, logits and saliency map out.

Its ``forward`` runs the saliency twin, picks the target logit and calls
``torch.autograd.grad`` inside ``torch.enable_grad()``; exported, that is one flat graph
holding the forward and the rule's backward. Run eagerly it is fastsal's eager saliency
pass (the reference the exported file is checked against).
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
import torch.nn as nn


class SaliencyGraph(nn.Module):
    """``forward(image[, target]) -> (logits, saliency)`` over a fastsal saliency twin.

    Args:
        twin: the output of :func:`fastsal.rewrite` (eval mode).
        reduce: a function of the raw input gradient ``(N, C, H, W)`` (e.g. ``max_c |g_c|``),
            or None for the raw gradient.
        given_target: whether ``forward`` takes a class index per image; otherwise each image's
            argmax is explained.
    """

    def __init__(self, twin: nn.Module, reduce: Optional[Callable[[torch.Tensor], torch.Tensor]], given_target: bool):
        super().__init__()
        self.twin = twin
        self.reduce = reduce
        self.given_target = bool(given_target)

    def forward(self, image: torch.Tensor, target: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        with torch.enable_grad():
            x = image.detach().requires_grad_(True)
            logits = self.twin(x)
            classes = target if self.given_target else logits.argmax(dim=1)
            # the target logits picked by a compare, not a gather: the backward of a gather
            # is a scatter, which some runtimes (TensorRT) lack
            picked = classes.reshape(-1, 1) == torch.arange(logits.shape[1], device=logits.device)
            seed = torch.where(picked, logits, 0.0).sum()
            (grad,) = torch.autograd.grad(seed, x)
        maps = grad if self.reduce is None else self.reduce(grad)
        return logits.detach(), maps.detach()


__all__ = ["SaliencyGraph"]
