"""``fastsal.saliency``: one call for the common case.

``saliency(model, images)`` gives the guided-backprop map ``max_c |g_c|`` of each image's
predicted class, shape ``(N, H, W)``. ``target=`` picks other classes (Captum's forms),
``method=`` the rule, ``reduce=`` the reduction (``None`` for the raw gradient), and
``batch_size=`` splits large batches into chunks that are each one forward and one backward.
Several classes per sample (``target`` of shape ``(N, K)``, or ``top_k=K``) give maps
``(N, K, H, W)`` from one forward and K backward passes.
"""

from __future__ import annotations

from typing import Optional

import torch

from fastsal._backward import maps_of
from fastsal._pass import check_dtype, check_inputs, grad_mode, leaf, run, twin_for
from fastsal._torchscript import plain_autograd
from fastsal.reductions import Reduction, apply_reduction, get_reduction
from fastsal.rules import RuleLike, as_rule
from fastsal.targets import (
    TargetType,
    check_multi_shape,
    check_top_k,
    classes_k,
    is_multi,
    resolve,
    select,
    slice_target,
    top_classes,
)


def _use_channels_last(x: torch.Tensor, dtype: Optional[torch.dtype], channels_last: Optional[bool]) -> bool:
    if channels_last is not None:
        return bool(channels_last) and x.dim() == 4
    # it pays where tensor cores run the convolutions: half precision on a GPU
    return x.dim() == 4 and x.is_cuda and dtype in (torch.float16, torch.bfloat16)


def one_pass(twin, x: torch.Tensor, target: TargetType, dtype=None, channels_last=False):
    """``(logits, targets used, input gradient)`` from one forward and one backward.

    ``targets`` is a long tensor ``(N,)`` for ``(N, C)`` logits (the argmax when ``target``
    is None) and ``None`` for other output shapes.
    """
    with grad_mode():
        xl = leaf(x.contiguous(memory_format=torch.channels_last) if channels_last else x)
        out = _forward(twin, xl, dtype)
        classes = None
        if out.dim() == 2 and not isinstance(target, tuple) and (target is not None or out.shape[1] > 1):
            classes, picked = resolve(out, target)  # None: the predicted classes
        else:
            picked = select(out, target)
        (grad,) = torch.autograd.grad(picked.sum(), xl) if picked.requires_grad else (torch.zeros_like(xl),)
    return out.detach(), classes, grad


def _forward(twin, xl: torch.Tensor, dtype) -> torch.Tensor:
    out = run(twin, (xl,), dtype)
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"the model must return a tensor of logits, got {type(out).__name__}")
    return out


def several_pass(twin, x: torch.Tensor, target, top_k, reduce, dtype=None, channels_last=False):
    """``(logits, classes (N, K), maps (N, K, ...))`` from one forward and K backward passes.

    ``target`` is an ``(N, K)`` target (with ``top_k`` None) or None (with ``top_k`` the K).
    """
    with grad_mode():
        xl = leaf(x.contiguous(memory_format=torch.channels_last) if channels_last else x)
        out = _forward(twin, xl, dtype)
        if out.dim() != 2:
            raise ValueError(
                f"several classes per sample need logits of shape (N, C); the model returned {tuple(out.shape)}"
            )
        if top_k is not None:
            classes = top_classes(out, top_k)
        else:
            classes = classes_k(target, out.shape[0], out.shape[1], out.device)
        maps = maps_of(out, classes, xl, reduce)
    return out.detach(), classes, maps


def saliency(
    model: torch.nn.Module,
    inputs: torch.Tensor,
    target: TargetType = None,
    method: RuleLike = "guided",
    reduce: Reduction = "abs_max",
    batch_size: Optional[int] = None,
    dtype: Optional[torch.dtype] = None,
    channels_last: Optional[bool] = None,
    check_finite: bool = True,
    top_k: Optional[int] = None,
    activations: str = "relu",
) -> torch.Tensor:
    """Saliency maps of ``inputs`` (a float tensor ``(N, C, H, W)``) under ``model``.

    Args:
        target: None (each sample's predicted class; for a model with one output per
            sample, that output), an int, a list or 1-D tensor of per-sample classes, or a
            tuple index (Captum's forms); or K classes per sample, an ``(N, K)`` integer
            tensor or a list of N lists of K ints: maps ``(N, K, H, W)``.
        method: ``"gradient"``, ``"deconvnet"`` or ``"guided"`` (or a :class:`fastsal.Rule`).
        reduce: ``"abs_max"`` (Simonyan, ``(N, H, W)``), ``"abs_sum"``, ``"l2"``, ``"max"``,
            ``"sum"``, ``"abs"`` (channels kept), ``None`` (raw gradient) or a callable.
        batch_size: process the batch in chunks of this many samples.
        dtype: ``torch.float16``/``torch.bfloat16``: run under ``torch.autocast`` with the
            weights cast to ``dtype`` (the gradient comes back in the input's dtype).
        channels_last: run in channels_last memory format; default: only for half precision
            on a GPU, where it pays.
        check_finite: raise a ValueError for NaN/Inf inputs (one host sync); False skips it.
        top_k: explain each sample's ``top_k`` largest logits (largest first; with
            ``target=None``): maps ``(N, top_k, H, W)``, one forward and ``top_k`` backward passes.
        activations: ``"relu"`` (the ReLU family gets the rule) or ``"all"`` (smooth activations
            too: SiLU, GELU, ...); see :func:`fastsal.rewrite`.

    The model is rewritten once per rule and the rewrite reused on later calls; the model,
    its parameters and ``inputs`` are never modified. A TorchScript model (scripted or
    traced) is differentiated as it is for ``method="gradient"``; other rules refuse it.
    """
    rule = as_rule(method)
    if top_k is not None:
        check_top_k(top_k, target)
    check_dtype(dtype)
    get_reduction(reduce)  # unknown reductions fail before any work
    if not isinstance(inputs, torch.Tensor):
        raise TypeError(
            f"inputs must be a tensor, got {type(inputs).__name__}; for models with several inputs use the "
            "Captum-compatible classes (fastsal.GuidedBackprop, ...)"
        )
    check_inputs((inputs,), check_finite)
    if batch_size is not None and (not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}")
    plain = plain_autograd(model, rule, f"fastsal.saliency(method={str(rule)!r})")  # TorchScript, gradient
    twin = model if plain else twin_for(model, rule, activations)
    n = inputs.shape[0] if inputs.dim() else 1
    several = top_k is not None or is_multi(target)
    if several and inputs.dim() < 2:
        raise ValueError(f"inputs must be a batch (N, ...), got shape {tuple(inputs.shape)}")
    if is_multi(target):
        check_multi_shape(target, n)  # before chunking, which slices the rows
    cl = _use_channels_last(inputs, dtype, channels_last)

    def chunk(x, t):
        if several:
            return several_pass(twin, x, t, top_k, reduce, dtype, cl)[2]
        return apply_reduction(one_pass(twin, x, t, dtype, cl)[2], reduce)

    step = n if batch_size is None or batch_size >= n else batch_size
    if step == n or n == 0:
        return chunk(inputs, target)
    bounds = [(a, min(a + step, n)) for a in range(0, n, step)]
    return torch.cat([chunk(inputs[a:b], slice_target(target, a, b, n)) for a, b in bounds])


__all__ = ["saliency", "one_pass", "several_pass"]
