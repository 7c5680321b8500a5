"""Faithfulness: RISE-style deletion and insertion curves and their AUC (Petsiuk et al. 2018).

The score is the softmax probability of each image's *original* top-1 class (the argmax of the
model's output on the unmodified image). Pixels are ranked by the map, most salient first (ties:
row-major order); at step ``k`` of ``steps`` the first ``round(k · H·W / steps)`` pixels (all
channels of each) are changed:

- **deletion**: they go to the baseline, zeros in the model's (normalized) input space; the
  curve starts at the original image and ends at the all-zero input;
- **insertion**: they are copied from the original into a blurred copy of the image (a Gaussian
  of σ = ``blur_sigma`` px per channel, default 0.05·max(H, W), :func:`scipy.ndimage.gaussian_filter`
  with ``mode="reflect"``; blurring the normalized tensor equals blurring the pixels, the
  normalization being affine per channel); the curve starts at the blurred image and ends at the
  original.

The ``steps + 1`` points lie on x = (pixels changed) / (H·W) in [0, 1], and the AUC is the
trapezoidal rule on that axis (:func:`numpy.trapezoid`, or SciPy's on NumPy < 2). A faithful map
gives a low deletion AUC and a high insertion AUC. All images × steps go through the model in
forwards of at most ``batch_size`` samples, under ``torch.no_grad``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

BLUR = 0.05
"""Default insertion blur σ as a fraction of the image's longer side (3.2 px at 64 px, 11.2 px at 224)."""


def _trapezoid():
    fn = getattr(np, "trapezoid", None)
    if fn is None:  # NumPy < 2
        from scipy.integrate import trapezoid as fn
    return fn


def auc(curves, x=None) -> np.ndarray:
    """Area under ``curves`` ``(..., K)`` by the trapezoidal rule; ``x`` defaults to ``linspace(0, 1, K)``."""
    y = np.asarray(curves, dtype=np.float64)
    if y.shape[-1] < 2:
        raise ValueError(f"a curve needs at least 2 points, got {y.shape[-1]}")
    if x is None:
        x = np.linspace(0.0, 1.0, y.shape[-1])
    return _trapezoid()(y, x=np.asarray(x, dtype=np.float64), axis=-1)


@dataclass
class CurveResult:
    """Deletion and insertion curves per image, their AUCs and the protocol used."""

    x: np.ndarray  # (steps + 1,) fraction of pixels changed, 0..1
    classes: np.ndarray  # (N,) the original top-1 class of each image
    deletion: np.ndarray  # (N, steps + 1) softmax probability of that class
    insertion: np.ndarray  # (N, steps + 1)
    deletion_auc: np.ndarray  # (N,)
    insertion_auc: np.ndarray  # (N,)
    steps: int
    blur_sigma: float  # pixels

    def summary(self) -> dict:
        """A JSON-ready dict: the protocol, the mean AUCs and the mean curves."""
        return {
            "steps": self.steps,
            "blur_sigma_px": self.blur_sigma,
            "n": int(len(self.classes)),
            "deletion_auc": float(self.deletion_auc.mean()) if len(self.classes) else float("nan"),
            "deletion_auc_std": float(self.deletion_auc.std()) if len(self.classes) else float("nan"),
            "insertion_auc": float(self.insertion_auc.mean()) if len(self.classes) else float("nan"),
            "insertion_auc_std": float(self.insertion_auc.std()) if len(self.classes) else float("nan"),
            "x": self.x.tolist(),
            "deletion_curve": self.deletion.mean(axis=0).tolist() if len(self.classes) else [],
            "insertion_curve": self.insertion.mean(axis=0).tolist() if len(self.classes) else [],
        }


def blur(inputs: torch.Tensor, sigma: float) -> torch.Tensor:
    """``inputs`` ``(N, C, H, W)`` blurred with a Gaussian of ``sigma`` px over H and W (SciPy, reflect)."""
    from scipy import ndimage

    if sigma < 0:
        raise ValueError(f"blur sigma must be >= 0, got {sigma}")
    if sigma == 0:
        return inputs.clone()
    arr = inputs.detach().cpu().double().numpy()
    out = ndimage.gaussian_filter(arr, sigma=(0, 0, sigma, sigma), mode="reflect")
    return torch.from_numpy(out).to(device=inputs.device, dtype=inputs.dtype)


