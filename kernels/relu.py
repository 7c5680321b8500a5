"""ReLU forward with a packed sign mask, and ReLU backward for the three rules.

Both kernels walk the tensor in memory order as a [BLOCK_BYTES, 8] tile: row j of the
tile holds the 8 elements whose signs go into mask byte j, so packing is a shift and a sum
along the short axis and the loads stay contiguous.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import launchable, needs_int64

# 256 mask bytes = 2048 elements per program: 16 elements per thread at 4 warps, enough
# independent loads in flight to saturate HBM on a memory-bound op.
BLOCK_BYTES = 256


@triton.jit
def _relu_forward_kernel(
    x_ptr,  # input, dense, read in memory order
    y_ptr,  # relu(x), same layout as x
    bits_ptr,  # uint8 mask, bit i of byte j = [x[8j + i] > 0]
    n_elements,
    STORE_MASK: tl.constexpr,
    INT64: tl.constexpr,
    BLOCK_BYTES: tl.constexpr,
):
    pid = tl.program_id(0)
    if INT64:
        pid = pid.to(tl.int64)
    byte_offsets = pid * BLOCK_BYTES + tl.arange(0, BLOCK_BYTES)
    lanes = tl.arange(0, 8)
    offsets = byte_offsets[:, None] * 8 + lanes[None, :]
    mask = offsets < n_elements
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0)
    # relu as torch writes it: negatives become 0, NaN and -0.0 pass through unchanged
    y = tl.where(x < 0, tl.zeros_like(x), x)
    tl.store(y_ptr + offsets, y, mask=mask)
    if STORE_MASK:
        positive = (x > 0).to(tl.int32)
        packed = tl.sum(positive << lanes[None, :], axis=1)
        tl.store(bits_ptr + byte_offsets, packed.to(tl.uint8), mask=byte_offsets * 8 < n_elements)


@triton.jit
def _relu_backward_kernel(
    grad_ptr,  # R, the gradient arriving from above, same layout as the forward input
    bits_ptr,  # uint8 mask of the forward input's sign (unused by DeconvNet)
    out_ptr,  # the gradient passed on, same layout
    n_elements,
    RULE: tl.constexpr,  # 0 gradient, 1 deconvnet, 2 guided
    INT64: tl.constexpr,
    BLOCK_BYTES: tl.constexpr,
):
    pid = tl.program_id(0)
    if INT64:
        pid = pid.to(tl.int64)
    byte_offsets = pid * BLOCK_BYTES + tl.arange(0, BLOCK_BYTES)
    lanes = tl.arange(0, 8)
    offsets = byte_offsets[:, None] * 8 + lanes[None, :]
    mask = offsets < n_elements
    r = tl.load(grad_ptr + offsets, mask=mask, other=0.0)
    zero = tl.zeros_like(r)
    if RULE != 1:
        packed = tl.load(bits_ptr + byte_offsets, mask=byte_offsets * 8 < n_elements, other=0)
        positive = ((packed.to(tl.int32)[:, None] >> lanes[None, :]) & 1) != 0
        r = tl.where(positive, r, zero)
    if RULE != 0:
        # torch's relu: negatives become 0, NaN passes
        r = tl.where(r < 0, zero, r)
    tl.store(out_ptr + offsets, r, mask=mask)


def _grid(n_elements: int):
    return (triton.cdiv(triton.cdiv(n_elements, 8), BLOCK_BYTES),)


def relu_forward(x: torch.Tensor, store_mask: bool):
    """``(relu(x), bits of x > 0)``; ``x`` must be dense (any memory format)."""
    y = torch.empty_like(x)
    n = x.numel()
    bits = torch.empty((n + 7) // 8 if store_mask else 0, dtype=torch.uint8, device=x.device)
    if n == 0:
        return y, bits
    launchable(_relu_forward_kernel)[_grid(n)](
        # an empty tensor may have a null pointer, which the launcher rejects: pass y instead
        x, y, bits if store_mask else y, n, STORE_MASK=store_mask, INT64=needs_int64(x), BLOCK_BYTES=BLOCK_BYTES
    )
    return y, bits


def relu_forward_(x: torch.Tensor, store_mask: bool) -> torch.Tensor:
    """In place: ``x`` (dense) becomes ``relu(x)``; returns the bits of ``x > 0``.

    The same kernel with ``y_ptr = x_ptr``: every element is read before it is written, by
    the same program, so nothing is read after being overwritten.
    """
    n = x.numel()
    bits = torch.empty((n + 7) // 8 if store_mask else 0, dtype=torch.uint8, device=x.device)
    if n == 0:
        return bits
    launchable(_relu_forward_kernel)[_grid(n)](
        x, x, bits if store_mask else x, n, STORE_MASK=store_mask, INT64=needs_int64(x), BLOCK_BYTES=BLOCK_BYTES
    )
    return bits


def relu_backward(grad: torch.Tensor, bits: torch.Tensor, rule: int) -> torch.Tensor:
    """The rule applied to ``grad`` (dense, laid out as the forward input was)."""
    out = torch.empty_like(grad)
    n = grad.numel()
    if n == 0:
        return out
    launchable(_relu_backward_kernel)[_grid(n)](
        grad, bits if rule != 1 else grad, out, n, RULE=rule, INT64=needs_int64(grad), BLOCK_BYTES=BLOCK_BYTES
    )
    return out
