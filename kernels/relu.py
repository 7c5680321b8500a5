"""The ReLU family's forward with a packed mask, and its backward for the three rules.

ReLU, clipped ReLU (ReLU6, Hardtanh(0, m)) and LeakyReLU(α) are rows of one kernel, picked by
the ``ACT`` constexpr, with the row's scalar (m or α) as a runtime argument: the table of
predicates and backward formulas is in ``reference.py``, which these kernels compute exactly.
A clipped ReLU's backward is the ReLU's (its mask bit already says where the derivative is 1),
so the backward kernel only tells ReLU (``ACT`` = 0) from LeakyReLU.

Both kernels walk the tensor in memory order, one mask byte (8 elements) per thread: the
[BLOCK_BYTES, VEC] tiles below put row j, the elements of mask byte j, in one thread, so
the byte is packed and unpacked in registers. The compiler then needs no shared-memory
layout conversion (no barrier) and moves the data in 128-bit vectors: VEC elements are
16 bytes (4 fp32, 8 fp16/bf16), and an fp32 byte takes two of them.

Every program but the last is full and runs without masks, so the vector accesses need
only the pointers' 16-byte alignment, not ``numel % 16 == 0``; the last program takes the
masked (scalar) path.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import launchable, needs_int64, on_device_of
from .reference import CLIPPED_RELU, DECONVNET, LEAKY_RELU, RELU

# One mask byte per thread at Triton's default of 4 warps: BLOCK_BYTES must equal
# 32 * num_warps, or the packed bytes no longer sit one per thread and the compiler goes
# through shared memory to store them. 1024 elements per program.
NUM_WARPS = 4
BLOCK_BYTES = 32 * NUM_WARPS


def vector_width(t: torch.Tensor) -> int:
    """Elements per 128-bit access (and per tile column): 4 for fp32, 8 for fp16/bf16."""
    return max(1, min(8, 16 // t.element_size()))


@triton.jit
def _relu_forward_block(
    x_ptr, y_ptr, bits_ptr,  # as in _relu_forward_kernel
    byte_offsets,  # the mask bytes this program writes, one per thread
    n_elements,
    param,  # as in _relu_forward_kernel
    ACT: tl.constexpr,
    STORE_MASK: tl.constexpr,
    MASKED: tl.constexpr,  # only the last program can run past n_elements
    VEC: tl.constexpr,
):
    lanes = tl.arange(0, VEC)
    packed = tl.zeros(byte_offsets.shape, tl.int32)
    for g in tl.static_range(8 // VEC):
        bit = g * VEC + lanes
        offsets = byte_offsets[:, None] * 8 + bit[None, :]
        if MASKED:
            mask = offsets < n_elements
            x = tl.load(x_ptr + offsets, mask=mask, other=0.0)
        else:
            x = tl.load(x_ptr + offsets)
        if ACT == 0:
            # relu as torch writes it: negatives become 0, NaN and -0.0 pass through unchanged
            y = tl.where(x < 0, tl.zeros_like(x), x)
        elif ACT == 1:
            # clamp(x, 0, m) as torch's CPU kernel: -0.0 and NaN pass; compared in fp32 with an fp32 m
            xf = x.to(tl.float32)
            y = tl.where(xf < 0, tl.zeros_like(xf), tl.where(xf > param, param, xf)).to(x.dtype)
        else:
            # leaky_relu as torch: x > 0 ? x : x * a, the product in fp32 (torch's opmath), rounded once
            xf = x.to(tl.float32)
            y = tl.where(xf > 0, xf, xf * param).to(x.dtype)
        if MASKED:
            tl.store(y_ptr + offsets, y, mask=mask)
        else:
            tl.store(y_ptr + offsets, y)
        if STORE_MASK:
            # the mask bit: where the local derivative is 1 (predicates after the store, as the
            # ReLU row always had them: computed before, they cost the fp32 ReLU 4 registers)
            if ACT == 1:
                keep = (x.to(tl.float32) > 0) & (x.to(tl.float32) < param)
            else:
                keep = x > 0
            packed |= tl.sum(keep.to(tl.int32) << bit[None, :], axis=1)
    if STORE_MASK:
        if MASKED:
            tl.store(bits_ptr + byte_offsets, packed.to(tl.uint8), mask=byte_offsets * 8 < n_elements)
        else:
            tl.store(bits_ptr + byte_offsets, packed.to(tl.uint8))


@triton.jit
def _relu_forward_kernel(
    x_ptr,  # input, dense, read in memory order
    y_ptr,  # the activation of x, same layout (may be x_ptr: each element is read before it is written)
    bits_ptr,  # uint8 mask, bit i of byte j = the row's predicate of x[8j + i] (x > 0 for ReLU)
    n_elements,
    param,  # fp32 scalar: m of a clipped ReLU, α of a LeakyReLU (unused by ReLU)
    ACT: tl.constexpr,  # 0 ReLU, 1 clipped ReLU, 2 LeakyReLU
    STORE_MASK: tl.constexpr,
    INT64: tl.constexpr,
    VEC: tl.constexpr,
    BLOCK_BYTES: tl.constexpr,
):
    pid = tl.program_id(0)
    if INT64:
        pid = pid.to(tl.int64)
    byte_offsets = pid * BLOCK_BYTES + tl.arange(0, BLOCK_BYTES)
    if (pid + 1) * (BLOCK_BYTES * 8) <= n_elements:
        _relu_forward_block(x_ptr, y_ptr, bits_ptr, byte_offsets, n_elements, param, ACT, STORE_MASK, False, VEC)
    else:
        _relu_forward_block(x_ptr, y_ptr, bits_ptr, byte_offsets, n_elements, param, ACT, STORE_MASK, True, VEC)


@triton.jit
def _relu_backward_block(
    grad_ptr, bits_ptr, out_ptr,  # as in _relu_backward_kernel
    byte_offsets,  # the mask bytes this program reads, one per thread
    n_elements,
    param,  # as in _relu_backward_kernel
    RULE: tl.constexpr,
    ACT: tl.constexpr,
    MASKED: tl.constexpr,
    VEC: tl.constexpr,
):
    lanes = tl.arange(0, VEC)
    if RULE != 1:
        if MASKED:
            packed = tl.load(bits_ptr + byte_offsets, mask=byte_offsets * 8 < n_elements, other=0).to(tl.int32)
        else:
            packed = tl.load(bits_ptr + byte_offsets).to(tl.int32)
    for g in tl.static_range(8 // VEC):
        bit = g * VEC + lanes
        offsets = byte_offsets[:, None] * 8 + bit[None, :]
        if MASKED:
            mask = offsets < n_elements
            r = tl.load(grad_ptr + offsets, mask=mask, other=0.0)
        else:
            r = tl.load(grad_ptr + offsets)
        zero = tl.zeros_like(r)
        if ACT == 0:
            if RULE != 1:
                positive = ((packed[:, None] >> bit[None, :]) & 1) != 0
                r = tl.where(positive, r, zero)
            if RULE != 0:
                # torch's relu: negatives become 0, NaN passes
                r = tl.where(r < 0, zero, r)
        else:
            # LeakyReLU (gradient or guided): relu(R) first for guided, then R where the bit is
            # set and α·R (in fp32, rounded once, as torch's leaky_relu_backward) elsewhere
            if RULE == 2:
                r = tl.where(r < 0, zero, r)
            positive = ((packed[:, None] >> bit[None, :]) & 1) != 0
            r = tl.where(positive, r, (r.to(tl.float32) * param).to(r.dtype))
        if MASKED:
            tl.store(out_ptr + offsets, r, mask=mask)
        else:
            tl.store(out_ptr + offsets, r)


@triton.jit
def _relu_backward_kernel(
    grad_ptr,  # R, the gradient arriving from above, same layout as the forward input
    bits_ptr,  # uint8 mask written by the forward (unused by DeconvNet)
    out_ptr,  # the gradient passed on, same layout
    n_elements,
    param,  # fp32 scalar: α of a LeakyReLU (unused by ReLU)
    RULE: tl.constexpr,  # 0 gradient, 1 deconvnet, 2 guided
    ACT: tl.constexpr,  # 0 ReLU (and clipped ReLU), 2 LeakyReLU (gradient and guided only)
    INT64: tl.constexpr,
    VEC: tl.constexpr,
    BLOCK_BYTES: tl.constexpr,
):
    pid = tl.program_id(0)
    if INT64:
        pid = pid.to(tl.int64)
    byte_offsets = pid * BLOCK_BYTES + tl.arange(0, BLOCK_BYTES)
    if (pid + 1) * (BLOCK_BYTES * 8) <= n_elements:
        _relu_backward_block(grad_ptr, bits_ptr, out_ptr, byte_offsets, n_elements, param, RULE, ACT, False, VEC)
    else:
        _relu_backward_block(grad_ptr, bits_ptr, out_ptr, byte_offsets, n_elements, param, RULE, ACT, True, VEC)


def _grid(n_elements: int):
    return (triton.cdiv(triton.cdiv(n_elements, 8), BLOCK_BYTES),)


def _launch_forward(x: torch.Tensor, y: torch.Tensor, bits: torch.Tensor, store_mask: bool,
                    act: int = RELU, param: float = 0.0) -> None:
    n = x.numel()
    with on_device_of(x):
        launchable(_relu_forward_kernel)[_grid(n)](
            # with no mask to store, any valid pointer stands in for bits (an empty tensor's may be null)
            x, y, bits if store_mask else y, n, float(param),
            ACT=act, STORE_MASK=store_mask, INT64=needs_int64(x), VEC=vector_width(x), BLOCK_BYTES=BLOCK_BYTES,
        )


def _check_act(act: int) -> None:
    if act not in (RELU, CLIPPED_RELU, LEAKY_RELU):
        raise ValueError(f"unknown activation code {act}")


def relu_family_forward(x: torch.Tensor, act: int, param: float, store_mask: bool):
    """``(activation(x), packed mask bits)``; ``x`` must be dense (any memory format)."""
    _check_act(act)
    y = torch.empty_like(x)
    n = x.numel()
    bits = torch.empty((n + 7) // 8 if store_mask else 0, dtype=torch.uint8, device=x.device)
    if n:
        _launch_forward(x, y, bits, store_mask, act, param)
    return y, bits


def relu_family_forward_(x: torch.Tensor, act: int, param: float, store_mask: bool) -> torch.Tensor:
    """In place: ``x`` (dense) becomes ``activation(x)``; returns the mask bits of the input.

    The same kernel with ``y_ptr = x_ptr``: every element is read before it is written, by
    the same thread, so nothing is read after being overwritten.
    """
    _check_act(act)
    n = x.numel()
    bits = torch.empty((n + 7) // 8 if store_mask else 0, dtype=torch.uint8, device=x.device)
    if n:
        _launch_forward(x, x, bits, store_mask, act, param)
    return bits


def relu_forward(x: torch.Tensor, store_mask: bool):
    """``(relu(x), bits of x > 0)``; ``x`` must be dense (any memory format)."""
    return relu_family_forward(x, RELU, 0.0, store_mask)


def relu_forward_(x: torch.Tensor, store_mask: bool) -> torch.Tensor:
    """In place: ``x`` (dense) becomes ``relu(x)``; returns the bits of ``x > 0``."""
    return relu_family_forward_(x, RELU, 0.0, store_mask)


def relu_family_backward(grad: torch.Tensor, bits: torch.Tensor, rule: int, act: int, param: float) -> torch.Tensor:
    """The rule applied to ``grad`` (dense, laid out as the forward input was) through ``act``."""
    _check_act(act)
    out = torch.empty_like(grad)
    n = grad.numel()
    if n == 0:
        return out
    # only a LeakyReLU's gradient and guided rules differ from the ReLU's (see the table in reference.py)
    kernel_act = LEAKY_RELU if act == LEAKY_RELU and rule != DECONVNET else RELU
    with on_device_of(grad):
        launchable(_relu_backward_kernel)[_grid(n)](
            grad, bits if rule != DECONVNET else grad, out, n, float(param),
            RULE=rule, ACT=kernel_act, INT64=needs_int64(grad), VEC=vector_width(grad), BLOCK_BYTES=BLOCK_BYTES,
        )
    return out


def relu_backward(grad: torch.Tensor, bits: torch.Tensor, rule: int) -> torch.Tensor:
    """The rule applied to ``grad`` (dense, laid out as the forward input was)."""
    return relu_family_backward(grad, bits, rule, RELU, 0.0)
