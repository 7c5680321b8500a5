"""Autograd ops whose backward follows a saliency rule and keeps almost nothing.

* :func:`relu` keeps 1 bit per element (``f > 0``) for Gradient and Guided, nothing for DeconvNet.
* :func:`clipped_relu` (ReLU6, Hardtanh(0, m)) and :func:`leaky_relu` keep the same: 1 bit per
  element (``0 < f < m``, ``f > 0``), nothing for DeconvNet (the table in :mod:`fastsal.rules`).
* :func:`max_pool2d` keeps one int8 switch per pooled element.
* :func:`relu_max_pool2d` keeps the switches plus 1 bit per pooled element.
* :func:`conv2d` / :func:`linear` keep only the weight: their backward computes the input
  gradient alone (weights and biases get no gradient).

Forward outputs are bit-identical to torch's. None of these ops supports double backward.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import math
import numbers

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from torch.utils._python_dispatch import _get_current_dispatch_mode

from fastsal import _export_ops, _library  # noqa: F401  (_library registers torch.ops.fastsal.*)
from fastsal.backend import kernels_for
from fastsal._checks import IntOrPair, check_same_device, check_tensor, pair
from fastsal.rules import Activation, Rule, RuleLike, as_rule

_NO_RULE = -1
# int8 switches hold offsets 0..127
MAX_WINDOW = 127


def _layout(x: torch.Tensor):
    """Memory format the kernels walk x in; a non-dense x is copied into it once."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _dense(x: torch.Tensor, fmt) -> torch.Tensor:
    return x.contiguous(memory_format=fmt) if fmt is torch.channels_last else x.contiguous()


def _impl(t: torch.Tensor):
    """Where the ops' kernels are called: the launchers themselves in plain eager code, where
    the ``torch.library`` dispatch would only add tens of microseconds a call (a CPU step of
    a CNN makes hundreds); ``torch.ops.fastsal`` while torch.compile traces, for fake or
    other tensor subclasses, and under a dispatch mode, which must see the registered ops."""
    if type(t) is torch.Tensor and not torch.compiler.is_compiling() and _get_current_dispatch_mode() is None:
        return kernels_for(t)
    return torch.ops.fastsal


def _empty_bits(like: torch.Tensor) -> torch.Tensor:
    return like.new_empty(0, dtype=torch.uint8)


_RELU = Activation.RELU.code


def _relu_forward(x: torch.Tensor, store: bool, inplace: bool, act: int = _RELU, param: float = 0.0):
    """``(activation(x), its packed mask bits)``; in place, the first is ``x`` itself.
    ``act``/``param``: a row of the ReLU family (:class:`fastsal.Activation`); ReLU by default."""
    fmt = _layout(x)
    dense = x.is_contiguous(memory_format=fmt)
    if inplace and dense:
        impl = _impl(x)
        if act == _RELU:
            bits = impl.relu_forward_(x, store)
        else:
            bits = impl.relu_family_forward_(x, act, param, store)
        if impl is not torch.ops.fastsal:
            # a kernel writing through a pointer bumps no version counter; the registered
            # op (mutates_args) would have, so autograd can still catch a stale saved tensor
            torch.autograd.graph.increment_version(x)
        return x, bits
    x_dense = x if dense else _dense(x, fmt)
    if act == _RELU:
        y, bits = _impl(x).relu_forward(x_dense, store)
    else:
        y, bits = _impl(x).relu_family_forward(x_dense, act, param, store)
    if inplace:  # a strided view: computed out of place, written back through the view
        return x.copy_(y), bits
    return y, bits


class _ReLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, rule_code: int, inplace: bool):
        store = rule_code != Rule.DECONVNET.code and ctx.needs_input_grad[0]
        ctx.rule_code = rule_code
        ctx.fmt = _layout(x)
        y, bits = _relu_forward(x, store, inplace)
        ctx.save_for_backward(bits)
        if inplace:
            ctx.mark_dirty(x)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (bits,) = ctx.saved_tensors
        grad = _dense(grad, ctx.fmt)
        grad_in = _impl(grad).relu_backward(grad, bits, ctx.rule_code)
        return grad_in, None, None


