"""``fastsal.rewrite``: turn a PyTorch CNN into its saliency twin.

The twin is a structural copy of the model: new module objects (so swapping modules and
flags never touches the user's model) holding the *same* parameter storage (no weight copy,
except the new weights of convolutions that absorb a BatchNorm). In the copy:

* module sites are swapped for :mod:`fastsal.modules` (ReLU, ReLU → max-pool fused, ReLU6 and
  Hardtanh(0, m), LeakyReLU, max-pool, conv (+ folded BatchNorm), linear, eval BatchNorm; with
  ``activations="all"`` also SiLU, GELU, Hardswish, Mish, ELU, CELU, SELU and Softplus);
* functional sites (``F.relu`` inside a ``forward``, ...) are caught while the twin runs by
  :class:`fastsal.function_mode.SaliencyMode`;
* everything else stays as it is and is listed in the :class:`fastsal.report.RewriteReport`.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections import Counter
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from fastsal import modules as fm
from fastsal._trace_gate import GATE
from fastsal.function_mode import GATE_LEFT, SMOOTH_LEFT, SaliencyMode
from fastsal.patterns import find_pairs
from fastsal.report import EXCLUDED, KEPT, NO_RULE, RELU_LIKE, RewriteReport
from fastsal.rules import Rule, RuleLike, as_rule

FilterFn = Callable[[nn.Module, str], bool]

_RELU_FAMILY_MODULES = (nn.ReLU, nn.Hardtanh, nn.LeakyReLU)  # nn.ReLU6 is a Hardtanh
_RELU_LIKE_MODULES = (nn.Threshold,)
_GATE_MODULES = (nn.Sigmoid, nn.Tanh, nn.Hardsigmoid)
_NO_RULE_MODULES = (nn.PReLU, nn.RReLU, nn.GLU, nn.Softsign, nn.Tanhshrink, nn.LogSigmoid)
ACTIVATION_SETS = ("relu", "all")


def _smooth_base(module: nn.Module) -> Optional[type]:
    """The torch smooth-activation class ``module`` is, if its forward is that class's own."""
    for base in type(module).__mro__:
        if base in fm.SMOOTH_MODULES:
            return base if type(module).forward is base.forward else None
    return None


# ----- the structural copy --------------------------------------------------------------------------


def _structural_copy(model: nn.Module) -> Tuple[nn.Module, Dict[int, nn.Module]]:
    """New module objects with the same classes, flags and hooks; parameters share storage.

    Returns the copy and a map from each copied module's id to the user's original.
    Parameters become ``requires_grad=False`` views of the originals: a saliency pass never
    needs weight gradients, and the user's ``.grad`` fields stay untouched. BatchNorm running
    statistics are cloned (a few floats per channel) so that a twin in training mode cannot
    update the user's statistics.
    """
    copies: Dict[int, nn.Module] = {}
    originals: Dict[int, nn.Module] = {}
    params: Dict[int, nn.Parameter] = {}

    def copy_param(p: Optional[nn.Parameter]):
        if p is None:
            return None
        if id(p) not in params:  # tied weights stay tied
            params[id(p)] = nn.Parameter(p.detach(), requires_grad=False)
        return params[id(p)]

    def copy_module(m: nn.Module) -> nn.Module:
        if id(m) in copies:  # a module registered in several places stays one module
            return copies[id(m)]
        new = m.__class__.__new__(m.__class__)
        copies[id(m)] = new
        originals[id(new)] = m
        for attr, value in m.__dict__.items():
            # hook dicts and the like are copied so hooks added to one model do not appear on the other
            if attr.startswith("_") and isinstance(value, (dict, set)):
                value = type(value)(value)
            new.__dict__[attr] = value
        new._parameters = {k: copy_param(p) for k, p in m._parameters.items()}
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            new._buffers = {k: (b.clone() if b is not None else None) for k, b in m._buffers.items()}
        new._modules = {k: (copy_module(c) if c is not None else None) for k, c in m._modules.items()}
        return new

    return copy_module(model), originals


# ----- the twin's forward: the function mode around the original forward ----------------------------

_WITH_MODE_CLASSES: Dict[type, type] = {}  # subclass -> the user's class
_MODE_SUBCLASS_OF: Dict[type, type] = {}  # the user's class -> subclass


