"""Replacement modules the rewriting pass swaps in, each with a ``from_<original>`` constructor.

The conv, linear, pool and batch-norm replacements subclass the torch module they replace
and take over its attributes (and its parameter tensors) as they are, so state-dict keys,
``isinstance`` checks and printing stay the same; only ``forward`` changes, to fastsal's ops.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastsal import ops, smooth
from fastsal.bn import eval_batch_norm, fold_into_conv
from fastsal.rules import Rule, RuleLike, as_rule


def _adopt(cls, original: nn.Module) -> nn.Module:
    """A ``cls`` instance holding ``original``'s attributes (same parameter tensors, no copy)."""
    new = cls.__new__(cls)
    new.__dict__.update(original.__dict__)
    for name in ("_parameters", "_buffers", "_modules"):
        new.__dict__[name] = dict(original.__dict__[name])
    return new


class SaliencyReLU(nn.Module):
    """``nn.ReLU`` whose backward applies a saliency rule and keeps at most 1 bit per element."""

    def __init__(self, rule: RuleLike, inplace: bool = False):
        super().__init__()
        self.rule = as_rule(rule)
        self.inplace = bool(inplace)

    @classmethod
    def from_relu(cls, relu: nn.ReLU, rule: RuleLike) -> "SaliencyReLU":
        new = cls(rule, relu.inplace)
        new.training = relu.training
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.relu(x, self.rule, inplace=self.inplace)

    def extra_repr(self) -> str:
        return f"rule={self.rule}" + (", inplace=True" if self.inplace else "")


class SaliencyClippedReLU(nn.Module):
    """``nn.ReLU6`` / ``nn.Hardtanh(0, max_value)`` whose backward applies a saliency rule (1 bit per element).

    Not fused with a following max-pool: clipping makes ties at ``max_value``, and the switch of
    a pool after the clip then differs from the one a pool before it would pick.
    """

    def __init__(self, rule: RuleLike, max_value: float = 6.0, inplace: bool = False):
        super().__init__()
        self.rule = as_rule(rule)
        self.max_value = float(max_value)
        self.inplace = bool(inplace)

    @classmethod
    def from_hardtanh(cls, module: nn.Hardtanh, rule: RuleLike) -> "SaliencyClippedReLU":
        """From an ``nn.Hardtanh`` whose ``min_val`` is 0 (``nn.ReLU6`` is one)."""
        if module.min_val != 0:
            raise ValueError(f"a Hardtanh with min_val={module.min_val} is not a clipped ReLU (min_val must be 0)")
        new = cls(rule, module.max_val, module.inplace)
        new.training = module.training
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.clipped_relu(x, self.rule, self.max_value, inplace=self.inplace)

    def extra_repr(self) -> str:
        return f"rule={self.rule}, max_value={self.max_value:g}" + (", inplace=True" if self.inplace else "")


class SaliencyLeakyReLU(nn.Module):
    """``nn.LeakyReLU`` whose backward applies a saliency rule (1 bit per element)."""

    def __init__(self, rule: RuleLike, negative_slope: float = 0.01, inplace: bool = False):
        super().__init__()
        self.rule = as_rule(rule)
        self.negative_slope = float(negative_slope)
        self.inplace = bool(inplace)

    @classmethod
    def from_leaky_relu(cls, module: nn.LeakyReLU, rule: RuleLike) -> "SaliencyLeakyReLU":
        new = cls(rule, module.negative_slope, module.inplace)
        new.training = module.training
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.leaky_relu(x, self.rule, self.negative_slope, inplace=self.inplace)

    def extra_repr(self) -> str:
        return f"rule={self.rule}, negative_slope={self.negative_slope:g}" + (", inplace=True" if self.inplace else "")


# torch's smooth activation modules -> (row of fastsal.smooth.ACTIVATIONS, the module's parameters)
SMOOTH_MODULES = {
    nn.SiLU: lambda m: ("silu", ()),
    nn.GELU: lambda m: ("gelu", (m.approximate,)),
    nn.Hardswish: lambda m: ("hardswish", ()),
    nn.Mish: lambda m: ("mish", ()),
    nn.ELU: lambda m: ("elu", (float(m.alpha),)),
    nn.CELU: lambda m: ("celu", (float(m.alpha),)),
    nn.SELU: lambda m: ("selu", ()),
    nn.Softplus: lambda m: ("softplus", (m.beta, m.threshold)),
}


class SaliencyActivation(nn.Module):
    """A smooth activation (SiLU, GELU, ...) whose backward applies a saliency rule; keeps its input
    (see :mod:`fastsal.smooth`). Made by ``rewrite(..., activations="all")``."""

    def __init__(self, rule: RuleLike, name: str, params: tuple = (), inplace: bool = False):
        super().__init__()
        if name not in smooth.ACTIVATIONS:
            raise ValueError(f"no smooth-activation rule named {name!r}; known: {', '.join(sorted(smooth.ACTIVATIONS))}")
        self.rule = as_rule(rule)
        self.name = name
        self.params = tuple(params)
        self.inplace = bool(inplace)

    @classmethod
    def from_module(cls, module: nn.Module, rule: RuleLike) -> "SaliencyActivation":
        name, params = SMOOTH_MODULES[type(module)](module)
        new = cls(rule, name, params, getattr(module, "inplace", False))
        new.training = module.training
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return smooth.activation(x, self.rule, self.name, self.params, inplace=self.inplace)

    def extra_repr(self) -> str:
        params = "".join(f", {p}" for p in self.params)
        return f"{self.name}{params}, rule={self.rule}" + (", inplace=True" if self.inplace else "")


