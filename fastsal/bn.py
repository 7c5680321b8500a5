"""Eval-mode BatchNorm for saliency: fold it into the preceding convolution, or run it as
a per-channel affine map whose backward needs no activation.

In eval mode BatchNorm is ``y = x * scale + shift`` per channel, so its input gradient is
``grad * scale``: autograd's own batch_norm keeps the whole input tensor for that, we keep
only the ``C`` scale values.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable


def eval_scale_shift(
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    eps: float,
    dtype: torch.dtype = torch.float64,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The per-channel (scale, shift) an eval BatchNorm applies, computed in ``dtype``."""
    scale = (running_var.to(dtype) + eps).rsqrt()
    if weight is not None:
        scale = scale * weight.to(dtype)
    shift = -running_mean.to(dtype) * scale
    if bias is not None:
        shift = shift + bias.to(dtype)
    return scale, shift


class _EvalBatchNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, running_mean, running_var, weight, bias, eps):
        # the forward is torch's own kernel, so outputs are bit-identical to the original
        out = F.batch_norm(x, running_mean, running_var, weight, bias, False, 0.0, eps)
        scale = (running_var + eps).rsqrt()
        if weight is not None:
            scale = scale * weight
        ctx.save_for_backward(scale.to(x.dtype))
        ctx.channel_dim_view = [1, -1] + [1] * (x.dim() - 2)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (scale,) = ctx.saved_tensors
        grad_in = grad * scale.view(ctx.channel_dim_view) if ctx.needs_input_grad[0] else None
        return grad_in, None, None, None, None, None


def eval_batch_norm(
    x: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """``F.batch_norm(..., training=False)`` whose backward keeps only the per-channel scale."""
    if x.dim() < 2:
        raise ValueError(f"batch_norm expects at least 2-D input (N, C, ...), got shape {tuple(x.shape)}")
    return _EvalBatchNormFunction.apply(x, running_mean, running_var, weight, bias, float(eps))


def fold_into_conv(
    conv_weight: torch.Tensor,
    conv_bias: Optional[torch.Tensor],
    bn: torch.nn.modules.batchnorm._BatchNorm,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of the convolution ``bn(conv(x))`` in eval mode, computed in float64.

    These are the only weight copies a rewrite makes: one per folded BatchNorm.
    """
    scale, shift = eval_scale_shift(bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
    weight = conv_weight.detach().to(torch.float64) * scale.view(-1, *([1] * (conv_weight.dim() - 1)))
    bias = shift if conv_bias is None else conv_bias.detach().to(torch.float64) * scale + shift
    return weight.to(conv_weight.dtype), bias.to(conv_weight.dtype)