def _forward_with_mode(self, *args, **kwargs):
    cls = _WITH_MODE_CLASSES[type(self)]
    mode = SaliencyMode(self._fastsal_region_rule, self.fastsal_report, self._fastsal_strict, self._fastsal_activations)
    if torch.compiler.is_compiling() or not self._fastsal_root:
        with mode:
            return cls.forward(self, *args, **kwargs)
    try:
        with GATE.running(), mode:
            out = cls.forward(self, *args, **kwargs)
    except Exception as err:
        if hasattr(err, "add_note"):  # Python >= 3.11
            err.add_note(
                f"(raised in the forward of the fastsal-rewritten {cls.__name__}; if the original model runs on "
                "the same input, please report this with the model's code)"
            )
        raise
    if torch.is_grad_enabled():  # functional sites are recorded only when autograd records
        report = self.fastsal_report
        report.forwards_seen += 1
        if report.forwards_seen == 1:  # every site is known now: once per rewrite, not per call
            _warn_if_rule_applies_nowhere(report)
    return out


def _warn_if_rule_applies_nowhere(report: RewriteReport) -> None:
    """A user asking for guided backprop on a model none of whose activations get the rule has plain
    gradients: say so where they will see it, not only in the report."""
    if report.rule is Rule.GRADIENT or report.rule_sites():
        return
    left = sorted(report.activations_left().items(), key=lambda kv: (-kv[1], kv[0]))
    found = ", ".join(f"{n} x {kind}" for kind, n in left)
    smooth_left = any(s.action == SMOOTH_LEFT for _, s in report.left_alone)
    warnings.warn(
        f"fastsal.rewrite({report.model_name}, '{report.rule}'): no activation gets the {report.rule} rule, so the "
        "maps are plain gradients; "
        + (f"{found} left as is" if found else "no ReLU or other activation found")
        + ("; pass activations='all' to apply the rule at smooth activations (SiLU, GELU, Hardswish, ...)"
           if smooth_left else "")
        + " (see .fastsal_report)",
        UserWarning,
        stacklevel=_user_stacklevel(),
    )


_LIBRARY_DIRS = (os.path.dirname(torch.__file__) + os.sep, os.path.dirname(os.path.abspath(__file__)) + os.sep)


def _user_stacklevel() -> int:
    """The ``stacklevel`` that points a warning at the user's line (past fastsal's and torch's frames)."""
    level, frame = 2, sys._getframe(2)  # 1: the function calling warnings.warn, 2: its caller
    while frame is not None and frame.f_code.co_filename.startswith(_LIBRARY_DIRS):
        frame, level = frame.f_back, level + 1
    return level


def _extra_repr_with_report(self) -> str:
    cls = _WITH_MODE_CLASSES[type(self)]
    own = cls.extra_repr(self)
    if not self._fastsal_root:
        return own
    report = self.fastsal_report
    summary = (
        f"fastsal: rule={report.rule}, {len(report.replaced)} sites rewritten, {len(report.left_alone)} left alone "
        "(print .fastsal_report for details)"
    )
    return f"{summary}\n{own}" if own else summary


def _install_mode(module: nn.Module, rule: Optional[Rule], report: RewriteReport, strict: bool, root: bool,
                  activations: str = "relu") -> None:
    """Make ``module`` run its forward inside a SaliencyMode, by giving it a subclass of its own class
    (same name: printing and state dicts are unchanged; a subclass so ``copy.deepcopy`` works)."""
    cls = type(module)
    sub = _MODE_SUBCLASS_OF.get(cls)
    if sub is None:
        sub = type(cls.__name__, (cls,), {
            "forward": _forward_with_mode,
            "extra_repr": _extra_repr_with_report,
            "__module__": cls.__module__,
            "__qualname__": cls.__qualname__,
            "__doc__": cls.__doc__,
        })
        _WITH_MODE_CLASSES[sub] = cls
        _MODE_SUBCLASS_OF[cls] = sub
    module.__class__ = sub
    module._fastsal_region_rule = rule
    module._fastsal_root = root
    module._fastsal_strict = strict
    module._fastsal_activations = activations
    module.fastsal_report = report


# ----- deciding what each module becomes -------------------------------------------------------------


def _overrides_forward(module: nn.Module, base: type) -> bool:
    return type(module).forward is not base.forward


