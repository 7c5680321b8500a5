"""Layers: name a layer of a model, find it in the model's saliency twin, capture its tensor.

A layer is given as a module of the model or as its qualified name (``"features.3"``).
Capturing registers a forward hook on the twin's copy of the layer (never on the user's
model, unless the caller has no module to rewrite) for the duration of one forward.
"""

from __future__ import annotations

import contextlib
import difflib
from typing import Optional, Tuple, Union

import torch

LayerLike = Union[str, torch.nn.Module]


def qualified_name(model: torch.nn.Module, layer: LayerLike) -> str:
    """The qualified name of ``layer`` in ``model`` ("" for the model itself), or a clear ValueError."""
    if isinstance(layer, str):
        names = [name for name, _ in model.named_modules(remove_duplicate=False)]
        if layer in names:
            return layer
        close = difflib.get_close_matches(layer, names, n=3)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(f"the model has no layer named {layer!r}{hint}")
    if not isinstance(layer, torch.nn.Module):
        raise TypeError(f"layer must be a module of the model or its qualified name, got {type(layer).__name__}")
    for name, module in model.named_modules(remove_duplicate=False):
        if module is layer:
            return name
    raise ValueError(
        f"layer {type(layer).__name__} is not a submodule of the model (a copy of the model, or of the layer, "
        "is a different object): pass a module of this model or its qualified name"
    )


class _Stop(Exception):
    """Raised by a capture hook to end a forward pass early, once the layer has run."""


class Capture:
    """What a probe saw: the layer's input (the first tensor argument) or its output."""

    def __init__(self):
        self.value: Optional[torch.Tensor] = None


def _first_tensor(args) -> torch.Tensor:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a
    raise ValueError("the layer was called with no tensor argument; its input cannot be attributed to")


def _as_single_tensor(value, what: str) -> Union[torch.Tensor, Tuple[torch.Tensor, ...]]:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and all(isinstance(v, torch.Tensor) for v in value):
        return tuple(value)
    raise ValueError(f"the layer's {what} is a {type(value).__name__}, not a tensor or a tuple of tensors")


@contextlib.contextmanager
def probe(module: torch.nn.Module, to_input: bool = False, stop: bool = False):
    """Capture ``module``'s output (or input) on its first call; with ``stop`` end the forward there.

    Use: ``with probe(m, stop=True) as cap: run_forward()`` then ``cap.value``. A forward
    ended early raises nothing out of the ``with`` block.
    """
    cap = Capture()

    def on_input(mod, args):
        if cap.value is None:
            cap.value = _first_tensor(args)
            if stop:
                raise _Stop()

    def on_output(mod, args, output):
        if cap.value is None:
            cap.value = _as_single_tensor(output, "output")
            if stop:
                raise _Stop()

    handle = module.register_forward_pre_hook(on_input) if to_input else module.register_forward_hook(on_output)
    try:
        yield cap
    except _Stop:
        pass
    finally:
        handle.remove()


def run_to_layer(fn, args, module: torch.nn.Module, to_input: bool = False, stop: bool = True):
    """Run ``fn(*args)`` and return ``(output or None if stopped early, captured layer tensor)``."""
    out = None
    with probe(module, to_input=to_input, stop=stop) as cap:
        out = fn(*args)
    if cap.value is None:
        raise ValueError(
            "the layer was not called during the forward pass: it is not used by the model's forward "
            "(or is called only by code the rewrite replaced)"
        )
    return out, cap.value


def locate(twin: torch.nn.Module, model: torch.nn.Module, name: str, to_input: bool = False):
    """Where the twin shows the tensor that layer ``name`` of ``model`` takes in (or gives out).

    Returns ``(module of the twin to hook, hook its input?, transform or None)``: the captured
    tensor, passed through ``transform``, equals the original layer's input (or output) and
    is connected to the twin's autograd graph, saliency rules included. Most layers are
    their own twin's module. Where the rewrite fused or folded a layer, its tensor is
    recomputed from the neighbouring one with fastsal's ops:

    * a ReLU fused into the max-pool after it (the twin has an identity there): its output
      is ``relu(x)`` of the identity's input, with the rule;
    * that max-pool's input is likewise ``relu`` of the fused pool's input;
    * a convolution with an eval BatchNorm folded into it: its own output is recomputed
      from its input with the original weights;
    * the folded BatchNorm's input is that same original convolution output.
    """
    from fastsal import modules as m

    module = _twin_module(twin, name, model)
    if isinstance(module, m.FusedReLU):
        rule = _fused_rule(twin, module)
        return module, True, (None if to_input else (lambda x: _relu(x, rule)))
    if isinstance(module, m.SaliencyReLUMaxPool2d) and to_input:
        rule = module.rule
        return module, True, (lambda x: _relu(x, rule))
    if isinstance(module, m.SaliencyConv2d) and module.folded_batch_norm and not to_input:
        return module, True, m.SaliencyConv2d.from_conv2d(model.get_submodule(name))
    if isinstance(module, m.FoldedBatchNorm2d) and to_input:
        conv_name = module.folded_into
        return _twin_module(twin, conv_name, model), True, m.SaliencyConv2d.from_conv2d(model.get_submodule(conv_name))
    return module, to_input, None


def _relu(x: torch.Tensor, rule) -> torch.Tensor:
    from fastsal import ops

    return ops.relu(x, rule)


def _fused_rule(twin: torch.nn.Module, fused) -> object:
    pool = _twin_module(twin, fused.fused_into, None)
    return pool.rule


def _twin_module(twin: torch.nn.Module, name: str, model) -> torch.nn.Module:
    try:
        return twin.get_submodule(name)
    except AttributeError:
        kind = type(model.get_submodule(name)).__name__ if model is not None else "layer"
        raise ValueError(
            f"layer {name!r} ({kind}) has no counterpart in the saliency twin of the model, so its activations "
            "cannot be captured"
        ) from None


def capture(fn, args, twin: torch.nn.Module, model: torch.nn.Module, name: str, to_input: bool = False):
    """Run ``fn(*args)`` up to layer ``name`` of the twin; the layer's input or output tensor."""
    module, hook_input, transform = locate(twin, model, name, to_input)
    _, value = run_to_layer(fn, args, module, to_input=hook_input, stop=True)
    return transform(value) if transform is not None else value
