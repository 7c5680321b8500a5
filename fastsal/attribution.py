"""Captum-compatible attribution classes: switch by changing an import.

``fastsal.Saliency``, ``Deconvolution`` and ``GuidedBackprop`` take the same constructor and
``attribute(inputs, target=None, additional_forward_args=None)`` arguments as Captum's
classes of those names (``Saliency`` also ``abs=True``), and the Neuron variants
(``NeuronGradient``, ``NeuronDeconvolution``, ``NeuronGuidedBackprop``) take
``(model, layer)`` and ``attribute(inputs, neuron_selector, additional_forward_args=None,
attribute_to_neuron_input=False)``. Results have the structure of ``inputs``: a tensor for
a tensor, a tuple for a tuple.

Unlike Captum, every ReLU call gets the rule, functional ones too (``F.relu``,
``torch.relu``, ``Tensor.relu``), and the rule is applied to the gradient that flows
through the ReLU alone, so a ReLU whose input also feeds a skip connection is right. The
model is rewritten once (per rule) and the rewritten twin reused across calls; the
user's model is never modified, not even temporarily (only NeuronGradient on a plain
forward function hooks the given layer for the call, as Captum does).

A TorchScript model (scripted or traced) works with ``Saliency``: the plain gradient needs no
rewriting, so it is differentiated as it is, as Captum does. ``Deconvolution`` and
``GuidedBackprop`` refuse it with a TypeError saying what works instead (Captum accepts it
and silently returns the plain gradient, since its ReLU hooks never fire in scripted code),
and so do the Neuron classes (a scripted module's layers cannot be hooked).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Tuple, Union

import torch

from fastsal import _layers
from fastsal._pass import TwinCache, additional_args, as_tuple, check_inputs, grad_mode, leaf, plain, same_structure
from fastsal._torchscript import is_torchscript, plain_autograd
from fastsal.rules import Rule
from fastsal.targets import TargetType, select

NeuronSelector = Union[int, Tuple[Union[int, slice], ...], Callable[..., torch.Tensor]]


def _unlogged(fn):
    """Give ``attribute`` the ``__wrapped__`` that Captum's ``NoiseTunnel`` calls (Captum's own
    ``attribute`` methods get it from their usage-logging decorator), so
    ``captum.attr.NoiseTunnel(fastsal.Saliency(model))`` gives SmoothGrad/VarGrad."""

    @functools.wraps(fn)
    def attribute(self, *args, **kwargs):
        return fn(self, *args, **kwargs)

    return attribute


def _grads(leaves: Tuple[torch.Tensor, ...], seed: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """Input gradients of a scalar seed; inputs the seed does not depend on get zeros."""
    if not seed.requires_grad:
        return tuple(torch.zeros_like(x) for x in leaves)
    grads = torch.autograd.grad(seed, leaves, allow_unused=True)
    return tuple(torch.zeros_like(x) if g is None else g for g, x in zip(grads, leaves))


class _RuleAttribution:
    """The machinery of every class here: one rule, one twin of the model, one backward per call."""

    rule: Rule = Rule.GRADIENT

    def __init__(self, forward_func: Callable[..., torch.Tensor], *, activations: str = "relu") -> None:
        if not callable(forward_func):
            raise TypeError(f"expected a model or a forward function, got {type(forward_func).__name__}")
        if self.rule is not Rule.GRADIENT and not isinstance(forward_func, torch.nn.Module):
            raise TypeError(
                f"{type(self).__name__} needs a torch.nn.Module (its ReLUs get the {self.rule} rule), "
                f"got {type(forward_func).__name__}"
            )
        self.forward_func = forward_func
        # a TorchScript module with the gradient rule runs as it is, like a plain function
        rewritable = isinstance(forward_func, torch.nn.Module) and not plain_autograd(
            forward_func, self.rule, type(self).__name__
        )
        self._twins = TwinCache(forward_func, activations=activations) if rewritable else None

    @property
    def multiplies_by_inputs(self) -> bool:  # Captum's flag: these maps are not multiplied by the input
        return False

    def has_convergence_delta(self) -> bool:  # Captum's API: no convergence delta for these methods
        return False

    def attribute_future(self, *args, **kwargs):
        """Not implemented, as in Captum (whose Neuron classes lack the method altogether)."""
        raise NotImplementedError(f"attribute_future is not implemented for {type(self).__name__}")

    def _function(self) -> Callable[..., torch.Tensor]:
        """What runs the forward: the model's saliency twin, or a plain function as given."""
        return self._twins.get(self.rule) if self._twins is not None else self.forward_func

    def _grads_of(self, inputs, additional_forward_args: Any, seed_of: Callable):
        """Input gradients of ``seed_of(fn, leaves, args)``, a scalar computed by running ``fn``."""
        xs, was_tuple = as_tuple(inputs)
        check_inputs(xs)
        extra = additional_args(additional_forward_args)
        fn = self._function()
        with grad_mode():
            leaves = tuple(leaf(x) for x in xs)
            args = (*leaves, *(plain(a) for a in extra))
            grads = _grads(leaves, seed_of(fn, leaves, args))
        return grads, was_tuple

    def _input_grads(self, inputs, target: TargetType, additional_forward_args: Any):
        return self._grads_of(inputs, additional_forward_args, lambda fn, leaves, args: select(fn(*args), target).sum())