def _plan(twin: nn.Module, names: Dict[int, str], counts: Counter, included: Dict[int, bool],
          rule: Rule, report: RewriteReport, activations: str = "relu") -> Dict[int, nn.Module]:
    """Replacement for each module id; records every decision in ``report``."""
    by_name = dict(twin.named_modules())
    pairs = find_pairs(twin)

    def mergeable(*mods: nn.Module) -> bool:
        # merging makes the first module's output disappear: not if a hook may want to see it
        return all(
            counts[id(m)] == 1 and included[id(m)] and not (m._forward_hooks or m._forward_pre_hooks)
            for m in mods
        )

    replacements: Dict[int, nn.Module] = {}
    folded_bn: Dict[int, str] = {}
    fused_relu: Dict[int, str] = {}
    for conv_name, bn_name in pairs.conv_bn:
        conv, bn = by_name[conv_name], by_name[bn_name]
        if mergeable(conv, bn) and not bn.training and bn.running_mean is not None:
            replacements[id(conv)] = fm.SaliencyConv2d.from_conv2d_and_batch_norm(conv, bn, bn_name)
            replacements[id(bn)] = fm.FoldedBatchNorm2d(conv_name).train(False)
            folded_bn[id(bn)] = conv_name
            report.add_replaced(conv_name, "nn.Conv2d", "fastsal conv2d with the next BatchNorm folded in", bn_name)
            report.add_replaced(bn_name, "nn.BatchNorm2d", "folded into the conv before it", conv_name)
    for relu_name, pool_name in pairs.relu_pool:
        relu, pool = by_name[relu_name], by_name[pool_name]
        if mergeable(relu, pool) and fm.pool_supported(pool) is None:
            replacements[id(pool)] = fm.SaliencyReLUMaxPool2d.from_max_pool2d(pool, rule)
            replacements[id(relu)] = fm.FusedReLU(pool_name).train(relu.training)
            fused_relu[id(relu)] = pool_name
            report.add_replaced(pool_name, "nn.MaxPool2d", f"fastsal relu+max_pool2d fused ({rule})", relu_name, rule_site=True)
            report.add_replaced(relu_name, "nn.ReLU", "fused into the max-pool after it", pool_name)
    if pairs.untraceable:
        report.notes.append(
            "torch.fx could not trace " + ", ".join(pairs.untraceable[:5]) + (", ..." if len(pairs.untraceable) > 5 else "")
            + ": conv → BatchNorm folding and ReLU → max-pool fusion were looked for only inside its "
            "nn.Sequential and traceable children; other eval BatchNorms there use the input-gradient-only affine op"
        )

    for module in {id(m): m for m in by_name.values()}.values():
        key, name = id(module), names[id(module)] or "<root>"
        if key in replacements:
            continue
        kind = f"nn.{type(module).__name__}" if type(module).__module__.startswith("torch.nn") else type(module).__name__
        is_relu = isinstance(module, nn.ReLU)
        smooth_base = _smooth_base(module)
        if not included[key]:
            if isinstance(module, _RELU_FAMILY_MODULES + _RELU_LIKE_MODULES) or smooth_base is not None:
                report.add_left_alone(EXCLUDED, name, kind, "filter_fn excluded it: ordinary gradient")
            continue
        if isinstance(module, torch.jit.ScriptModule):
            report.add_left_alone(RELU_LIKE, name, kind, "TorchScript: fastsal cannot see inside, any ReLU there keeps its ordinary gradient")
        elif is_relu and not _overrides_forward(module, nn.ReLU):
            replacements[key] = fm.SaliencyReLU.from_relu(module, rule)
            report.add_replaced(name, "nn.ReLU", f"fastsal relu ({rule})", _reuse(counts[key]), rule_site=True)
        elif isinstance(module, nn.Hardtanh) and not _overrides_forward(module, nn.Hardtanh):
            if module.min_val == 0:
                replacements[key] = fm.SaliencyClippedReLU.from_hardtanh(module, rule)
                report.add_replaced(name, kind, f"fastsal clipped_relu ({rule})", _reuse(counts[key]), rule_site=True)
            else:
                report.add_left_alone(NO_RULE, name, kind, f"Hardtanh(min_val={module.min_val:g}) is not ReLU-like "
                                      "(a clipped ReLU has min_val 0): ordinary gradient")
        elif isinstance(module, nn.LeakyReLU) and not _overrides_forward(module, nn.LeakyReLU):
            replacements[key] = fm.SaliencyLeakyReLU.from_leaky_relu(module, rule)
            report.add_replaced(name, kind, f"fastsal leaky_relu ({rule})", _reuse(counts[key]), rule_site=True)
        elif smooth_base is not None:
            if activations == "all":
                replacements[key] = fm.SaliencyActivation.from_module(module, rule)
                report.add_replaced(name, kind, f"fastsal {replacements[key].name} ({rule})",
                                    _reuse(counts[key]), rule_site=True)
            else:
                report.add_left_alone(NO_RULE, name, kind, SMOOTH_LEFT)
        elif isinstance(module, _RELU_LIKE_MODULES):
            report.add_left_alone(RELU_LIKE, name, kind, "ReLU-like clamp with no saliency rule: ordinary gradient")
        elif isinstance(module, _GATE_MODULES):
            report.add_left_alone(NO_RULE, name, kind, GATE_LEFT)
        elif isinstance(module, _NO_RULE_MODULES):
            report.add_left_alone(NO_RULE, name, kind, "activation with no saliency rule: ordinary gradient")
        elif type(module) is nn.MaxPool2d:
            why_not = fm.pool_supported(module)
            if why_not is None:
                replacements[key] = fm.SaliencyMaxPool2d.from_max_pool2d(module)
                report.add_replaced(name, kind, "fastsal max_pool2d (int8 switches)")
            else:
                report.add_left_alone(KEPT, name, kind, f"{why_not}: plain autograd pool")
        elif type(module) is nn.Conv2d:
            replacements[key] = fm.SaliencyConv2d.from_conv2d(module)
            report.add_replaced(name, kind, "fastsal conv2d (input gradient only)")
        elif type(module) is nn.Linear:
            replacements[key] = fm.SaliencyLinear.from_linear(module)
            report.add_replaced(name, kind, "fastsal linear (input gradient only)")
        elif isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training:
            report.add_left_alone(KEPT, name, kind, "training mode (batch statistics): kept as is")
        elif type(module) is nn.BatchNorm2d and module.running_mean is not None:
            replacements[key] = fm.SaliencyBatchNorm2d.from_batch_norm2d(module)
            report.add_replaced(name, kind, "eval affine, input gradient only (no conv feeds it alone)")
        elif isinstance(module, _RELU_FAMILY_MODULES + (nn.Conv2d, nn.Linear, nn.MaxPool2d, nn.modules.batchnorm._BatchNorm)) \
                or (activations == "all" and isinstance(module, tuple(fm.SMOOTH_MODULES))):
            report.add_replaced(name, kind, "own forward kept; its functional calls are rewritten as it runs")
    return replacements


