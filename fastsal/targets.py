"""Targets: which output of the model a saliency pass starts its backward from.

The forms follow Captum (``captum._utils.common._select_targets``), with range and length
checks that raise clear errors instead of assertions or CUDA index faults:

* ``None``: the model's output must be one number per sample (shape ``(N,)`` or ``(N, 1)``);
  :func:`predicted` turns ``None`` into the argmax class for ``(N, C)`` logits instead.
* an ``int`` (or a one-element integer tensor): ``output[:, t]`` for every sample.
* a ``tuple`` of ints: ``output[(slice(None), *t)]``, for outputs with more than two dims.
* a ``list`` of ints, or a 1-D integer tensor, with one entry per sample (``(N, C)`` outputs).
* a ``list`` of tuples, one per sample: ``output[i][t_i]``.

Negative indices count from the end, as in Python indexing. The backward seed is the
selected output itself (a logit, not a softmax probability).

Several classes per sample (:func:`is_multi`, :func:`classes_k`, :func:`top_classes`), for
``(N, C)`` logits only: a 2-D integer tensor ``(N, K)`` or a list of N lists of K ints, or
``top_k=K`` (the K largest logits of each sample, largest first). Each of the K columns is
one backward pass through the same forward.
"""

from __future__ import annotations

from typing import List, Tuple, Union

import torch

TargetType = Union[None, int, Tuple[int, ...], torch.Tensor, List[int], List[Tuple[int, ...]], List[List[int]]]


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_index(index: int, size: int, what: str, dim: int = 1) -> int:
    if not -size <= index < size:
        where = f"a model output with {size} classes" if dim == 1 else f"dimension {dim} (size {size}) of the model output"
        raise IndexError(f"{what} {index} is out of range for {where} (valid: 0..{size - 1})")
    return index % size


def _per_sample_scalar(selected: torch.Tensor, output: torch.Tensor, target) -> torch.Tensor:
    if selected.dim() > 1 and selected[0].numel() != 1:
        raise ValueError(
            f"target {target!r} selects {tuple(selected.shape[1:])} values per sample from a model output of shape "
            f"{tuple(output.shape)}; a saliency map needs one number per sample: index the remaining dimensions "
            "with a longer tuple target"
        )
    return selected.reshape(selected.shape[0]) if selected.dim() > 1 else selected


def _select_column(output: torch.Tensor, index: Tuple[int, ...], target) -> torch.Tensor:
    if output.dim() < 2:
        raise ValueError(
            f"target {target!r} needs a model output with a class dimension, but the output has shape "
            f"{tuple(output.shape)}; use target=None for one number per sample"
        )
    if len(index) > output.dim() - 1:
        raise ValueError(
            f"target {target!r} has {len(index)} indices but the model output {tuple(output.shape)} has only "
            f"{output.dim() - 1} dimensions after the batch"
        )
    fixed = []
    for dim, i in enumerate(index, start=1):
        if not _is_int(i):
            raise TypeError(f"target indices must be ints, got {i!r} in {target!r}")
        fixed.append(_check_index(i, output.shape[dim], "target", dim))
    return _per_sample_scalar(output[(slice(None), *fixed)], output, target)


def _per_sample_classes(output: torch.Tensor, classes, target) -> torch.Tensor:
    """``output[i, classes[i]]`` after checking shapes and ranges (one host sync for the range)."""
    n = output.shape[0] if output.dim() else 1
    if output.dim() != 2:
        raise ValueError(
            f"a per-sample target needs a model output of shape (N, C), got {tuple(output.shape)}; "
            "use a list of tuples to index a higher-dimensional output"
        )
    index = classes_for(classes, n, output.shape[1], output.device)
    return output.gather(1, index[:, None]).squeeze(1)


