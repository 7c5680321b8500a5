"""The three saliency rules: how the backward pass goes through a ReLU.

With f the ReLU's forward input and R the gradient arriving from above:

* ``gradient``  (Simonyan et al. 2013):         R * [f > 0]
* ``deconvnet`` (Zeiler & Fergus 2014):         R * [R > 0]       (f is not needed)
* ``guided``    (Springenberg et al. 2014):     R * [f > 0] * [R > 0]

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


def apply_rule(grad: torch.Tensor, positive: torch.Tensor | None, rule: RuleLike) -> torch.Tensor:
    """The rule in plain torch (the formulas live once, in the kernels' reference).
    ``positive`` is ``f > 0`` (ignored by DeconvNet)."""
    from fastsal._kernels.reference import apply_rule_code

    rule = as_rule(rule)
    if rule is not Rule.DECONVNET and positive is None:
        raise ValueError(f"rule {rule} needs the forward mask, but none was saved")
    return apply_rule_code(grad, positive, rule.code)