def _reuse(count: int) -> str:
    return f"registered in {count} places" if count > 1 else ""


def _swap(twin: nn.Module, replacements: Dict[int, nn.Module]) -> nn.Module:
    for module in list(twin.modules()):
        for child_name, child in module._modules.items():
            if child is not None and id(child) in replacements:
                module._modules[child_name] = replacements[id(child)]
    return replacements.get(id(twin), twin)


def _regions(twin: nn.Module, included_of: Callable[[nn.Module], bool]) -> List[Tuple[nn.Module, bool, bool]]:
    """(module, included, is root) for the root and for every module whose filter decision differs
    from its parent's: the places where the function mode's rule must change."""
    out = [(twin, included_of(twin), True)]
    seen = {id(twin)}

    def walk(module: nn.Module, parent_included: bool) -> None:
        for child in module.children():
            if id(child) in seen:
                continue
            seen.add(id(child))
            inc = included_of(child)
            if inc != parent_included:
                out.append((child, inc, False))
            walk(child, inc)

    walk(twin, included_of(twin))
    return out


def rewrite(
    model: nn.Module,
    rule: RuleLike,
    *,
    filter_fn: Optional[FilterFn] = None,
    strict: bool = False,
    activations: str = "relu",
) -> nn.Module:
    """Return a new module computing ``model``'s forward whose backward to the input follows ``rule``.

    Args:
        model: any ``nn.Module``; it is not modified. The result shares its parameter storage.
        rule: ``"gradient"``, ``"deconvnet"`` or ``"guided"`` (or a :class:`fastsal.Rule`).
        filter_fn: ``filter_fn(module, qualified_name) -> bool`` (called with the user's modules);
            only modules it accepts are rewritten, and functional calls are rewritten only inside
            accepted modules. ``None`` rewrites everything.
        strict: raise instead of leaving a ReLU-like site (``F.threshold``, a clamp at 0, code fastsal
            cannot see into) with its ordinary gradient. Functional sites are checked as the model runs.
        activations: which activations get the rule. ``"relu"`` (default): the ReLU family, module
            and functional forms, in place or not: ReLU, ReLU6, Hardtanh(0, m), LeakyReLU (1 bit per
            element). ``"all"``: also SiLU, GELU, Hardswish, Mish, ELU, CELU, SELU and Softplus
            (gradient ``R·φ'(f)``, guided ``R·φ'(f)·[R>0]``, deconvnet ``relu(R)``), which keep their
            input for φ' (see :mod:`fastsal.smooth`). Gates (Sigmoid, Tanh, Hardsigmoid) never get a rule.

    When ``rule`` is not ``"gradient"`` and no activation gets it, the first forward with autograd
    recording (once every functional call site has been seen) emits a ``UserWarning`` naming the
    activations left as they are: the maps would be plain gradients.

    The result has a ``fastsal_report`` attribute (a :class:`fastsal.RewriteReport`) saying what was
    replaced and what was left alone and why; functional call sites are added on each eager forward.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"fastsal.rewrite expects a torch.nn.Module, got {type(model).__name__}; "
            "wrap a plain function in an nn.Module whose forward calls it"
        )
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError(
            "fastsal.rewrite cannot see inside a TorchScript module: rewrite the Python model (to reuse scripted "
            "weights: model.load_state_dict(scripted.state_dict())); the twin itself cannot be scripted"
        )
    if type(model) in _WITH_MODE_CLASSES:
        raise ValueError(
            "this model is already the output of fastsal.rewrite; rewrite the original model to get another rule"
        )
    rule = as_rule(rule)
    activations = check_activations(activations)
    if torch.is_inference_mode_enabled():
        # folded weights and cloned BatchNorm buffers made here would be inference tensors,
        # which autograd refuses to save; the twin must be built with autograd alive
        with torch.inference_mode(False):
            return rewrite(model, rule, filter_fn=filter_fn, strict=strict, activations=activations)
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(f"filter_fn must be callable as filter_fn(module, qualified_name) -> bool, got {filter_fn!r}")

    twin, originals = _structural_copy(model)
    names: Dict[int, str] = {}
    counts: Counter = Counter()
    for name, module in twin.named_modules(remove_duplicate=False):
        names.setdefault(id(module), name)
        counts[id(module)] += 1
    included = {
        key: (True if filter_fn is None else bool(filter_fn(originals[key], names[key])))
        for key in names
    }
    report = RewriteReport(rule=rule, model_name=type(model).__name__, activations=activations)
    if model.training and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        report.notes.append("the model is in training mode: its BatchNorms use batch statistics and are kept as is")

    replacements = _plan(twin, names, counts, included, rule, report, activations)
    if strict and report.relu_like_left():
        sites = ", ".join(f"{s.where} ({s.kind})" for s in report.relu_like_left())
        raise ValueError(
            f"strict rewrite: these ReLU-like sites would keep their ordinary gradient: {sites}; "
            "replace them with ReLUs, or rewrite with strict=False to accept that"
        )
    twin = _swap(twin, replacements)

    replaced_from = {id(new): old_key for old_key, new in replacements.items()}

    def included_of(module: nn.Module) -> bool:
        return included.get(replaced_from.get(id(module), id(module)), True)

    for module, inc, is_root in _regions(twin, included_of):
        _install_mode(module, rule if inc else None, report, strict, is_root, activations)
    return twin


def check_activations(activations) -> str:
    if isinstance(activations, str) and activations.strip().lower() in ACTIVATION_SETS:
        return activations.strip().lower()
    raise ValueError(
        f"activations must be 'relu' (the ReLU family: ReLU, ReLU6, Hardtanh(0, m), LeakyReLU) or 'all' "
        f"(also SiLU, GELU, Hardswish, Mish, ELU, CELU, SELU, Softplus), got {activations!r}"
    )


__all__ = ["rewrite", "RewriteReport"]