def relu(x: torch.Tensor, rule: RuleLike, inplace: bool = False) -> torch.Tensor:
    """``torch.relu(x)`` whose backward applies ``rule`` (``"gradient"``, ``"deconvnet"``, ``"guided"``)."""
    rule = as_rule(rule)
    check_tensor(x, "x")
    if torch.compiler.is_exporting():  # bool masks and plain ops in the graph, out of place
        return _export_ops.relu(x, rule.code)
    if not (x.requires_grad and torch.is_grad_enabled()):
        # no backward will come: the forward alone, with no mask (and no autograd.Function,
        # whose in-place mark_dirty would break a torch.compile graph)
        return _relu_forward(x, False, bool(inplace))[0]
    return _ReLUFunction.apply(x, rule.code, bool(inplace))


class _ReLUFamilyFunction(torch.autograd.Function):
    """A clipped ReLU or a LeakyReLU (``act``, with its scalar ``param``) under a rule."""

    @staticmethod
    def forward(ctx, x, rule_code: int, act: int, param: float, inplace: bool):
        store = rule_code != Rule.DECONVNET.code and ctx.needs_input_grad[0]
        ctx.rule_code, ctx.act, ctx.param = rule_code, act, param
        ctx.fmt = _layout(x)
        y, bits = _relu_forward(x, store, inplace, act, param)
        ctx.save_for_backward(bits)
        if inplace:
            ctx.mark_dirty(x)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (bits,) = ctx.saved_tensors
        grad = _dense(grad, ctx.fmt)
        grad_in = _impl(grad).relu_family_backward(grad, bits, ctx.rule_code, ctx.act, ctx.param)
        return grad_in, None, None, None, None


