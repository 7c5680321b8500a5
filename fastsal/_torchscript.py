"""TorchScript models (``torch.jit.script`` or ``torch.jit.trace``) in the attribution API.

The plain gradient needs no rewriting, so a ScriptModule is differentiated as it is, with
ordinary autograd (what Captum's ``Saliency`` does). DeconvNet and Guided Backprop need the
rule at every ReLU, which fastsal applies by rewriting the Python model; a ScriptModule
hides its ReLUs, and the rewritten twin cannot be scripted in turn (``torch.jit.script``
rejects it; a ``torch.jit.trace`` of it runs in the process that made it but cannot be saved,
since its ops are Python autograd functions), so those rules refuse, and say what works
instead.
"""

from __future__ import annotations

import torch

from fastsal.rules import Rule, as_rule


def is_torchscript(model) -> bool:
    return isinstance(model, torch.jit.ScriptModule)


def refusal(rule, who: str) -> str:
    """Why ``who`` cannot apply ``rule`` to a TorchScript module, and what works instead."""
    return (
        f"{who} cannot apply the {as_rule(rule)} rule to a TorchScript module: fastsal gives the rule to "
        "every ReLU by rewriting the Python model, and a scripted or traced module hides its ReLUs. "
        "Pass the Python model instead; to reuse the scripted weights, build the Python class and load "
        "them: model.load_state_dict(scripted.state_dict()). Scripting fastsal.rewrite(model, ...) does not "
        "work either: torch.jit.script rejects it, and a torch.jit.trace of it cannot be saved (its ops are "
        "Python autograd functions). method='gradient' (fastsal.Saliency) works on TorchScript modules as "
        "they are, with plain autograd."
    )


def plain_autograd(model, rule, who: str) -> bool:
    """True when ``model`` is TorchScript and ``rule`` is the gradient: run it as is.

    Raises a TypeError for another rule on a TorchScript module; False for anything else.
    """
    if not is_torchscript(model):
        return False
    if as_rule(rule) is Rule.GRADIENT:
        return True
    raise TypeError(refusal(rule, who))


__all__ = ["is_torchscript", "plain_autograd", "refusal"]