def pixel_ranks(maps: torch.Tensor) -> torch.Tensor:
    """Rank of every pixel ``(N, H·W)``: 0 for the most salient (ties: row-major order)."""
    flat = maps.reshape(maps.shape[0], -1).float()
    flat = torch.where(torch.isfinite(flat), flat, torch.full_like(flat, -float("inf")))
    order = torch.argsort(-flat, dim=1, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(flat.shape[1], device=flat.device).expand_as(order).contiguous())
    return ranks


def _probabilities(model, batch: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    out = model(batch)
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise ValueError("the deletion/insertion score needs a model that returns logits (N, classes)")
    return torch.softmax(out.float(), dim=1).gather(1, classes[:, None])[:, 0]


def _curve(model, start: torch.Tensor, end: torch.Tensor, ranks, counts, classes, batch_size: int) -> np.ndarray:
    """Probabilities ``(N, K)``: at step k, pixels of rank < counts[k] come from ``end``, the rest from ``start``."""
    n, c, h, w = start.shape
    k = len(counts)
    total = n * k
    out = torch.empty(total, dtype=torch.float32)
    counts_t = torch.as_tensor(counts, device=start.device)
    for lo in range(0, total, batch_size):
        idx = torch.arange(lo, min(lo + batch_size, total), device=start.device)
        img, step = idx // k, idx % k
        take = (ranks[img] < counts_t[step][:, None]).view(-1, 1, h, w)
        batch = torch.where(take, end[img], start[img])
        out[lo:lo + len(idx)] = _probabilities(model, batch, classes[img]).cpu()
    return out.view(n, k).numpy().astype(np.float64)


def deletion_insertion(
    model: torch.nn.Module,
    inputs: torch.Tensor,
    maps=None,
    method="gradient",
    steps: int = 64,
    blur_sigma: Optional[float] = None,
    batch_size: int = 256,
    modes=("deletion", "insertion"),
) -> CurveResult:
    """RISE deletion and insertion curves of ``model`` on ``inputs`` ``(N, C, H, W)`` (normalized).

    Args:
        maps: ``(N, H, W)`` saliency maps at the inputs' size; None computes fastsal's
            ``max_c |g_c|`` map of each image's predicted class with ``method``.
        steps: the curves have ``steps + 1`` points (0 %, ..., 100 % of the pixels changed).
        blur_sigma: the insertion start's Gaussian σ in pixels; default 0.05·max(H, W).
        batch_size: the most samples (images × steps) per forward.
        modes: which curves to compute; one left out is returned as NaN.

    The model is run as given (put it in eval mode first) and never modified. See the
    module's docstring for the protocol.
    """
    if not isinstance(inputs, torch.Tensor) or inputs.dim() != 4:
        raise ValueError(f"inputs must be a tensor (N, C, H, W), got {getattr(inputs, 'shape', type(inputs))}")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    unknown = set(modes) - {"deletion", "insertion"}
    if unknown:
        raise ValueError(f"unknown modes {sorted(unknown)}; expected 'deletion' and/or 'insertion'")
    n, _, h, w = inputs.shape
    x = inputs.detach()
    if maps is None:
        from fastsal.saliency import saliency

        maps = saliency(model, x, target=None, method=method, reduce="abs_max")
    maps = torch.as_tensor(maps).to(x.device)
    if tuple(maps.shape) != (n, h, w):
        raise ValueError(f"maps must have shape (N, H, W) = {(n, h, w)}, got {tuple(maps.shape)}")
    sigma = BLUR * max(h, w) if blur_sigma is None else float(blur_sigma)
    counts = np.rint(np.linspace(0, h * w, steps + 1)).astype(np.int64)
    xs = counts / float(h * w)
    nan = np.full((n, steps + 1), np.nan)
    with torch.no_grad():
        classes = torch.cat([model(x[lo:lo + batch_size]).argmax(dim=1) for lo in range(0, n, batch_size)]) if n \
            else torch.zeros(0, dtype=torch.long, device=x.device)
        ranks = pixel_ranks(maps)
        deletion = insertion = nan
        if "deletion" in modes and n:
            deletion = _curve(model, x, torch.zeros_like(x), ranks, counts, classes, batch_size)
        if "insertion" in modes and n:
            insertion = _curve(model, blur(x, sigma), x, ranks, counts, classes, batch_size)
    return CurveResult(x=xs, classes=classes.cpu().numpy(), deletion=deletion, insertion=insertion,
                       deletion_auc=auc(deletion, xs), insertion_auc=auc(insertion, xs), steps=steps,
                       blur_sigma=sigma)


__all__ = ["BLUR", "CurveResult", "auc", "blur", "deletion_insertion", "pixel_ranks"]
