"""Replacement modules the rewriting pass swaps in, each with a ``from_<original>`` constructor.

The conv, linear, pool and batch-norm replacements subclass the torch module they replace
and take over its attributes (and its parameter tensors) as they are, so state-dict keys,
``isinstance`` checks and printing stay the same; only ``forward`` changes, to fastsal's ops.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastsal import ops
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
