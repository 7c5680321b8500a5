"""Zeiler & Fergus feature visualization: project one channel of a layer back to pixel space.

Forward to ``layer``, keep only channel ``channel`` of its activations (all of them with
``seed="map"``, or only each sample's strongest one with ``seed="max"``) as the backward
seed, and send it back to the input through every ReLU with the chosen rule (DeconvNet,
as in the paper, by default). The forward stops at the layer: nothing after it runs.

Zeiler & Fergus project rectified activations: pick the ReLU (or the pool) after a
convolution as the layer to see what they saw.
"""

from __future__ import annotations

from typing import Any

import torch

from fastsal import _layers
from fastsal._pass import additional_args, check_inputs, grad_mode, leaf, plain, shared_twins
from fastsal.rules import RuleLike, as_rule

_SEEDS = ("map", "max")


def _seed(activations: torch.Tensor, channel: int, seed: str) -> torch.Tensor:
    """The backward seed: the channel's activations (or its maximum) and zeros elsewhere."""
    kept = torch.zeros_like(activations)
    chan = activations[:, channel].detach()
    if seed == "map":
        kept[:, channel] = chan
        return kept
    flat = chan.reshape(chan.shape[0], -1)
    if flat.shape[1] == 0:
        return kept
    where = flat.argmax(dim=1, keepdim=True)
    only_max = torch.zeros_like(flat).scatter_(1, where, flat.gather(1, where))
    kept[:, channel] = only_max.reshape(chan.shape)
    return kept


def visualize_feature(
    model: torch.nn.Module,
    inputs: torch.Tensor,
    layer,
    channel: int,
    method: RuleLike = "deconvnet",
    seed: str = "map",
    additional_forward_args: Any = None,
    check_finite: bool = True,
) -> torch.Tensor:
    """The projection of channel ``channel`` of ``layer`` onto ``inputs``: a tensor shaped like ``inputs``.

    Args:
        model: the network (never modified; its saliency twin is made once and reused).
        inputs: float tensor ``(N, C, H, W)``.
        layer: a module of ``model`` or its qualified name (``"features.8"``).
        channel: the channel of the layer's output (dim 1) to project.
        method: the ReLU rule for the way back: ``"deconvnet"`` (Zeiler & Fergus),
            ``"guided"`` or ``"gradient"``.
        seed: ``"map"`` projects the whole activation map of the channel, ``"max"`` only
            each sample's strongest activation in it.
        additional_forward_args: extra arguments for ``model``'s forward, as in Captum.
    """
    rule = as_rule(method)
    if seed not in _SEEDS:
        raise ValueError(f"seed must be 'map' or 'max', got {seed!r}")
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(inputs, torch.Tensor):
        raise TypeError(f"inputs must be a tensor, got {type(inputs).__name__}")
    if isinstance(channel, bool) or not isinstance(channel, int):
        raise TypeError(f"channel must be an int, got {type(channel).__name__}")
    check_inputs((inputs,), check_finite)
    name = _layers.qualified_name(model, layer)
    twin = shared_twins(model).get(rule)
    extra = tuple(plain(a) for a in additional_args(additional_forward_args))
    with grad_mode():
        x = leaf(inputs)
        acts = _layers.capture(twin, (x, *extra), twin, model, name, to_input=False)
        if not isinstance(acts, torch.Tensor):
            raise ValueError(f"layer {name!r} gives {len(acts)} tensors; feature visualization needs one")
        if acts.dim() < 2:
            raise ValueError(f"layer {name!r} gives a tensor of shape {tuple(acts.shape)}, which has no channel dimension")
        channels = acts.shape[1]
        if not 0 <= channel < channels:
            raise IndexError(f"channel {channel} is out of range: layer {name!r} has {channels} channels (0..{channels - 1})")
        if not acts.requires_grad:
            return torch.zeros_like(inputs)
        (proj,) = torch.autograd.grad(acts, x, grad_outputs=_seed(acts, channel, seed), allow_unused=True)
    return torch.zeros_like(inputs) if proj is None else proj


__all__ = ["visualize_feature"]
