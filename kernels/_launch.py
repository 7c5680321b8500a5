"""What every launcher shares: int64 offset switch, and how a kernel is launched."""

from __future__ import annotations

import torch

from . import interpreting

# Offsets switch to int64 when a tensor has this many elements or more. Tests lower it to
# exercise the int64 path on small tensors.
INT64_THRESHOLD = 2**31


def needs_int64(*tensors: torch.Tensor) -> bool:
    return any(t.numel() >= INT64_THRESHOLD for t in tensors)


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
