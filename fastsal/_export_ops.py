"""The ops' export mode: what ``torch.export`` records for ReLU and max-pool.

fastsal's eager ops keep packed bits and int8 switches whose shapes follow the kernels'
memory-order packing, behind ``torch.ops.fastsal`` operators no ONNX runtime knows. While
``torch.compiler.is_exporting()`` the ops in :mod:`fastsal.ops` call these instead: the same
forward values and the same rules, written with plain tensor ops that every runtime has:

* ReLU saves a bool mask ``x > 0`` (1 byte per element; nothing for DeconvNet) and its
  backward is ``where`` and ``relu``;
* max-pool saves torch's int64 pool indices; its backward unpools by comparing positions
  with the indices where stride equals the window (VGG: no scatter in the graph) and by a
  scatter-add (``ScatterElements`` with ``reduction="add"``) where windows overlap or skip
  positions. ONNX's ``MaxUnpool`` would overwrite where windows overlap, which is wrong;
* the fused ReLU → max-pool saves the indices and ``pooled > 0`` at pooled resolution;
* a stride-1 convolution's backward is a convolution with the flipped weight (runtimes run
  ``Conv`` faster than ``ConvTranspose``); strided ones keep the transposed convolution.

Eager fastsal never comes here, so its memory discipline is unchanged. An autograd Function
that saves its own forward output breaks ``torch.export`` ("a fake tensor in the exported
program constant's list"), so these save derived tensors only (a mask, the indices).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from fastsal._kernels.reference import (
    CLIPPED_RELU, DECONVNET, GRADIENT, GUIDED, LEAKY_RELU, NO_RULE, RELU, family_mask,
)


def _rule(grad: torch.Tensor, positive: Optional[torch.Tensor], rule: int, act: int = RELU, param: float = 0.0):
    """The rules of :mod:`fastsal.rules` as ``where`` and ``relu`` (no dtype views, no in-place):
    gradient ``where(m, R, d)``, deconvnet ``relu(R)``, guided the gradient's on ``relu(R)``,
    with ``d`` the local derivative where the mask is off: 0, or ``α·R`` for a LeakyReLU."""
    if rule == DECONVNET:
        return torch.relu(grad)
    if rule not in (GRADIENT, GUIDED):
        raise ValueError(f"unknown rule code {rule}")
    source = torch.relu(grad) if rule == GUIDED else grad
    off = source * param if act == LEAKY_RELU else 0.0
    # guided through a ReLU: where(m, relu(R), 0) == relu(where(m, R, 0)), eager's order
    return torch.where(positive, source, off)


class _ActivationFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, rule: int, act: int, param: float, forward_fn):
        ctx.rule, ctx.act, ctx.param = rule, act, param
        y = forward_fn(x)
        if rule != DECONVNET:
            # a mask derived from y, never y itself (see the module's note); from y, not x, for the
            # ReLU and clipped ReLU (the same mask), so the convolution before has one reader and a
            # runtime fuses it with the activation. A LeakyReLU with a negative slope is positive
            # where x is not: its mask reads x
            ctx.save_for_backward(family_mask(x if act == LEAKY_RELU else y, act, param))
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        positive = ctx.saved_tensors[0] if ctx.rule != DECONVNET else None
        return _rule(grad, positive, ctx.rule, ctx.act, ctx.param), None, None, None, None


def relu(x: torch.Tensor, rule: int) -> torch.Tensor:
    """``torch.relu(x)`` with the rule's backward; always out of place (the graph is functional)."""
    if not (x.requires_grad and torch.is_grad_enabled()):
        return torch.relu(x)
    return _ActivationFunction.apply(x, int(rule), RELU, 0.0, torch.relu)


def relu_family(x: torch.Tensor, rule: int, act: int, param: float) -> torch.Tensor:
    """The ReLU family (ReLU, clipped ReLU ``clamp(x, 0, m)``, LeakyReLU(α)) with the rule's backward."""
    if act == RELU:
        fn = torch.relu
    elif act == CLIPPED_RELU:
        def fn(t):
            return torch.clamp(t, 0.0, param)
    elif act == LEAKY_RELU:
        def fn(t):
            return F.leaky_relu(t, param)
    else:
        raise ValueError(f"unknown activation code {act}")
    if not (x.requires_grad and torch.is_grad_enabled()):
        return fn(x)
    return _ActivationFunction.apply(x, int(rule), int(act), float(param), fn)


# ----- max-pool -------------------------------------------------------------------------------------


def _compare_unpool(grad: torch.Tensor, index: torch.Tensor, h: int, w: int, kernel: Sequence[int]) -> torch.Tensor:
    """Unpool for windows that tile the input (stride == kernel, no padding or dilation): each
    input position takes its window's gradient where the window's index names it. Only
    broadcasts and one compare: no scatter, so runtimes without scatter-add run it too."""
    kh, kw = kernel
    oh, ow = grad.shape[-2:]

    def spread(t: torch.Tensor) -> torch.Tensor:  # (N, C, oh, ow) -> (N, C, oh*kh, ow*kw), nearest
        return t.unsqueeze(3).unsqueeze(5).expand(-1, -1, -1, kh, -1, kw).flatten(4, 5).flatten(2, 3)

    position = torch.arange(h * w, device=grad.device, dtype=index.dtype).view(h, w)[: oh * kh, : ow * kw]
    out = torch.where(spread(index) == position, spread(grad), 0.0)
    if oh * kh < h or ow * kw < w:  # floor mode leaves the last rows or columns out of every window
        out = F.pad(out, (0, w - ow * kw, 0, h - oh * kh))
    return out