def _scalar(value, name: str, example: str) -> float:
    """``value`` as a Python float, or a ValueError that says what was expected."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number such as {example}, got {value!r} ({type(value).__name__})")
    return float(value)


def _relu_family(x, rule, act: int, param: float, inplace) -> torch.Tensor:
    rule = as_rule(rule)
    check_tensor(x, "x")
    if torch.compiler.is_exporting():  # bool masks and plain ops in the graph, out of place
        return _export_ops.relu_family(x, rule.code, act, param)
    if not (x.requires_grad and torch.is_grad_enabled()):
        return _relu_forward(x, False, bool(inplace), act, param)[0]
    return _ReLUFamilyFunction.apply(x, rule.code, act, param, bool(inplace))


def clipped_relu(x: torch.Tensor, rule: RuleLike, max_value: float, inplace: bool = False) -> torch.Tensor:
    """``F.hardtanh(x, 0, max_value)`` (``F.relu6`` for 6; ``torch.clamp(x, 0, max_value)``) whose
    backward applies ``rule``: gradient ``R·[0<f<m]``, deconvnet ``relu(R)``, guided
    ``R·[0<f<m]·[R>0]``. Keeps 1 bit per element (``0 < f < m``), nothing for DeconvNet."""
    m = _scalar(max_value, "max_value", "6.0")
    if not m > 0:  # NaN too
        raise ValueError(
            f"max_value must be > 0 (a clipped ReLU clamps to [0, max_value]), got {max_value!r}; "
            "a Hardtanh whose bounds are not (0, m) with m > 0 is not ReLU-like"
        )
    return _relu_family(x, rule, Activation.CLIPPED_RELU.code, m, inplace)


def leaky_relu(x: torch.Tensor, rule: RuleLike, negative_slope: float = 0.01, inplace: bool = False) -> torch.Tensor:
    """``F.leaky_relu(x, negative_slope)`` whose backward applies ``rule``: gradient
    ``R·(f>0 ? 1 : α)``, deconvnet ``relu(R)``, guided ``R·(f>0 ? 1 : α)·[R>0]``. Keeps 1 bit
    per element (``f > 0``), nothing for DeconvNet. Any finite slope, negative or above 1 too."""
    alpha = _scalar(negative_slope, "negative_slope", "0.01")
    if not math.isfinite(alpha):
        raise ValueError(f"negative_slope must be finite, got {negative_slope!r}")
    return _relu_family(x, rule, Activation.LEAKY_RELU.code, alpha, inplace)


def _pool_args(x, kernel_size, stride, padding, dilation):
    check_tensor(x, "x", dims=(3, 4))
    k = pair(kernel_size, "kernel_size", minimum=1)
    s = k if stride is None or (isinstance(stride, (list, tuple)) and len(stride) == 0) else pair(stride, "stride", minimum=1)
    p = pair(padding, "padding", minimum=0)
    d = pair(dilation, "dilation", minimum=1)
    if k[0] * k[1] > MAX_WINDOW:
        raise ValueError(
            f"a pooling window of {k[0]}x{k[1]} = {k[0] * k[1]} positions is too large: fastsal stores the "
            f"argmax in an int8 switch, so windows may have at most {MAX_WINDOW} positions; "
            "use torch.nn.functional.max_pool2d for this layer"
        )
    if p[0] > k[0] // 2 or p[1] > k[1] // 2:
        raise ValueError(f"padding {p} must be at most half the kernel size {k}, as in torch.nn.functional.max_pool2d")
    return k, s, p, d


class _MaxPool2dFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, kernel, stride, padding, dilation, ceil_mode, rule_code):
        fused = rule_code != _NO_RULE
        store = fused and rule_code != Rule.DECONVNET.code and ctx.needs_input_grad[0]
        channels_last = _layout(x) is torch.channels_last
        pooled, switches, bits = _impl(x).max_pool2d_forward(
            x, list(kernel), list(stride), list(padding), list(dilation), ceil_mode, fused, store
        )
        ctx.args = (list(x.shape), list(kernel), list(stride), list(padding), list(dilation), channels_last)
        ctx.rule_code = rule_code
        ctx.save_for_backward(switches, bits)
        return pooled

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        switches, bits = ctx.saved_tensors
        shape, kernel, stride, padding, dilation, channels_last = ctx.args
        grad_in = _impl(grad).max_pool2d_backward(
            grad, switches, bits, ctx.rule_code, shape, kernel, stride, padding, dilation, channels_last
        )
        return grad_in, None, None, None, None, None, None


def _pool(x, rule_code, kernel_size, stride, padding, dilation, ceil_mode):
    k, s, p, d = _pool_args(x, kernel_size, stride, padding, dilation)
    unbatched = x.dim() == 3
    if unbatched:
        x = x.unsqueeze(0)
    if torch.compiler.is_exporting():  # torch's int64 indices and plain ops in the graph
        out = _export_ops.max_pool2d(x, k, s, p, d, bool(ceil_mode), rule_code)
    else:
        out = _MaxPool2dFunction.apply(x, k, s, p, d, bool(ceil_mode), rule_code)
    return out.squeeze(0) if unbatched else out


def max_pool2d(
    x: torch.Tensor,
    kernel_size: IntOrPair,
    stride: Optional[IntOrPair] = None,
    padding: IntOrPair = 0,
    dilation: IntOrPair = 1,
    ceil_mode: bool = False,
) -> torch.Tensor:
    """``F.max_pool2d`` (3-D or 4-D input) whose backward unpools through int8 switches."""
    return _pool(x, _NO_RULE, kernel_size, stride, padding, dilation, ceil_mode)


def relu_max_pool2d(
    x: torch.Tensor,
    rule: RuleLike,
    kernel_size: IntOrPair,
    stride: Optional[IntOrPair] = None,
    padding: IntOrPair = 0,
    dilation: IntOrPair = 1,
    ceil_mode: bool = False,
) -> torch.Tensor:
    """``max_pool2d(relu(x, rule), ...)`` in one pass; the full-resolution ReLU mask is never stored."""
    rule = as_rule(rule)
    return _pool(x, rule.code, kernel_size, stride, padding, dilation, ceil_mode)


class _Conv2dInputGradFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        ctx.conv = (list(x.shape), stride, padding, dilation, groups)
        ctx.save_for_backward(weight)
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        shape, stride, padding, dilation, groups = ctx.conv
        grad_in = None
        if ctx.needs_input_grad[0]:
            # the transposed convolution, told the input size through output_padding: unlike
            # torch.nn.grad.conv2d_input it needs no stand-in input tensor (which sends the CPU
            # to a slow path) and allocates nothing but the result
            out_pad = [
                shape[2 + i] - ((grad.shape[2 + i] - 1) * stride[i] - 2 * padding[i] + dilation[i] * (weight.shape[2 + i] - 1) + 1)
                for i in range(2)
            ]
            # under autocast the forward ran in half precision while the saved weight is fp32
            grad_in = F.conv_transpose2d(grad, weight.to(grad.dtype), None, stride, padding, out_pad, groups, dilation)
        return grad_in, None, None, None, None, None, None


def _same_padding(weight_hw: Sequence[int], dilation) -> list:
    """(left, right, top, bottom) padding torch uses for padding='same'."""
    pads = []
    for k, d in zip(reversed(weight_hw), reversed(dilation)):
        total = d * (k - 1)
        pads += [total // 2, total - total // 2]
    return pads


def conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    stride: IntOrPair = 1,
    padding: Union[IntOrPair, str] = 0,
    dilation: IntOrPair = 1,
    groups: int = 1,
) -> torch.Tensor:
    """``F.conv2d`` whose backward computes only the input gradient and saves only the weight."""
    check_tensor(x, "x", dims=(3, 4))
    check_tensor(weight, "weight", dims=(4,))
    check_same_device(x=x, weight=weight, bias=bias)
    s = pair(stride, "stride", minimum=1)
    d = pair(dilation, "dilation", minimum=1)
    if isinstance(padding, str):
        if padding == "valid":
            p = (0, 0)
        elif padding == "same":
            if s != (1, 1):
                raise ValueError("padding='same' is not supported for strided convolutions (as in torch)")
            lrtb = _same_padding(weight.shape[-2:], d)
            if lrtb[0] != lrtb[1] or lrtb[2] != lrtb[3]:
                # asymmetric 'same' padding: pad explicitly (F.pad saves nothing), then convolve
                x = F.pad(x, lrtb)
                p = (0, 0)
            else:
                p = (lrtb[2], lrtb[0])
        else:
            raise ValueError(f"padding must be an int, a pair, 'valid' or 'same', got {padding!r}")
    else:
        p = pair(padding, "padding", minimum=0)
    unbatched = x.dim() == 3
    if unbatched:
        x = x.unsqueeze(0)
    if torch.compiler.is_exporting():  # a stride-1 backward as a convolution (fastsal._export_ops)
        out = _export_ops.conv2d(x, weight, bias, s, p, d, int(groups))
    else:
        out = _Conv2dInputGradFunction.apply(x, weight, bias, s, p, d, int(groups))
    return out.squeeze(0) if unbatched else out


class _LinearInputGradFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(weight)
        return F.linear(x, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        # under autocast the forward ran in half precision while the saved weight is fp32
        grad_in = grad.matmul(weight.to(grad.dtype)) if ctx.needs_input_grad[0] else None
        return grad_in, None, None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear`` whose backward computes only the input gradient and saves only the weight."""
    check_tensor(x, "x")
    check_tensor(weight, "weight", dims=(2,))
    check_same_device(x=x, weight=weight, bias=bias)
    if x.dim() == 0 or x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"x's last dimension ({x.shape[-1] if x.dim() else 'none'}) must equal weight's in_features ({weight.shape[1]})"
        )
    return _LinearInputGradFunction.apply(x, weight, bias)


__all__ = ["relu", "clipped_relu", "leaky_relu", "max_pool2d", "relu_max_pool2d", "conv2d", "linear", "MAX_WINDOW"]
