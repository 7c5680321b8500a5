"""fastsal's kernels as ``torch.library`` operators (namespace ``fastsal``).

With Triton installed each op is a ``triton_op`` (torch.compile can see the kernels and
a CUDA graph can capture them); without it, an opaque ``custom_op``. Either way the op's
body asks :func:`fastsal.backend.kernels_for` which implementation to run, so CPU tensors
get the plain-torch reference and ``torch.compile(fullgraph=True)`` traces the ops
without graph breaks on every device.

No ``from __future__ import annotations`` here: the schema is inferred from the hints.
"""

from typing import List, Tuple

import torch
from torch import Tensor

from fastsal._kernels import triton_available
from fastsal.backend import kernels_for


def _define(name: str, mutates_args=()):
    if triton_available() and hasattr(torch.library, "triton_op"):
        return torch.library.triton_op(f"fastsal::{name}", mutates_args=mutates_args)
    return torch.library.custom_op(f"fastsal::{name}", mutates_args=mutates_args)


@_define("relu_forward")
def relu_forward(x: Tensor, store_mask: bool) -> Tuple[Tensor, Tensor]:
    return kernels_for(x).relu_forward(x, store_mask)


@_define("relu_forward_", mutates_args=("x",))
def relu_forward_(x: Tensor, store_mask: bool) -> Tensor:
    return kernels_for(x).relu_forward_(x, store_mask)


@_define("relu_backward")
def relu_backward(grad: Tensor, bits: Tensor, rule: int) -> Tensor:
    return kernels_for(grad).relu_backward(grad, bits, rule)


@_define("relu_family_forward")
def relu_family_forward(x: Tensor, act: int, param: float, store_mask: bool) -> Tuple[Tensor, Tensor]:
    return kernels_for(x).relu_family_forward(x, act, param, store_mask)


@_define("relu_family_forward_", mutates_args=("x",))
def relu_family_forward_(x: Tensor, act: int, param: float, store_mask: bool) -> Tensor:
    return kernels_for(x).relu_family_forward_(x, act, param, store_mask)


@_define("relu_family_backward")
def relu_family_backward(grad: Tensor, bits: Tensor, rule: int, act: int, param: float) -> Tensor:
    return kernels_for(grad).relu_family_backward(grad, bits, rule, act, param)


@_define("max_pool2d_forward")
def max_pool2d_forward(
    x: Tensor,
    kernel_size: List[int],
    stride: List[int],
    padding: List[int],
    dilation: List[int],
    ceil_mode: bool,
    apply_relu: bool,
    store_mask: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    return kernels_for(x).max_pool2d_forward(
        x, kernel_size, stride, padding, dilation, ceil_mode, apply_relu, store_mask
    )


@_define("max_pool2d_backward")
def max_pool2d_backward(
    grad: Tensor,
    switches: Tensor,
    bits: Tensor,
    rule: int,
    input_shape: List[int],
    kernel_size: List[int],
    stride: List[int],
    padding: List[int],
    dilation: List[int],
    channels_last: bool,
) -> Tensor:
    return kernels_for(grad).max_pool2d_backward(
        grad, switches, bits, rule, input_shape, kernel_size, stride, padding, dilation, channels_last
    )


if not (triton_available() and hasattr(torch.library, "triton_op")):
    # an opaque custom_op needs shapes for tracing; the reference computes them on meta tensors
    from fastsal._kernels import reference as _ref

    for _op, _fn in (
        (relu_forward, _ref.relu_forward),
        (relu_forward_, lambda x, store_mask: _ref.pack_bits(x > 0) if store_mask else x.new_empty(0, dtype=torch.uint8)),
        (relu_backward, _ref.relu_backward),
        (relu_family_forward, _ref.relu_family_forward),
        (
            relu_family_forward_,
            lambda x, act, param, store_mask: _ref.pack_bits(_ref.family_mask(x, act, param))
            if store_mask else x.new_empty(0, dtype=torch.uint8),
        ),
        (relu_family_backward, _ref.relu_family_backward),
        (max_pool2d_forward, _ref.max_pool2d_forward),
        (max_pool2d_backward, _ref.max_pool2d_backward),
    ):
        _op.register_fake(_fn)
