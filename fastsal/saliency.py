"""``fastsal.saliency``: one call for the common case.

``saliency(model, images)`` gives the guided-backprop map ``max_c |g_c|`` of each image's
predicted class, shape ``(N, H, W)``. ``target=`` picks other classes (Captum's forms),
``method=`` the rule, ``reduce=`` the reduction (``None`` for the raw gradient), and
``batch_size=`` splits large batches into chunks that are each one forward and one backward.
"""

from __future__ import annotations

from typing import Optional

import torch

from fastsal._pass import check_dtype, check_inputs, grad_mode, leaf, run, twin_for
from fastsal.reductions import Reduction, apply_reduction, get_reduction
from fastsal.rules import RuleLike, as_rule
from fastsal.targets import TargetType, resolve, select, slice_target


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
        out = run(twin, (xl,), dtype)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"the model must return a tensor of logits, got {type(out).__name__}")
        classes = None
        if out.dim() == 2 and not isinstance(target, tuple) and (target is not None or out.shape[1] > 1):
            classes, picked = resolve(out, target)  # None: the predicted classes
        else:
            picked = select(out, target)
        (grad,) = torch.autograd.grad(picked.sum(), xl) if picked.requires_grad else (torch.zeros_like(xl),)
    return out.detach(), classes, grad


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
) -> torch.Tensor:
    """Saliency maps of ``inputs`` (a float tensor ``(N, C, H, W)``) under ``model``.

    Args:
        target: None (each sample's predicted class; for a model with one output per
            sample, that output), an int, a list or 1-D tensor of per-sample classes, or a
            tuple index (Captum's forms).
        method: ``"gradient"``, ``"deconvnet"`` or ``"guided"`` (or a :class:`fastsal.Rule`).
        reduce: ``"abs_max"`` (Simonyan, ``(N, H, W)``), ``"abs_sum"``, ``"l2"``, ``"max"``,
            ``"sum"``, ``"abs"`` (channels kept), ``None`` (raw gradient) or a callable.
        batch_size: process the batch in chunks of this many samples.
        dtype: ``torch.float16``/``torch.bfloat16``: run under ``torch.autocast`` with the
            weights cast to ``dtype`` (the gradient comes back in the input's dtype).
        channels_last: run in channels_last memory format; default: only for half precision
            on a GPU, where it pays.
        check_finite: raise a ValueError for NaN/Inf inputs (one host sync); False skips it.

    The model is rewritten once per rule and the rewrite reused on later calls; the model,
    its parameters and ``inputs`` are never modified.
    """
    rule = as_rule(method)
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
    twin = twin_for(model, rule)
    n = inputs.shape[0] if inputs.dim() else 1
    cl = _use_channels_last(inputs, dtype, channels_last)
    step = n if batch_size is None or batch_size >= n else batch_size
    if step == n or n == 0:
        _, _, grad = one_pass(twin, inputs, target, dtype, cl)
        return apply_reduction(grad, reduce)
    maps = []
    for start in range(0, n, step):
        stop = min(start + step, n)
        _, _, grad = one_pass(twin, inputs[start:stop], slice_target(target, start, stop, n), dtype, cl)
        maps.append(apply_reduction(grad, reduce))
    return torch.cat(maps)


__all__ = ["saliency", "one_pass"]
