"""Which implementation runs an op: the Triton kernels or the plain-torch reference.

``FASTSAL_BACKEND`` = ``auto`` (default: Triton on CUDA when it is installed, the reference
elsewhere), ``torch`` (always the reference) or ``triton`` (always the kernels; on a CPU
this needs ``TRITON_INTERPRET=1`` set before fastsal is imported).
"""

from __future__ import annotations

import os
from types import ModuleType

import torch

from fastsal._kernels import interpreting, reference, triton_available

_CHOICES = ("auto", "torch", "triton")


def requested_backend() -> str:
    value = os.environ.get("FASTSAL_BACKEND", "auto").strip().lower() or "auto"
    if value not in _CHOICES:
        raise ValueError(f"FASTSAL_BACKEND={value!r} is not one of {', '.join(_CHOICES)}")
    return value


class _TritonKernels:
    """Namespace of the Triton launchers, imported on first use (Triton is optional)."""

    _loaded = None

    @classmethod
    def get(cls):
        if cls._loaded is None:
            from fastsal._kernels import maxpool, relu

            ns = ModuleType("fastsal._kernels.triton")
            ns.relu_forward = relu.relu_forward
            ns.relu_forward_ = relu.relu_forward_
            ns.relu_backward = relu.relu_backward
            ns.relu_family_forward = relu.relu_family_forward
            ns.relu_family_forward_ = relu.relu_family_forward_
            ns.relu_family_backward = relu.relu_family_backward
            ns.max_pool2d_forward = maxpool.max_pool2d_forward
            ns.max_pool2d_backward = maxpool.max_pool2d_backward
            cls._loaded = ns
        return cls._loaded


def kernels_for(t: torch.Tensor):
    """The module of launchers (Triton or reference) that should handle tensor ``t``."""
    choice = requested_backend()
    if t.dtype == torch.float64 or choice == "torch":
        # the kernels compute in fp32; float64 (gradcheck) always takes the exact reference
        return reference
    on_gpu = t.device.type == "cuda"
    if choice == "auto":
        return _TritonKernels.get() if (on_gpu and triton_available()) else reference
    # choice == "triton"
    if not triton_available():
        raise RuntimeError("FASTSAL_BACKEND=triton but Triton cannot be imported; install triton or unset it")
    if on_gpu:
        return _TritonKernels.get()
    if not interpreting():
        raise RuntimeError(
            "FASTSAL_BACKEND=triton on a CPU tensor needs the Triton interpreter: "
            "set TRITON_INTERPRET=1 before importing fastsal (or use FASTSAL_BACKEND=torch)"
        )
    if type(t) is not torch.Tensor:
        # fake/functional tensors while torch.compile traces: the interpreter can't run on them
        return reference
    return _TritonKernels.get()