def _scatter_unpool(grad: torch.Tensor, index: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Unpool for any windows: a scatter-add of each window's gradient onto its argmax, so
    positions several overlapping windows picked receive the sum."""
    flat = grad.new_zeros(grad.shape[0], grad.shape[1], h * w)
    return flat.scatter_add(2, index.flatten(2), grad.flatten(2)).view(grad.shape[0], grad.shape[1], h, w)


def tiles(kernel, stride, padding, dilation) -> bool:
    """Whether the windows tile the input, so the compare-based unpool applies."""
    return tuple(stride) == tuple(kernel) and tuple(padding) == (0, 0) and tuple(dilation) == (1, 1)


def _disjoint(kernel, stride, dilation) -> bool:
    return all(s >= d * (k - 1) + 1 for k, s, d in zip(kernel, stride, dilation))


class _MaxPool2dFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, kernel, stride, padding, dilation, ceil_mode, rule):
        # fused: pool relu(x), as eager fastsal does, so ties among clipped zeros pick the
        # first position, exactly as max_pool2d(relu(x))
        src = torch.relu(x) if rule != NO_RULE else x
        pooled, index = torch.ops.aten.max_pool2d_with_indices(src, kernel, stride, padding, dilation, ceil_mode)
        ctx.hw = (int(x.shape[-2]), int(x.shape[-1]))
        ctx.kernel, ctx.rule = tuple(kernel), rule
        ctx.compare = tiles(kernel, stride, padding, dilation) and not ceil_mode
        ctx.disjoint = _disjoint(kernel, stride, dilation)
        if rule in (GRADIENT, GUIDED):
            ctx.save_for_backward(index, pooled > 0)
        else:
            ctx.save_for_backward(index)
        return pooled

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        index = ctx.saved_tensors[0]
        rule = ctx.rule
        if rule in (GRADIENT, GUIDED):
            grad = torch.where(ctx.saved_tensors[1], grad, 0.0)
        # the rule applies to the unpooled sum (as eager fastsal's): relu after unpooling where
        # windows overlap, before it (at pooled resolution, cheaper, the same values) where not
        late_relu = rule in (DECONVNET, GUIDED) and not ctx.disjoint
        if rule in (DECONVNET, GUIDED) and not late_relu:
            grad = torch.relu(grad)
        h, w = ctx.hw
        if ctx.compare:
            out = _compare_unpool(grad, index, h, w, ctx.kernel)
        else:
            out = _scatter_unpool(grad, index, h, w)
        if late_relu:
            out = torch.relu(out)
        return out, None, None, None, None, None, None


# ----- convolution --------------------------------------------------------------------------------


def _flipped(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """The weight of the convolution that is a stride-1 convolution's input gradient: in and out
    channels swapped (within each group), kernel flipped."""
    out_ch, in_per_group, kh, kw = weight.shape
    w = weight.reshape(groups, out_ch // groups, in_per_group, kh, kw).transpose(1, 2)
    return w.reshape(groups * in_per_group, out_ch // groups, kh, kw).flip(2, 3)


class _Conv2dFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        ctx.conv = (tuple(x.shape[-2:]), tuple(stride), tuple(padding), tuple(dilation), int(groups))
        ctx.save_for_backward(weight)
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        (h, w), stride, padding, dilation, groups = ctx.conv
        kernel = weight.shape[-2:]
        weight = weight.to(grad.dtype)
        if stride == (1, 1) and all(p <= d * (k - 1) for p, d, k in zip(padding, dilation, kernel)):
            # a stride-1 convolution's input gradient is a convolution too: runtimes run Conv
            # (ONNX Runtime: about 1.5x faster than ConvTranspose on a CPU); the flipped
            # weight is a constant the exporter or the runtime folds
            pad = [d * (k - 1) - p for p, d, k in zip(padding, dilation, kernel)]
            grad_in = F.conv2d(grad, _flipped(weight, groups), None, 1, pad, dilation, groups)
            return grad_in, None, None, None, None, None, None
        out_pad = [
            size - ((g - 1) * s - 2 * p + d * (k - 1) + 1)
            for size, g, s, p, d, k in zip((h, w), grad.shape[-2:], stride, padding, dilation, kernel)
        ]
        grad_in = F.conv_transpose2d(grad, weight, None, stride, padding, out_pad, groups, dilation)
        return grad_in, None, None, None, None, None, None


def conv2d(x, weight, bias, stride, padding, dilation, groups: int) -> torch.Tensor:
    """4-D ``F.conv2d`` (explicit padding) whose backward is the input gradient alone: a
    convolution with the flipped weight at stride 1, a transposed convolution otherwise."""
    if not (x.requires_grad and torch.is_grad_enabled()):
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    return _Conv2dFunction.apply(x, weight, bias, tuple(stride), tuple(padding), tuple(dilation), int(groups))


def max_pool2d(x, kernel, stride, padding, dilation, ceil_mode: bool, rule: int) -> torch.Tensor:
    """4-D max-pool (``rule`` = -1) or fused ``max_pool2d(relu(x))`` with the rule's backward."""
    args = (list(kernel), list(stride), list(padding), list(dilation), bool(ceil_mode))
    if not (x.requires_grad and torch.is_grad_enabled()):
        src = torch.relu(x) if rule != NO_RULE else x
        return F.max_pool2d(src, *args)
    return _MaxPool2dFunction.apply(x, *args, int(rule))


__all__ = ["relu", "relu_family", "max_pool2d", "conv2d", "tiles"]