class FusedReLU(nn.Identity):
    """Where a ReLU was: it now runs inside the max-pool that follows it (``fused_into``)."""

    def __init__(self, fused_into: str):
        super().__init__()
        self.fused_into = fused_into

    def extra_repr(self) -> str:
        return f"fused into {self.fused_into}"


class SaliencyMaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` whose backward unpools through int8 switches."""

    @classmethod
    def from_max_pool2d(cls, pool: nn.MaxPool2d) -> "SaliencyMaxPool2d":
        return _adopt(cls, pool)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.max_pool2d(x, self.kernel_size, self.stride, self.padding, self.dilation, self.ceil_mode)


class SaliencyReLUMaxPool2d(nn.MaxPool2d):
    """``max_pool2d(relu(x))`` as one op: the full-resolution ReLU mask is never stored."""

    rule: Rule

    @classmethod
    def from_max_pool2d(cls, pool: nn.MaxPool2d, rule: RuleLike) -> "SaliencyReLUMaxPool2d":
        new = _adopt(cls, pool)
        new.rule = as_rule(rule)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.relu_max_pool2d(
            x, self.rule, self.kernel_size, self.stride, self.padding, self.dilation, self.ceil_mode
        )

    def extra_repr(self) -> str:
        return f"relu rule={self.rule}, " + super().extra_repr()


def pool_supported(pool: nn.MaxPool2d) -> str | None:
    """None if fastsal's pool can replace ``pool``, else why not."""
    if pool.return_indices:
        return "returns indices (the caller may unpool with them)"
    k = pool.kernel_size if isinstance(pool.kernel_size, (tuple, list)) else (pool.kernel_size, pool.kernel_size)
    if k[0] * k[1] > ops.MAX_WINDOW:
        return f"window of {k[0] * k[1]} positions exceeds the int8 switch limit ({ops.MAX_WINDOW})"
    return None


class SaliencyConv2d(nn.Conv2d):
    """``nn.Conv2d`` whose backward computes only the input gradient and keeps only the weight."""

    folded_batch_norm: str = ""

    @classmethod
    def from_conv2d(cls, conv: nn.Conv2d) -> "SaliencyConv2d":
        return _adopt(cls, conv)

    @classmethod
    def from_conv2d_and_batch_norm(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d, bn_name: str) -> "SaliencyConv2d":
        """``bn(conv(x))`` in eval mode as one convolution (new weight and bias tensors)."""
        new = _adopt(cls, conv)
        weight, bias = fold_into_conv(conv.weight, conv.bias, bn)
        new.weight = nn.Parameter(weight, requires_grad=False)
        new.bias = nn.Parameter(bias, requires_grad=False)
        new.folded_batch_norm = bn_name
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.folded_batch_norm and self.training:
            raise RuntimeError(
                f"this convolution has the eval-mode BatchNorm {self.folded_batch_norm!r} folded into it, "
                "so it cannot run in training mode; call .eval() on the rewritten model, or rewrite the model in training mode"
            )
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return ops.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)
        return ops.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        folded = f", batch_norm folded in: {self.folded_batch_norm}" if self.folded_batch_norm else ""
        return super().extra_repr() + folded


class FoldedBatchNorm2d(nn.Identity):
    """Where an eval-mode BatchNorm was: it is now part of the convolution ``folded_into``."""

    def __init__(self, folded_into: str):
        super().__init__()
        self.folded_into = folded_into

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            raise RuntimeError(
                f"this BatchNorm was folded into {self.folded_into!r} for eval mode and cannot run in training "
                "mode; call .eval() on the rewritten model, or rewrite the model in training mode"
            )
        return x

    def extra_repr(self) -> str:
        return f"folded into {self.folded_into}"


class SaliencyBatchNorm2d(nn.BatchNorm2d):
    """Eval-mode ``nn.BatchNorm2d`` whose backward keeps only the per-channel scale.

    Used where no convolution feeds the BatchNorm alone (DenseNet's norm → relu → conv).
    In training mode it is an ordinary BatchNorm.
    """

    @classmethod
    def from_batch_norm2d(cls, bn: nn.BatchNorm2d) -> "SaliencyBatchNorm2d":
        return _adopt(cls, bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or self.running_mean is None:
            return super().forward(x)
        return eval_batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.eps)


class SaliencyLinear(nn.Linear):
    """``nn.Linear`` whose backward computes only the input gradient and keeps only the weight."""

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "SaliencyLinear":
        return _adopt(cls, linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.linear(x, self.weight, self.bias)
