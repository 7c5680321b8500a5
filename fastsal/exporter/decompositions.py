"""fastsal's decompositions for the two pooling backward ops torch has none for.

A saliency graph holds the backward of every layer. ``torch.export`` records average
pooling's as ``aten._adaptive_avg_pool2d_backward`` and ``aten.avg_pool2d_backward``, which
no ONNX function translates (VGG's 7×7 adaptive pool, DenseNet's transitions, Inception).
Both are linear maps with a fixed pattern, written here with ops every runtime has:

* adaptive average pooling's backward is ``A_h @ grad @ A_wᵀ`` (two ``MatMul``), with
  ``A[h, i] = 1 / |bin i|`` where bin i of the output covers input row h;
* average pooling's backward is a grouped transposed convolution of ``grad / divisor``
  with a kernel of ones (``ConvTranspose``), cropped to the input.

The bins and divisors are computed from ``arange`` of the (static) sizes, as torch's
kernels compute them, so they follow every padding, ``ceil_mode`` and
``count_include_pad`` torch allows; a runtime folds them into constants.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F

aten = torch.ops.aten


def _bin_matrix(size: int, out: int, like: torch.Tensor) -> torch.Tensor:
    """(size, out): 1 / |bin i| where output cell i's bin covers position h, as torch's adaptive pool."""
    h = torch.arange(size, device=like.device)[:, None]
    i = torch.arange(out, device=like.device)[None, :]
    start = (i * size) // out
    end = ((i + 1) * size + out - 1) // out
    inside = (h >= start) & (h < end)
    return inside.to(like.dtype) / (end - start).to(like.dtype)


def adaptive_avg_pool2d_backward(grad_output: torch.Tensor, self: torch.Tensor) -> torch.Tensor:
    """``aten._adaptive_avg_pool2d_backward`` as two matrix products."""
    h, w = self.shape[-2:]
    oh, ow = grad_output.shape[-2:]
    rows = _bin_matrix(h, oh, grad_output)  # (H, oh)
    cols = _bin_matrix(w, ow, grad_output)  # (W, ow)
    return torch.matmul(torch.matmul(rows, grad_output), cols.t())


def _divisor(size: int, out: int, k: int, s: int, p: int, count_pad: bool, like: torch.Tensor) -> torch.Tensor:
    """(out,): the positions each window counts along one axis, as torch's avg_pool2d."""
    start = torch.arange(out, device=like.device) * s - p
    end = torch.clamp(start + k, max=size + p)
    if count_pad:
        return end - start
    return torch.clamp(end, max=size) - torch.clamp(start, min=0)


def avg_pool2d_backward(
    grad_output: torch.Tensor,
    self: torch.Tensor,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    ceil_mode: bool,
    count_include_pad: bool,
    divisor_override: Optional[int] = None,
) -> torch.Tensor:
    """``aten.avg_pool2d_backward`` as a grouped transposed convolution with a kernel of ones."""
    kh, kw = (kernel_size[0], kernel_size[-1]) if len(kernel_size) else (1, 1)
    sh, sw = (stride[0], stride[-1]) if len(stride) else (kh, kw)
    ph, pw = (padding[0], padding[-1]) if len(padding) else (0, 0)
    unbatched = self.dim() == 3
    if unbatched:
        grad_output, self = grad_output.unsqueeze(0), self.unsqueeze(0)
    c, h, w = self.shape[-3:]
    oh, ow = grad_output.shape[-2:]
    if divisor_override:
        scaled = grad_output / divisor_override
    else:
        rows = _divisor(h, oh, kh, sh, ph, count_include_pad, grad_output)
        cols = _divisor(w, ow, kw, sw, pw, count_include_pad, grad_output)
        scaled = grad_output / (rows[:, None] * cols[None, :]).to(grad_output.dtype)
    ones = torch.ones((c, 1, kh, kw), dtype=grad_output.dtype, device=grad_output.device)
    # full[r + ph] is input row r: window i covers full rows i*sh .. i*sh + kh - 1
    full = F.conv_transpose2d(scaled, ones, stride=(sh, sw), groups=c)
    fh, fw = full.shape[-2:]
    if fh < ph + h or fw < pw + w:  # rows and columns no window reaches get no gradient
        full = F.pad(full, (0, max(0, pw + w - fw), 0, max(0, ph + h - fh)))
    out = full[:, :, ph:ph + h, pw:pw + w]
    return out.squeeze(0) if unbatched else out


def decompositions() -> Dict[torch._ops.OpOverload, object]:
    """fastsal's decompositions, keyed by the op they replace."""
    return {
        aten._adaptive_avg_pool2d_backward.default: adaptive_avg_pool2d_backward,
        aten.avg_pool2d_backward.default: avg_pool2d_backward,
    }


def decomposition_table() -> Dict[torch._ops.OpOverload, object]:
    """``torch.export.default_decompositions()`` plus fastsal's: for ``ExportedProgram.run_decompositions``."""
    table = torch.export.default_decompositions()
    table.update(decompositions())
    return table


__all__ = ["adaptive_avg_pool2d_backward", "avg_pool2d_backward", "decompositions", "decomposition_table"]
