"""The three saliency rules: how the backward pass goes through a ReLU.

With f the ReLU's forward input and R the gradient arriving from above:

* ``gradient``  (Simonyan et al. 2013):         R * [f > 0]
* ``deconvnet`` (Zeiler & Fergus 2014):         R * [R > 0]       (f is not needed)
* ``guided``    (Springenberg et al. 2014):     R * [f > 0] * [R > 0]

The same rules hold across the ReLU family (:class:`Activation`); with the local derivative
``d(f)`` of the activation, which is 1 or 0 (clipped ReLU) or 1 or α (LeakyReLU):

==========================================  ===================  ==========  ======================
activation                                   gradient             deconvnet   guided
==========================================  ===================  ==========  ======================
ReLU                                         R·[f>0]              relu(R)     R·[f>0]·[R>0]
clipped ReLU: ReLU6, Hardtanh(0, m)          R·[0<f<m]            relu(R)     R·[0<f<m]·[R>0]
LeakyReLU(α)                                 R·(f>0 ? 1 : α)      relu(R)     R·(f>0 ? 1 : α)·[R>0]
==========================================  ===================  ==========  ======================

DeconvNet ignores the forward altogether; Guided is the gradient's local derivative applied
to relu(R). Each activation keeps one mask bit per element (its predicate above), nothing
for DeconvNet. The formulas live once, in ``fastsal._kernels.reference`` (the activation
table there), which the kernels compute exactly.

Computed as selects and torch's relu (``where(f > 0, R, 0)``, ``relu(R)``,
``relu(where(f > 0, R, 0))``), not products: a NaN in R is dropped where the mask drops the
position, as autograd's ``threshold_backward`` does, and kept by the relu, as Captum's
``F.relu`` hooks do.
"""

from __future__ import annotations

import enum
from typing import Union

import torch


class Rule(str, enum.Enum):
    """A backward rule for ReLU. Plain strings (``"guided"``) are accepted wherever a rule is."""

    GRADIENT = "gradient"
    DECONVNET = "deconvnet"
    GUIDED = "guided"

    def __str__(self) -> str:  # "guided", not "Rule.GUIDED", in messages and reports
        return self.value

    @property
    def needs_forward_mask(self) -> bool:
        """Whether the rule reads the sign of the forward input (DeconvNet does not)."""
        return self is not Rule.DECONVNET

    @property
    def code(self) -> int:
        """The integer the kernels take as their RULE constexpr."""
        return _CODES[self]


_CODES = {Rule.GRADIENT: 0, Rule.DECONVNET: 1, Rule.GUIDED: 2}

_ALIASES = {
    "gradient": Rule.GRADIENT,
    "saliency": Rule.GRADIENT,
    "deconvnet": Rule.DECONVNET,
    "deconvolution": Rule.DECONVNET,
    "deconv": Rule.DECONVNET,
    "guided": Rule.GUIDED,
    "guided_backprop": Rule.GUIDED,
    "guidedbackprop": Rule.GUIDED,
}

RuleLike = Union[Rule, str]


class Activation(str, enum.Enum):
    """The activations the rules apply to, each with one scalar parameter: none for ReLU, the
    upper bound m for a clipped ReLU (ReLU6: m = 6), the negative slope α for a LeakyReLU."""

    RELU = "relu"
    CLIPPED_RELU = "clipped_relu"
    LEAKY_RELU = "leaky_relu"

    def __str__(self) -> str:
        return self.value

    @property
    def code(self) -> int:
        """The integer the kernels and ``torch.ops.fastsal.relu_family_*`` take."""
        from fastsal._kernels import reference

        return {Activation.RELU: reference.RELU, Activation.CLIPPED_RELU: reference.CLIPPED_RELU,
                Activation.LEAKY_RELU: reference.LEAKY_RELU}[self]


def as_rule(rule: RuleLike) -> Rule:
    """Return ``rule`` as a :class:`Rule`, or raise a ValueError that lists the valid ones."""
    if isinstance(rule, Rule):
        return rule
    if isinstance(rule, str):
        found = _ALIASES.get(rule.strip().lower().replace("-", "_").replace(" ", "_"))
        if found is not None:
            return found
    valid = ", ".join(repr(r.value) for r in Rule)
    raise ValueError(f"unknown saliency rule {rule!r}: expected one of {valid} (or a fastsal.Rule)")


def apply_rule(
    grad: torch.Tensor,
    positive: torch.Tensor | None,
    rule: RuleLike,
    activation: Activation | str = Activation.RELU,
    param: float = 0.0,
) -> torch.Tensor:
    """The rule in plain torch (the formulas live once, in the kernels' reference).
    ``positive`` is the activation's mask bit (``f > 0`` for ReLU; ignored by DeconvNet);
    ``param`` is the LeakyReLU's slope (the other activations' backward does not need theirs)."""
    from fastsal._kernels.reference import apply_family_rule

    rule = as_rule(rule)
    activation = Activation(activation)
    if rule is not Rule.DECONVNET and positive is None:
        raise ValueError(f"rule {rule} needs the forward mask, but none was saved")
    return apply_family_rule(grad, positive, rule.code, activation.code, float(param))
