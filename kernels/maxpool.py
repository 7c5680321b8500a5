"""Max-pool forward with int8 switches (optionally on relu(x)), and the unpool backward.

The forward writes, per pooled element, the value, the argmax's offset inside its window
(``kh * KW + kw``, so windows up to 127 positions fit an int8) and, for the fused ReLU,
one sign bit. The backward is a gather: each input position visits the windows that can
contain it and sums the gradients of those whose switch points at it, so overlapping
windows need no atomics and the result is deterministic. For the fused ReLU the rule is
then applied to that sum, with the sign bit of any window that pointed there.

Both kernels walk their output in memory order (NCHW or NHWC), so channels_last tensors
are read and written where they lie, without a copy.
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from ._launch import launchable, needs_int64, on_device_of
from .reference import pool_output_size
from .relu import vector_width

# Two pooled mask bytes (16 outputs) per thread at Triton's default of 4 warps: the sign bits
# and the switches are packed in registers, with no shared-memory conversion (as in relu.py),
# and a thread's 16 int8 switches leave in one 128-bit store. 2048 outputs per program.
NUM_WARPS = 4
FORWARD_BLOCK_BYTES = 32 * NUM_WARPS
# Input elements per program in the gather; each does up to KH*KW masked switch loads.
BACKWARD_BLOCK_SIZE = 512


@triton.jit
def _decompose(offsets, C, H, W, CHANNELS_LAST: tl.constexpr):
    """(n, c, h, w) of flat memory-order offsets in an NCHW or NHWC dense tensor.

    h and w come back as int32 whatever the offsets' type: they are coordinates inside one
    plane, and the window arithmetic on them (divisions by the stride) is far cheaper in
    32 bits. n and c keep the offsets' type, since only they can make an offset large.
    """
    if CHANNELS_LAST:
        c = offsets % C
        pixel = offsets // C
        n = pixel // (H * W)
        in_plane = (pixel - n * (H * W)).to(tl.int32)
    else:
        plane = offsets // (H * W)
        in_plane = (offsets - plane * (H * W)).to(tl.int32)
        n = plane // C
        c = plane - n * C
    h = in_plane // W
    w = in_plane - h * W
    return n, c, h, w


@triton.jit
def _pool_forward_group(
    x_ptr, out_ptr, switch_ptr,  # as in _max_pool2d_forward_kernel
    offsets,  # [BLOCK_BYTES, VEC] flat output offsets, one row per thread
    C, H, W, OH, OW, sxn, sxc, sxh, sxw, n_out, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr,
    CHANNELS_LAST: tl.constexpr, APPLY_RELU: tl.constexpr, MASKED: tl.constexpr, INT64: tl.constexpr,
):
    """Pool VEC outputs per thread; returns (pooled as float32, switch as int32)."""
    if MASKED:
        mask = offsets < n_out
    else:
        mask = tl.full(offsets.shape, True, tl.int1)
    n, c, oh, ow = _decompose(offsets, C, OH, OW, CHANNELS_LAST)
    base = x_ptr + n * sxn + c * sxc
    h0 = oh * stride_h - pad_h
    w0 = ow * stride_w - pad_w
    best = tl.full(offsets.shape, float("-inf"), tl.float32)
    switch = tl.full(offsets.shape, -1, tl.int32)
    for kh in tl.static_range(KH):
        ih = h0 + kh * dil_h
        row_ok = mask & (ih >= 0) & (ih < H)
        if INT64:
            row = base + ih.to(tl.int64) * sxh
        else:
            row = base + ih * sxh
        for kw in tl.static_range(KW):
            iw = w0 + kw * dil_w
            valid = row_ok & (iw >= 0) & (iw < W)
            if INT64:
                v = tl.load(row + iw.to(tl.int64) * sxw, mask=valid, other=float("-inf")).to(tl.float32)
            else:
                v = tl.load(row + iw * sxw, mask=valid, other=float("-inf")).to(tl.float32)
            if APPLY_RELU:
                v = tl.where(v < 0, tl.zeros_like(v), v)
            # torch's order: a strictly larger value or a NaN takes over; the first valid
            # position stands when every value is -inf
            take = valid & ((v > best) | (v != v) | (switch < 0))
            best = tl.where(take, v, best)
            switch = tl.where(take, kh * KW + kw, switch)
    switch = tl.where(switch < 0, 0, switch)
    if MASKED:
        tl.store(out_ptr + offsets, best.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(switch_ptr + offsets, switch.to(tl.int8), mask=mask)
    else:
        tl.store(out_ptr + offsets, best.to(out_ptr.dtype.element_ty))
    return best, switch


@triton.jit
def _pool_forward_byte(
    x_ptr, out_ptr, switch_ptr, bits_ptr,
    byte_offsets,  # [BLOCK_BYTES]: one pooled mask byte (8 outputs) per thread
    C, H, W, OH, OW, sxn, sxc, sxh, sxw, n_out, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr,
    CHANNELS_LAST: tl.constexpr, APPLY_RELU: tl.constexpr, STORE_MASK: tl.constexpr,
    MASKED: tl.constexpr, INT64: tl.constexpr, VEC: tl.constexpr,
):
    """Pool 8 outputs per thread and store their values; returns the byte's eight switches
    packed little-endian into an int64, and its sign bits (the masked path stores both)."""
    lanes = tl.arange(0, VEC)
    packed_bits = tl.zeros(byte_offsets.shape, tl.int32)
    packed_switches = tl.zeros(byte_offsets.shape, tl.int64)
    for g in tl.static_range(8 // VEC):
        bit = g * VEC + lanes
        offsets = byte_offsets[:, None] * 8 + bit[None, :]
        best, switch = _pool_forward_group(
            x_ptr, out_ptr, switch_ptr, offsets,
            C, H, W, OH, OW, sxn, sxc, sxh, sxw, n_out, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
            KH, KW, CHANNELS_LAST, APPLY_RELU, MASKED, INT64,
        )
        if STORE_MASK:
            packed_bits |= tl.sum(tl.where(best > 0, 1 << bit[None, :], 0), axis=1)
        if not MASKED:
            packed_switches |= tl.sum(switch.to(tl.int64) << (8 * bit[None, :]).to(tl.int64), axis=1)
    if MASKED and STORE_MASK:
        tl.store(bits_ptr + byte_offsets, packed_bits.to(tl.uint8), mask=byte_offsets * 8 < n_out)
    return packed_switches, packed_bits


@triton.jit
def _pool_forward_block(
    x_ptr, out_ptr, switch_ptr, bits_ptr,
    pairs,  # [BLOCK_BYTES]: each thread's pair of pooled mask bytes (16 outputs)
    C, H, W, OH, OW, sxn, sxc, sxh, sxw, n_out, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr,
    CHANNELS_LAST: tl.constexpr, APPLY_RELU: tl.constexpr, STORE_MASK: tl.constexpr,
    MASKED: tl.constexpr, INT64: tl.constexpr, VEC: tl.constexpr,
):
    s0, b0 = _pool_forward_byte(
        x_ptr, out_ptr, switch_ptr, bits_ptr, pairs * 2,
        C, H, W, OH, OW, sxn, sxc, sxh, sxw, n_out, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
        KH, KW, CHANNELS_LAST, APPLY_RELU, STORE_MASK, MASKED, INT64, VEC,
    )
    s1, b1 = _pool_forward_byte(
        x_ptr, out_ptr, switch_ptr, bits_ptr, pairs * 2 + 1,
        C, H, W, OH, OW, sxn, sxc, sxh, sxw, n_out, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
        KH, KW, CHANNELS_LAST, APPLY_RELU, STORE_MASK, MASKED, INT64, VEC,
    )
    if not MASKED:
        # 16 switches in one 128-bit store, 16 sign bits in one 16-bit store
        words = pairs[:, None] * 2 + tl.arange(0, 2)[None, :]
        if KH * KW == 1:
            # every switch is 0; joining two constant tensors would cost a shared-memory
            # layout conversion, a zero tile costs nothing
            tl.store(switch_ptr.to(tl.pointer_type(tl.int64)) + words, tl.zeros(words.shape, tl.int64))
        else:
            tl.store(switch_ptr.to(tl.pointer_type(tl.int64)) + words, tl.join(s0, s1))
        if STORE_MASK:
            tl.store(bits_ptr.to(tl.pointer_type(tl.int16)) + pairs, (b0 | (b1 << 8)).to(tl.int16))


@triton.jit
def _max_pool2d_forward_kernel(
    x_ptr,  # input (N, C, H, W), any strides
    out_ptr,  # pooled (N, C, OH, OW), dense in the memory format being walked
    switch_ptr,  # int8 argmax offset inside the window, laid out as out
    bits_ptr,  # uint8 packed [pooled > 0], in out's memory order
    C, H, W, OH, OW,
    sxn, sxc, sxh, sxw,  # input strides, in elements
    n_out,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    KH: tl.constexpr,
    KW: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    APPLY_RELU: tl.constexpr,
    STORE_MASK: tl.constexpr,
    INT64: tl.constexpr,
    VEC: tl.constexpr,  # outputs per 128-bit store: 4 fp32, 8 fp16/bf16
    BLOCK_BYTES: tl.constexpr,  # threads per program; each pools 16 outputs (two mask bytes)
):
    pid = tl.program_id(0)
    if INT64:
        pid = pid.to(tl.int64)
    pairs = pid * BLOCK_BYTES + tl.arange(0, BLOCK_BYTES)
    # every program but the last is full: no masks, so the stores can be vectors
    if (pid + 1) * (BLOCK_BYTES * 16) <= n_out:
        _pool_forward_block(
            x_ptr, out_ptr, switch_ptr, bits_ptr, pairs,
            C, H, W, OH, OW, sxn, sxc, sxh, sxw, n_out, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
            KH, KW, CHANNELS_LAST, APPLY_RELU, STORE_MASK, False, INT64, VEC,
        )
    else:
        _pool_forward_block(
            x_ptr, out_ptr, switch_ptr, bits_ptr, pairs,
            C, H, W, OH, OW, sxn, sxc, sxh, sxw, n_out, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
            KH, KW, CHANNELS_LAST, APPLY_RELU, STORE_MASK, True, INT64, VEC,
        )


@triton.jit
def _unpool_backward_kernel(
    grad_ptr,  # gradient of the pooled output (N, C, OH, OW), any strides
    switch_ptr,  # int8 switches, dense in the forward output's memory format
    bits_ptr,  # uint8 packed [pooled > 0] (fused ReLU rules 0 and 2 only)
    out_ptr,  # gradient of the input (N, C, H, W), dense in the memory format being walked
    C, H, W, OH, OW,
    sgn, sgc, sgh, sgw,  # grad strides
    ssn, ssc, ssh, ssw,  # switch strides
    n_in,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    KH: tl.constexpr,
    KW: tl.constexpr,
    RULE: tl.constexpr,  # -1 plain unpool, 0 gradient, 1 deconvnet, 2 guided
    CHANNELS_LAST: tl.constexpr,
    INT64: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    pid = tl.program_id(0)
    if INT64:
        pid = pid.to(tl.int64)
    offsets = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n_in
    n, c, ih, iw = _decompose(offsets, C, H, W, CHANNELS_LAST)
    # the (n, c) parts of the offsets, once; the window arithmetic below stays in int32
    s_plane = n * ssn + c * ssc
    g_plane = n * sgn + c * sgc
    acc = tl.zeros((BLOCK_SIZE,), dtype=tl.float32)
    positive = tl.zeros((BLOCK_SIZE,), dtype=tl.int32)
    for kh in tl.static_range(KH):
        # the window row oh contains ih at offset kh iff oh * stride_h == ih + pad_h - kh * dil_h
        th = ih + pad_h - kh * dil_h
        oh = th // stride_h
        row_ok = mask & (th >= 0) & (th - oh * stride_h == 0) & (oh < OH)
        if INT64:
            s_row = s_plane + oh.to(tl.int64) * ssh
            g_row = g_plane + oh.to(tl.int64) * sgh
        else:
            s_row = s_plane + oh * ssh
            g_row = g_plane + oh * sgh
        for kw in tl.static_range(KW):
            tw = iw + pad_w - kw * dil_w
            ow = tw // stride_w
            ok = row_ok & (tw >= 0) & (tw - ow * stride_w == 0) & (ow < OW)
            if INT64:
                s_off = s_row + ow.to(tl.int64) * ssw
                g_off = g_row + ow.to(tl.int64) * sgw
            else:
                s_off = s_row + ow * ssw
                g_off = g_row + ow * sgw
            s = tl.load(switch_ptr + s_off, mask=ok, other=-1).to(tl.int32)
            hit = ok & (s == kh * KW + kw)
            g = tl.load(grad_ptr + g_off, mask=hit, other=0.0).to(tl.float32)
            acc += tl.where(hit, g, 0.0)
            if RULE == 0 or RULE == 2:
                # switches are dense, so their offset is the pooled element's memory-order index
                packed = tl.load(bits_ptr + (s_off >> 3), mask=hit, other=0).to(tl.int32)
                positive = positive | (((packed >> (s_off & 7).to(tl.int32)) & 1) & hit.to(tl.int32))
    # the fused ReLU's rule acts on the summed gradient, as it does after a separate unpool;
    # every window that points here saw the same ReLU input, so one sign serves them all
    if RULE == 0 or RULE == 2:
        acc = tl.where(positive != 0, acc, 0.0)
    if RULE == 1 or RULE == 2:
        acc = tl.where(acc < 0, 0.0, acc)
    tl.store(out_ptr + offsets, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _is_channels_last(x: torch.Tensor) -> bool:
    return x.dim() == 4 and x.size(1) > 1 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def max_pool2d_forward(
    x: torch.Tensor,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    ceil_mode: bool,
    apply_relu: bool,
    store_mask: bool,
):
    """Same contract as :func:`fastsal._kernels.reference.max_pool2d_forward`."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    n, c, h, w = x.shape
    oh = pool_output_size(h, kh, sh, ph, dh, ceil_mode)
    ow = pool_output_size(w, kw, sw, pw, dw, ceil_mode)
    channels_last = _is_channels_last(x)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out = torch.empty((n, c, oh, ow), dtype=x.dtype, device=x.device, memory_format=fmt)
    switches = torch.empty((n, c, oh, ow), dtype=torch.int8, device=x.device, memory_format=fmt)
    n_out = out.numel()
    bits = torch.empty((n_out + 7) // 8 if store_mask else 0, dtype=torch.uint8, device=x.device)
    if n_out == 0:
        return out, switches, bits
    grid = (triton.cdiv(n_out, 16 * FORWARD_BLOCK_BYTES),)
    with on_device_of(x):
        launchable(_max_pool2d_forward_kernel)[grid](
            x, out, switches, bits if store_mask else switches,
            c, h, w, oh, ow,
            *x.stride(),
            n_out,
            sh, sw, ph, pw, dh, dw,
            KH=kh, KW=kw,
            CHANNELS_LAST=channels_last, APPLY_RELU=apply_relu, STORE_MASK=store_mask,
            INT64=needs_int64(x, out), VEC=vector_width(out), BLOCK_BYTES=FORWARD_BLOCK_BYTES,
        )
    return out, switches, bits


def max_pool2d_backward(
    grad: torch.Tensor,
    switches: torch.Tensor,
    bits: torch.Tensor,
    rule: int,
    input_shape: Sequence[int],
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    channels_last: bool,
) -> torch.Tensor:
    """Same contract as :func:`fastsal._kernels.reference.max_pool2d_backward`."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    n, c, h, w = input_shape
    oh, ow = switches.shape[-2:]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out = torch.empty((n, c, h, w), dtype=grad.dtype, device=grad.device, memory_format=fmt)
    n_in = out.numel()
    if n_in == 0:
        return out
    if grad.numel() == 0:
        return out.zero_()
    grid = (triton.cdiv(n_in, BACKWARD_BLOCK_SIZE),)
    with on_device_of(grad):
        launchable(_unpool_backward_kernel)[grid](
            grad, switches, bits if rule in (0, 2) else switches, out,
            c, h, w, oh, ow,
            *grad.stride(),
            *switches.stride(),
            n_in,
            sh, sw, ph, pw, dh, dw,
            KH=kh, KW=kw, RULE=rule,
            CHANNELS_LAST=channels_last,
            INT64=needs_int64(out, grad, switches), BLOCK_SIZE=BACKWARD_BLOCK_SIZE,
        )
    return out
