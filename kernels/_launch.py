"""What every launcher shares: the int64 offset switch, the device guard, how a kernel is launched."""

from __future__ import annotations

import contextlib

import torch

from . import interpreting

# Offsets switch to int64 when one a launch can form reaches this. Tests lower it to exercise
# the int64 path on small tensors.
INT64_THRESHOLD = 2**31


def largest_offset(t: torch.Tensor) -> int:
    """The largest element offset, from the tensor's data pointer, that indexing ``t`` can form.

    ``sum((size - 1) * |stride|)``, plus one so that a dense tensor gives its ``numel()``
    (the kernels also form the flat index of their walk, which runs up to ``numel``). A
    strided view into a large storage can reach past ``numel()``, which is why ``numel()``
    alone is not the test.
    """
    if t.numel() == 0:
        return 0
    return 1 + sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()))


def needs_int64(*tensors: torch.Tensor) -> bool:
    """Whether a kernel reading or writing these tensors must compute offsets in int64."""
    return any(max(largest_offset(t), t.numel()) >= INT64_THRESHOLD for t in tensors)


def on_device_of(t: torch.Tensor):
    """Make ``t``'s GPU the current device while a kernel is launched.

    Triton launches on the current device and its current stream; a tensor on ``cuda:1``
    while ``cuda:0`` is current would otherwise be handed to a kernel on the wrong card.
    Only real CUDA tensors need it: the interpreter runs on the CPU, and the fake tensors
    torch.compile traces with launch nothing (inductor guards the device in its own code).
    """
    if t.device.type != "cuda" or type(t) is not torch.Tensor:
        return contextlib.nullcontext()
    return torch.cuda.device(t.device)


def launchable(kernel):
    """The kernel as torch.compile wants to see it (``wrap_triton``), or raw when interpreting.

    ``wrap_triton`` refuses to run under ``TRITON_INTERPRET=1`` on some torch versions, and
    the interpreter only ever runs eagerly, so it gets the plain kernel.
    """
    if interpreting():
        return kernel
    try:
        from torch.library import wrap_triton
    except ImportError:  # torch < 2.6 spelled it capture_triton
        from torch._library import capture_triton as wrap_triton
    return wrap_triton(kernel)