def select(output: torch.Tensor, target: TargetType) -> torch.Tensor:
    """The outputs the backward starts from, one per sample: a tensor of shape ``(N,)``.

    Summing it and taking the gradient gives every sample's gradient at once, as the
    samples of a batch are independent.
    """
    if not isinstance(output, torch.Tensor):
        raise TypeError(f"the model must return a tensor, got {type(output).__name__}")
    if target is None:
        if output.dim() == 0:
            return output.reshape(1)
        if output[0].numel() != 1:
            raise ValueError(
                f"target is None but the model output has shape {tuple(output.shape)}, more than one number per "
                "sample; pass target= (a class index, or one per sample)"
            )
        return output.reshape(output.shape[0])
    if _is_int(target):
        return _select_column(output, (target,), target)
    if isinstance(target, tuple):
        return _select_column(output, target, target)
    if isinstance(target, torch.Tensor):
        if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
            raise TypeError(f"a target tensor must hold integer class indices, got dtype {target.dtype}")
        if target.numel() == 1:  # as Captum: one class for every sample
            index = int(target.reshape(()))
            return _select_column(output, (index,), index)
        if target.dim() != 1:
            raise ValueError(f"a target tensor must be 0-D or 1-D (one class per sample), got shape {tuple(target.shape)}")
        return _per_sample_classes(output, target, target)
    if isinstance(target, list):
        n = output.shape[0] if output.dim() else 1
        if len(target) != n:
            raise ValueError(
                f"target has {len(target)} entries but the batch has {n} samples; give one target per sample, "
                "one int for all of them, or None"
            )
        if all(_is_int(t) for t in target):
            return _per_sample_classes(output, target, target)
        if all(isinstance(t, tuple) for t in target):
            rows = []
            for i, t in enumerate(target):
                picked = _select_column(output[i : i + 1], t, t)
                rows.append(picked)
            return torch.cat(rows) if rows else output.new_empty(0)
        raise TypeError("a target list must hold ints (one class per sample) or tuples (one index per sample)")
    raise TypeError(
        f"target must be None, an int, a tuple of ints, a list or a 1-D integer tensor, got {type(target).__name__}"
    )


def predicted(output: torch.Tensor) -> torch.Tensor:
    """The argmax class of each sample of ``(N, C)`` logits, as a long tensor (no host sync)."""
    if output.dim() != 2:
        raise ValueError(
            f"target=None means the predicted class, which needs logits of shape (N, C); the model returned "
            f"{tuple(output.shape)}: pass target= explicitly"
        )
    return output.argmax(dim=1)


def classes_for(target: TargetType, n: int, num_classes: int, device=None) -> torch.Tensor:
    """A non-None class target as a long tensor ``(n,)`` of indices in ``[0, num_classes)``, checked."""
    if _is_int(target):
        index = _check_index(target, num_classes, "target")
        return torch.full((n,), index, dtype=torch.long, device=device)
    if isinstance(target, tuple) and len(target) == 1 and _is_int(target[0]):
        return classes_for(target[0], n, num_classes, device)
    if isinstance(target, list):
        if not all(_is_int(t) for t in target):
            raise TypeError("for (N, C) logits a target list must hold one int class index per sample")
        target = torch.tensor(target, dtype=torch.long)
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be None, an int, a list or a 1-D integer tensor of class indices, got {target!r}")
    if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
        raise TypeError(f"a target tensor must hold integer class indices, got dtype {target.dtype}")
    if target.numel() == 1 and (target.dim() == 0 or n != 1):
        return classes_for(int(target.reshape(())), n, num_classes, device)
    if target.dim() != 1:
        raise ValueError(f"a target tensor must be 0-D or 1-D (one class per sample), got shape {tuple(target.shape)}")
    if target.numel() != n:
        raise ValueError(
            f"target has {target.numel()} entries but the batch has {n} samples; give one target per sample, "
            "one int for all of them, or None"
        )
    target = target.to(device=device, dtype=torch.long)
    if n:
        low, high = int(target.min()), int(target.max())
        if low < -num_classes or high >= num_classes:
            bad = low if low < -num_classes else high
            raise IndexError(
                f"target {bad} is out of range for a model output with {num_classes} classes "
                f"(valid: 0..{num_classes - 1})"
            )
    return torch.remainder(target, num_classes)


