"""Saliency rules at smooth activations (SiLU, GELU, Hardswish, Mish, ELU, CELU, SELU, Softplus).

Opt in with ``fastsal.rewrite(..., activations="all")``. With ``f`` the activation's input,
``φ'`` its derivative and ``R`` the gradient arriving from above:

* ``gradient``:  ``R·φ'(f)``          (the ordinary derivative: torch's own backward formula)
* ``guided``:    ``R·φ'(f)·[R > 0]``  (the local derivative, masked by the sign of R)
* ``deconvnet``: ``relu(R)``          (ignores the forward, as at a ReLU)

The ReLU family (ReLU, ReLU6, Hardtanh(0, m), LeakyReLU) needs only one bit per element:
its derivative is a function of a predicate. These functions' derivatives are not, so
gradient and guided keep the activation's input ``f``: one element of its dtype (2 bytes in
half precision, 4 in float32) where a ReLU keeps 1 bit, which is what plain autograd keeps
too. An in-place call keeps a copy of ``f``, since the call overwrites it. DeconvNet keeps nothing.

Saturating squashers (Sigmoid, Tanh, Hardsigmoid, Hardtanh with a lower bound other than 0)
get no rule in either mode: in CNNs they are gates (squeeze-excitation, attention), whose
backward is not the feature selection the rules are about. PReLU and RReLU have no rule either.

Each activation is one row of :data:`ACTIVATIONS`: its forward, called as torch's own
function (so outputs are bit-identical), and its backward, torch's own ``aten.*_backward``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Callable, Dict, Tuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from fastsal._checks import check_tensor
from fastsal.rules import Rule, RuleLike, as_rule

aten = torch.ops.aten

# torch's SELU constants (aten/src/ATen/native/Activation.cpp)
_SELU_ALPHA = 1.6732632423543772848170429916717
_SELU_SCALE = 1.0507009873554804934193349852946


def _as_float32(value: float) -> float:
    return struct.unpack("f", struct.pack("f", value))[0]


@dataclass(frozen=True)
class SmoothActivation:
    """One smooth activation: ``forward(x, params, inplace) -> φ(x)`` and ``backward(R, f, params) -> R·φ'(f)``."""

    forward: Callable[[torch.Tensor, tuple, bool], torch.Tensor]
    backward: Callable[[torch.Tensor, torch.Tensor, tuple], torch.Tensor]
    has_inplace: bool = True


ACTIVATIONS: Dict[str, SmoothActivation] = {
    "silu": SmoothActivation(
        lambda x, p, ip: F.silu(x, inplace=ip),
        lambda g, f, p: aten.silu_backward(g, f),
    ),
    "gelu": SmoothActivation(  # params: (approximate,)
        lambda x, p, ip: F.gelu(x, approximate=p[0]),
        lambda g, f, p: aten.gelu_backward(g, f, approximate=p[0]),
        has_inplace=False,
    ),
    "hardswish": SmoothActivation(
        lambda x, p, ip: F.hardswish(x, inplace=ip),
        lambda g, f, p: aten.hardswish_backward(g, f),
    ),
    "mish": SmoothActivation(
        lambda x, p, ip: F.mish(x, inplace=ip),
        lambda g, f, p: aten.mish_backward(g, f),
    ),
    "elu": SmoothActivation(  # params: (alpha,)
        lambda x, p, ip: F.elu(x, p[0], ip),
        lambda g, f, p: aten.elu_backward(g, p[0], 1, 1, False, f),
    ),
    "celu": SmoothActivation(  # params: (alpha,); celu is elu with input_scale 1/alpha (alpha rounded to float, as torch's)
        lambda x, p, ip: F.celu(x, p[0], ip),
        lambda g, f, p: aten.elu_backward(g, p[0], 1, 1.0 / _as_float32(p[0]), False, f),
    ),
    "selu": SmoothActivation(
        lambda x, p, ip: F.selu(x, ip),
        lambda g, f, p: aten.elu_backward(g, _SELU_ALPHA, _SELU_SCALE, 1, False, f),
    ),
    "softplus": SmoothActivation(  # params: (beta, threshold)
        lambda x, p, ip: F.softplus(x, p[0], p[1]),
        lambda g, f, p: aten.softplus_backward(g, f, p[0], p[1]),
        has_inplace=False,
    ),
}


class _ActivationFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, name: str, params: tuple, rule_code: int, inplace: bool):
        spec = ACTIVATIONS[name]
        store = rule_code != Rule.DECONVNET.code and ctx.needs_input_grad[0]
        # φ' needs f; an in-place call is about to overwrite it
        f = (x.clone() if inplace else x) if store else None
        ctx.name, ctx.params, ctx.rule_code = name, params, rule_code
        ctx.save_for_backward(f)
        if inplace:
            spec.forward(x, params, True)
            ctx.mark_dirty(x)
            return x  # x itself, visibly: torch.compile checks that a dirty input is returned
        return spec.forward(x, params, False)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        if ctx.rule_code == Rule.DECONVNET.code:
            return torch.relu(grad), None, None, None, None
        (f,) = ctx.saved_tensors
        if ctx.rule_code == Rule.GUIDED.code:
            grad = torch.relu(grad)  # φ' is a per-element factor, so R·φ'·[R>0] = relu(R)·φ'
        return ACTIVATIONS[ctx.name].backward(grad, f, ctx.params), None, None, None, None


def activation(x: torch.Tensor, rule: RuleLike, name: str, params: Tuple = (), inplace: bool = False) -> torch.Tensor:
    """``φ(x)`` for the activation ``name`` (a key of :data:`ACTIVATIONS`), whose backward applies ``rule``.

    ``params`` are the activation's own arguments in the order its row documents
    (``("tanh",)`` for GELU's approximation, ``(alpha,)`` for ELU and CELU, ``(beta, threshold)``
    for Softplus). The forward is bit-identical to torch's.
    """
    rule = as_rule(rule)
    spec = ACTIVATIONS.get(name)
    if spec is None:
        raise ValueError(f"no smooth-activation rule named {name!r}; known: {', '.join(sorted(ACTIVATIONS))}")
    check_tensor(x, "x")
    inplace = bool(inplace) and spec.has_inplace
    if not (x.requires_grad and torch.is_grad_enabled()):
        return spec.forward(x, tuple(params), inplace)
    return _ActivationFunction.apply(x, name, tuple(params), rule.code, inplace)


__all__ = ["ACTIVATIONS", "SmoothActivation", "activation"]