class Saliency(_RuleAttribution):
    """Input gradients (Simonyan et al. 2013); ``abs=True`` by default, as in Captum.

    ``forward_func`` may be any callable: a module is rewritten for memory, a plain function
    is differentiated with ordinary autograd (the gradient needs no rule).
    """

    rule = Rule.GRADIENT

    @_unlogged
    def attribute(self, inputs, target: TargetType = None, abs: bool = True, additional_forward_args: Any = None):
        grads, was_tuple = self._input_grads(inputs, target, additional_forward_args)
        if abs:
            grads = tuple(g.abs() for g in grads)
        return same_structure(grads, was_tuple)


class _ModelRuleAttribution(_RuleAttribution):
    """Deconvolution and GuidedBackprop: Captum's ``attribute`` without Saliency's ``abs``."""

    def __init__(self, model: torch.nn.Module, *, activations: str = "relu") -> None:
        super().__init__(model, activations=activations)

    @_unlogged
    def attribute(self, inputs, target: TargetType = None, additional_forward_args: Any = None):
        grads, was_tuple = self._input_grads(inputs, target, additional_forward_args)
        return same_structure(grads, was_tuple)


class Deconvolution(_ModelRuleAttribution):
    """DeconvNet (Zeiler & Fergus 2014): ReLUs pass only positive gradients back."""

    rule = Rule.DECONVNET


class GuidedBackprop(_ModelRuleAttribution):
    """Guided Backpropagation (Springenberg et al. 2014): positive gradients through active ReLUs."""

    rule = Rule.GUIDED


def select_neuron(value, selector: NeuronSelector) -> torch.Tensor:
    """The selected neuron(s) of a layer tensor, one number per sample (slices are summed), as Captum."""
    if callable(selector):
        picked = selector(value)
        if not isinstance(picked, torch.Tensor):
            raise TypeError(f"neuron_selector returned {type(picked).__name__}, expected a tensor")
        return picked
    if isinstance(value, tuple):
        if len(value) != 1:
            raise ValueError(
                f"the layer gives {len(value)} tensors; an index cannot choose among them: pass a callable neuron_selector"
            )
        value = value[0]
    index = (selector,) if isinstance(selector, (int, slice)) and not isinstance(selector, bool) else selector
    if not isinstance(index, tuple) or not all(
        isinstance(i, slice) or (isinstance(i, int) and not isinstance(i, bool)) for i in index
    ):
        raise TypeError(f"neuron_selector must be an int, a tuple of ints and slices, or a callable, got {selector!r}")
    if len(index) > value.dim() - 1:
        raise ValueError(
            f"neuron_selector {selector!r} has {len(index)} indices but the layer tensor {tuple(value.shape)} has "
            f"{value.dim() - 1} dimensions after the batch"
        )
    for dim, i in enumerate(index, start=1):
        if isinstance(i, int) and not -value.shape[dim] <= i < value.shape[dim]:
            raise IndexError(
                f"neuron_selector index {i} is out of range for dimension {dim} of the layer tensor "
                f"{tuple(value.shape)} (valid: 0..{value.shape[dim] - 1})"
            )
    picked = value[(slice(None), *index)]
    if any(isinstance(i, slice) for i in index):
        return picked.reshape(picked.shape[0], -1).sum(1)
    return picked


class _NeuronRuleAttribution(_RuleAttribution):
    """Attribution of one neuron (or a slice or function of neurons) of a layer to the inputs."""

    def __init__(self, model, layer: torch.nn.Module, device_ids=None, *, activations: str = "relu") -> None:
        if is_torchscript(model):
            raise TypeError(
                f"{type(self).__name__} needs the output of a layer as the model runs, and a TorchScript module's "
                "layers run as compiled code that hooks cannot see (Captum fails on it too). Pass the Python model; "
                "to reuse the scripted weights: model.load_state_dict(scripted.state_dict())"
            )
        super().__init__(model, activations=activations)
        if device_ids is not None:
            raise ValueError(
                "device_ids (DataParallel) is not supported by fastsal: run one model per device instead"
            )
        if not isinstance(layer, torch.nn.Module):
            raise TypeError(f"layer must be a torch.nn.Module, got {type(layer).__name__}")
        self.layer = layer
        self.device_ids = None
        self._layer_name = _layers.qualified_name(model, layer) if isinstance(model, torch.nn.Module) else None

    @_unlogged
    def attribute(
        self,
        inputs,
        neuron_selector: NeuronSelector,
        additional_forward_args: Any = None,
        attribute_to_neuron_input: bool = False,
    ):
        def seed_of(fn, leaves, args):
            if self._twins is not None:
                value = _layers.capture(fn, args, fn, self.forward_func, self._layer_name, attribute_to_neuron_input)
            else:  # a plain forward function: hook the layer given, as Captum does
                _, value = _layers.run_to_layer(fn, args, self.layer, to_input=attribute_to_neuron_input)
            return select_neuron(value, neuron_selector).sum()

        grads, was_tuple = self._grads_of(inputs, additional_forward_args, seed_of)
        return same_structure(grads, was_tuple)


class NeuronGradient(_NeuronRuleAttribution):
    """Gradient of a neuron of ``layer`` with respect to the inputs (any callable forward)."""

    rule = Rule.GRADIENT


class NeuronDeconvolution(_NeuronRuleAttribution):
    """DeconvNet attribution of a neuron of ``layer``."""

    rule = Rule.DECONVNET


class NeuronGuidedBackprop(_NeuronRuleAttribution):
    """Guided-backprop attribution of a neuron of ``layer``."""

    rule = Rule.GUIDED


__all__ = [
    "Saliency",
    "Deconvolution",
    "GuidedBackprop",
    "NeuronGradient",
    "NeuronDeconvolution",
    "NeuronGuidedBackprop",
    "select_neuron",
]