def resolve(output: torch.Tensor, target: TargetType) -> Tuple[torch.Tensor, torch.Tensor]:
    """For ``(N, C)`` logits: ``(classes, selected)``, with ``target=None`` the predicted classes.

    ``classes`` is a long tensor of shape ``(N,)`` on the output's device.
    """
    if output.dim() != 2:
        raise ValueError(f"expected logits of shape (N, C), the model returned {tuple(output.shape)}")
    n, size = output.shape
    classes = predicted(output) if target is None else classes_for(target, n, size, output.device)
    return classes, output.gather(1, classes[:, None]).squeeze(1)


def slice_target(target, start: int, stop: int, n: int):
    """The part of a per-sample target that belongs to samples ``start:stop`` of a batch of ``n``."""
    if isinstance(target, torch.Tensor) and target.dim() == 1 and target.numel() == n and n > 1:
        return target[start:stop]
    if is_multi(target):  # (N, K): rows are samples (the shape was checked against n before)
        return target[start:stop]
    if isinstance(target, list):
        if len(target) != n:
            raise ValueError(
                f"target has {len(target)} entries but the batch has {n} samples; give one target per sample, "
                "one int for all of them, or None"
            )
        return target[start:stop]
    return target


def is_multi(target) -> bool:
    """Whether ``target`` gives several classes per sample: a 2-D tensor or a list of lists."""
    if isinstance(target, torch.Tensor):
        return target.dim() == 2
    return isinstance(target, list) and len(target) > 0 and all(isinstance(t, list) for t in target)


def check_multi_shape(target, n: int) -> int:
    """K, after checking that a several-classes target has one row of K >= 1 classes per sample."""
    if isinstance(target, torch.Tensor):
        if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
            raise TypeError(f"a target tensor must hold integer class indices, got dtype {target.dtype}")
        rows, k = target.shape
    else:
        rows, lengths = len(target), {len(t) for t in target}
        if len(lengths) != 1:
            raise ValueError(
                f"a target list of lists must give the same number of classes for every sample, got lengths "
                f"{sorted(lengths)}"
            )
        (k,) = lengths
        if not all(_is_int(c) for t in target for c in t):
            raise TypeError("a target list of lists must hold int class indices")
    if rows != n:
        raise ValueError(
            f"target has shape ({rows}, {k}) but the batch has {n} samples; a target with several classes per "
            "sample must be (N, K): one row of K classes for each sample"
        )
    if k < 1:
        raise ValueError(f"target has shape ({rows}, {k}): give at least one class per sample (K >= 1)")
    return k


def classes_k(target, n: int, num_classes: int, device=None) -> torch.Tensor:
    """A several-classes target as a long tensor ``(n, K)`` of indices in ``[0, num_classes)``, checked."""
    check_multi_shape(target, n)
    classes = torch.as_tensor(target, dtype=torch.long) if isinstance(target, list) else target
    classes = classes.to(device=device, dtype=torch.long)
    if classes.numel():
        low, high = int(classes.min()), int(classes.max())
        if low < -num_classes or high >= num_classes:
            bad = low if low < -num_classes else high
            raise IndexError(
                f"target {bad} is out of range for a model output with {num_classes} classes "
                f"(valid: 0..{num_classes - 1})"
            )
    return torch.remainder(classes, num_classes)


def check_top_k(top_k, target) -> int:
    """``top_k`` as an int >= 1 (its upper bound, the number of classes, is checked on the logits)."""
    if not _is_int(top_k):
        raise TypeError(f"top_k must be an int (how many of the largest logits to explain), got {top_k!r}")
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    if target is not None:
        raise ValueError("pass either target= or top_k=, not both: top_k explains each sample's K largest logits")
    return top_k


def top_classes(logits: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` classes with the largest logits of each sample, largest first: ``(N, k)`` long."""
    if logits.dim() != 2:
        raise ValueError(f"top_k needs logits of shape (N, C), the model returned {tuple(logits.shape)}")
    if k > logits.shape[1]:
        raise ValueError(f"top_k={k} is more than the model's {logits.shape[1]} classes")
    return logits.topk(k, dim=1).indices


__all__ = [
    "TargetType",
    "select",
    "predicted",
    "classes_for",
    "resolve",
    "slice_target",
    "is_multi",
    "check_multi_shape",
    "classes_k",
    "check_top_k",
    "top_classes",
]
