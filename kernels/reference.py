"""Plain-torch reference of every kernel, with the launchers' exact signatures.

This is both the CPU path and the oracle the Triton kernels are tested against. Tensors
are handled in their *memory order* (channels_last stays channels_last), and bitmasks
pack 8 positions per uint8 in that order, so a mask written by a kernel and one written
here are byte-identical.

Rule codes follow :class:`fastsal.Rule`: 0 gradient, 1 deconvnet, 2 guided; -1 in the
pool backward means "plain unpool, no ReLU rule".
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

GRADIENT, DECONVNET, GUIDED, NO_RULE = 0, 1, 2, -1

# The ReLU family (codes as in :class:`fastsal.Activation`), each with one scalar parameter:
#   code          forward                  mask bit (1 bit per element)   backward where the bit is 0
#   RELU          relu(f)                  f > 0                          0
#   CLIPPED_RELU  hardtanh(f, 0, m)        0 < f < m                      0
#   LEAKY_RELU    leaky_relu(f, a)         f > 0                          a * R
# Where the bit is 1 the local derivative is 1. The three rules on top of that, for every row:
#   gradient  = the local derivative applied to R
#   deconvnet = relu(R)                                   (no forward state: no mask is kept)
#   guided    = the local derivative applied to relu(R)   (R·local·[R > 0])
# So a clipped ReLU's backward *is* the ReLU's, given its own mask bit; only a LeakyReLU's
# differs. The comparisons run in float32 for half-precision tensors, with m as a float32, as
# torch's hardtanh_backward does; where f is NaN the bit is 0, as in the ReLU row.
RELU, CLIPPED_RELU, LEAKY_RELU = 0, 1, 2


def _lanes(device: torch.device) -> torch.Tensor:
    return torch.arange(8, device=device, dtype=torch.uint8)


def memory_order(x: torch.Tensor) -> torch.Tensor:
    """A 1-D view of a dense tensor in the order its elements sit in memory."""
    if x.is_contiguous():
        return x.view(-1)
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return x.permute(0, 2, 3, 1).reshape(-1)
    if x.dim() == 0:
        return x.reshape(1)
    order = sorted(range(x.dim()), key=lambda d: (x.stride(d), x.size(d)), reverse=True)
    return x.permute(order).reshape(-1)


def _plain_cpu(t: torch.Tensor) -> bool:
    # numpy's bit packing is far faster than any torch expression on a CPU, but it can only
    # see real CPU tensors (not the fake ones torch.compile traces with)
    return type(t) is torch.Tensor and t.device.type == "cpu" and not t.requires_grad


def pack_bits(positive: torch.Tensor) -> torch.Tensor:
    """Pack a boolean tensor, in memory order, into ceil(n/8) uint8 (bit i of byte j = element 8j+i)."""
    flat = memory_order(positive)
    if _plain_cpu(flat):
        return torch.from_numpy(np.packbits(flat.numpy(), bitorder="little"))
    n = flat.numel()
    padded = torch.zeros(((n + 7) // 8) * 8, dtype=torch.uint8, device=flat.device)
    padded[:n] = flat.to(torch.uint8)
    return (padded.view(-1, 8) << _lanes(flat.device)).sum(dim=1, dtype=torch.uint8)


# numpy's SIMD comparison is 2-3x faster than torch's `x > 0` on a CPU
_NUMPY_DTYPES = (torch.float32, torch.float64, torch.float16)


def positive_bits(x: torch.Tensor) -> torch.Tensor:
    """``pack_bits(x > 0)``, with numpy doing the comparison on a real CPU tensor."""
    if type(x) is torch.Tensor and x.device.type == "cpu" and x.dtype in _NUMPY_DTYPES:
        flat = memory_order(x).detach()
        return torch.from_numpy(np.packbits(np.greater(flat.numpy(), 0), bitorder="little"))
    return pack_bits(x > 0)


def unpack_bits(bits: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: a boolean tensor with ``like``'s shape and strides."""
    n = like.numel()
    if _plain_cpu(bits):
        flat = torch.from_numpy(np.unpackbits(bits.numpy(), count=n, bitorder="little")).view(torch.bool)
    else:
        flat = ((bits.view(-1, 1) >> _lanes(bits.device)) & 1).view(-1)[:n].bool()
    if like.is_contiguous():
        return flat.view(like.shape)
    if like.dim() == 4 and like.is_contiguous(memory_format=torch.channels_last):
        # flat is in memory order, so like's own strides index it without a copy
        return flat.as_strided(like.shape, like.stride())
    out = torch.empty_like(like, dtype=torch.bool)
    memory_order(out).copy_(flat)
    return out


# On a plain CPU tensor the elementwise passes run over slices of this many elements (a
# multiple of 8, so mask bytes never straddle two slices): each temporary (the boolean mask,
# the uint8 -> float cast inside threshold_backward) then stays a few MB instead of the
# size of the whole activation, which on VGG at batch 16 is 200 MB apiece.
CHUNK = 1 << 22


def _chunks(n: int):
    for start in range(0, n, CHUNK):
        yield start, min(start + CHUNK, n)


def relu_forward(x: torch.Tensor, store_mask: bool):
    """``(relu(x), bits of x > 0)``; the bits are an empty uint8 tensor when not stored."""
    if not (_plain_cpu(x) and x.numel() > CHUNK):
        bits = positive_bits(x) if store_mask else x.new_empty(0, dtype=torch.uint8)
        return torch.relu(x), bits
    y = torch.empty_like(x)
    bits = relu_forward_into(x, y, store_mask)
    return y, bits


def relu_forward_(x: torch.Tensor, store_mask: bool) -> torch.Tensor:
    """In place: ``x`` becomes ``relu(x)``; returns the bits of ``x > 0`` (empty when not stored)."""
    if not (_plain_cpu(x) and x.numel() > CHUNK):
        bits = positive_bits(x) if store_mask else x.new_empty(0, dtype=torch.uint8)
        torch.relu_(x)
        return bits
    return relu_forward_into(x, x, store_mask)


def relu_forward_into(x: torch.Tensor, y: torch.Tensor, store_mask: bool) -> torch.Tensor:
    """relu(x) written to ``y`` (may be ``x``), slice by slice; returns the packed mask."""
    xf, yf = memory_order(x), memory_order(y)
    n = xf.numel()
    bits = torch.empty((n + 7) // 8 if store_mask else 0, dtype=torch.uint8)
    for a, b in _chunks(n):
        if store_mask:
            bits[a // 8:(b + 7) // 8] = positive_bits(xf[a:b])
        torch.clamp_min(xf[a:b], 0, out=yf[a:b])
    return bits


def apply_rule_code(grad: torch.Tensor, positive: Optional[torch.Tensor], rule: int) -> torch.Tensor:
    """The three rules, written once (the kernels compute exactly this).

    gradient ``where(f > 0, R, 0)``; deconvnet ``relu(R)``; guided ``relu(where(f > 0, R, 0))``.
    ``relu`` is torch's: a NaN in R passes where the position is kept, as in Captum's hooks.
    """
    if rule == DECONVNET:
        return torch.relu(grad)
    if positive is None:
        raise ValueError("this rule needs the forward mask, but none was saved")
    # threshold_backward(grad, mask, 0) = where(mask > 0, grad, 0); with a uint8 view of the
    # mask it is one vectorized pass, several times faster than torch.where on a CPU
    kept = torch.ops.aten.threshold_backward(grad, positive.view(torch.uint8), 0)
    if rule == GRADIENT:
        return kept
    if rule == GUIDED:
        return kept.relu_()
    raise ValueError(f"unknown rule code {rule}")


def relu_backward(grad: torch.Tensor, bits: torch.Tensor, rule: int) -> torch.Tensor:
    """The rule applied to ``grad``; ``grad`` has the forward input's shape and strides."""
    if not (_plain_cpu(grad) and grad.numel() > CHUNK):
        positive = None if rule == DECONVNET else unpack_bits(bits, grad)
        return apply_rule_code(grad, positive, rule)
    out = torch.empty_like(grad)
    gf, of = memory_order(grad), memory_order(out)
    for a, b in _chunks(gf.numel()):
        if rule == DECONVNET:
            torch.clamp_min(gf[a:b], 0, out=of[a:b])
            continue
        positive = torch.from_numpy(np.unpackbits(bits[a // 8:(b + 7) // 8].numpy(), count=b - a, bitorder="little"))
        torch.ops.aten.threshold_backward.grad_input(gf[a:b], positive, 0, grad_input=of[a:b])
        if rule == GUIDED:
            of[a:b].relu_()
    return out


def _compare_type(x: torch.Tensor) -> torch.Tensor:
    """``x`` where its comparisons with a float scalar must happen: half precision goes up to
    float32 (a Python scalar would otherwise be rounded to the tensor's dtype first)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def family_mask(x: torch.Tensor, act: int, param: float) -> torch.Tensor:
    """The activation's mask bit, unpacked: where its local derivative is 1."""
    if act == CLIPPED_RELU:
        xc = _compare_type(x)
        return (xc > 0) & (xc < param)
    if act in (RELU, LEAKY_RELU):
        return x > 0
    raise ValueError(f"unknown activation code {act}")


def family_activation(x: torch.Tensor, act: int, param: float, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The activation's forward, as torch computes it (``out`` may be ``x``)."""
    if act == RELU:
        return torch.clamp_min(x, 0, out=out) if out is not None else torch.relu(x)
    if act == CLIPPED_RELU:  # F.hardtanh and F.relu6 are this clamp
        return torch.clamp(x, 0.0, param, out=out) if out is not None else torch.clamp(x, 0.0, param)
    if act == LEAKY_RELU:
        if out is None:
            return F.leaky_relu(x, param)
        return torch.ops.aten.leaky_relu.out(x, param, out=out)
    raise ValueError(f"unknown activation code {act}")


def _family_bits(x: torch.Tensor, act: int, param: float) -> torch.Tensor:
    return positive_bits(x) if act != CLIPPED_RELU else pack_bits(family_mask(x, act, param))


def relu_family_forward(x: torch.Tensor, act: int, param: float, store_mask: bool):
    """``(activation(x), packed mask bits)``; the bits are an empty uint8 tensor when not stored."""
    if act == RELU:
        return relu_forward(x, store_mask)
    if not (_plain_cpu(x) and x.numel() > CHUNK):
        bits = _family_bits(x, act, param) if store_mask else x.new_empty(0, dtype=torch.uint8)
        return family_activation(x, act, param), bits
    y = torch.empty_like(x)
    return y, relu_family_forward_into(x, y, act, param, store_mask)


def relu_family_forward_(x: torch.Tensor, act: int, param: float, store_mask: bool) -> torch.Tensor:
    """In place: ``x`` becomes ``activation(x)``; returns the mask bits of the input."""
    if act == RELU:
        return relu_forward_(x, store_mask)
    if not (_plain_cpu(x) and x.numel() > CHUNK):
        bits = _family_bits(x, act, param) if store_mask else x.new_empty(0, dtype=torch.uint8)
        family_activation(x, act, param, out=x)
        return bits
    return relu_family_forward_into(x, x, act, param, store_mask)


def relu_family_forward_into(x: torch.Tensor, y: torch.Tensor, act: int, param: float, store_mask: bool):
    """The activation written to ``y`` (may be ``x``) slice by slice; returns the packed mask."""
    xf, yf = memory_order(x), memory_order(y)
    n = xf.numel()
    bits = torch.empty((n + 7) // 8 if store_mask else 0, dtype=torch.uint8)
    for a, b in _chunks(n):
        if store_mask:
            bits[a // 8:(b + 7) // 8] = _family_bits(xf[a:b], act, param)
        family_activation(xf[a:b], act, param, out=yf[a:b])
    return bits


def apply_family_rule(grad: torch.Tensor, positive: Optional[torch.Tensor], rule: int, act: int, param: float):
    """The rules for every activation of the family, written once (the kernels compute exactly this).

    ``positive`` is the unpacked mask bit. Only a LeakyReLU's backward differs from the ReLU's:
    there it is torch's own ``leaky_relu_backward`` (R where the bit is set, ``a * R``
    elsewhere, in float32 for half precision), fed relu(R) for Guided.
    """
    if act != LEAKY_RELU or rule == DECONVNET:
        if act not in (RELU, CLIPPED_RELU, LEAKY_RELU):
            raise ValueError(f"unknown activation code {act}")
        return apply_rule_code(grad, positive, rule)
    if positive is None:
        raise ValueError("this rule needs the forward mask, but none was saved")
    if rule not in (GRADIENT, GUIDED):
        raise ValueError(f"unknown rule code {rule}")
    # leaky_relu_backward tests `self > 0`: the bit, as a tensor of grad's dtype, stands in for f
    source = torch.relu(grad) if rule == GUIDED else grad
    return torch.ops.aten.leaky_relu_backward(source, positive.to(grad.dtype), param, False)


def relu_family_backward(grad: torch.Tensor, bits: torch.Tensor, rule: int, act: int, param: float) -> torch.Tensor:
    """The rule applied to ``grad`` (laid out as the forward input was) through activation ``act``."""
    if act != LEAKY_RELU or rule == DECONVNET:
        return relu_backward(grad, bits, rule)
    if not (_plain_cpu(grad) and grad.numel() > CHUNK):
        return apply_family_rule(grad, unpack_bits(bits, grad), rule, act, param)
    out = torch.empty_like(grad)
    gf, of = memory_order(grad), memory_order(out)
    for a, b in _chunks(gf.numel()):
        positive = torch.from_numpy(np.unpackbits(bits[a // 8:(b + 7) // 8].numpy(), count=b - a, bitorder="little"))
        source = gf[a:b].relu() if rule == GUIDED else gf[a:b]
        torch.ops.aten.leaky_relu_backward.grad_input(
            source, positive.to(grad.dtype), param, False, grad_input=of[a:b]
        )
    return out


def pool_output_size(size: int, k: int, s: int, p: int, d: int, ceil_mode: bool) -> int:
    """torch's pooling output size, including ceil_mode's 'last window starts inside' rule."""
    span = d * (k - 1) + 1
    numer = size + 2 * p - span + ((s - 1) if ceil_mode else 0)
    out = numer // s + 1
    if ceil_mode and (out - 1) * s >= size + p:
        out -= 1
    return max(out, 0)


def _batch_step(t: torch.Tensor) -> int:
    """How many images of ``t`` one slice holds (everything unless it is a large CPU tensor)."""
    if not _plain_cpu(t) or t.numel() <= CHUNK or t.shape[0] <= 1:
        return max(t.shape[0], 1)
    return max(1, CHUNK // max(1, t[0].numel()))


def _format_of(t: torch.Tensor):
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _switch_tables(oh, ow, width, kernel_size, stride, padding, dilation, device):
    """Lookup tables between a switch and torch's flat in-plane index, or None.

    ``corner[oh, ow]`` is the flat index of a window's top-left corner (padding included);
    the argmax sits at ``corner + (kh * dil_h) * width + kw * dil_w``. That offset names the
    switch unambiguously while a window row fits in the image row (``(kw-1) * dil_w < width``);
    otherwise the callers fall back to division.
    """
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    if (kw - 1) * dw >= width:
        return None
    corner = _window_origin(oh, sh, ph, device).view(-1, 1) * width + _window_origin(ow, sw, pw, device).view(1, -1)
    offsets = [(a * dh) * width + b * dw for a in range(kh) for b in range(kw)]
    switch_of_offset = torch.zeros(offsets[-1] + 1, dtype=torch.int8, device=device)
    switch_of_offset[torch.tensor(offsets, device=device)] = torch.arange(kh * kw, dtype=torch.int8, device=device)
    offset_of_switch = torch.tensor(offsets, dtype=torch.int64, device=device)
    return corner, switch_of_offset, offset_of_switch


def _window_origin(n_out: int, s: int, p: int, device) -> torch.Tensor:
    return torch.arange(n_out, device=device) * s - p


def _eager_cpu(t: torch.Tensor) -> bool:
    """A real CPU tensor outside tracing: the fast pool paths (lookup tables, host checks) apply."""
    return type(t) is torch.Tensor and t.device.type == "cpu"


# the fast CPU pool paths can be switched off (tests compare them with the plain path)
FAST_POOL = True


def _shaped_like(flat: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``flat`` (in ``like``'s memory order) viewed with ``like``'s shape and strides."""
    if like.is_contiguous():
        return flat.view(like.shape)
    return flat.as_strided(like.shape, like.stride())


def _dense_layout(t: torch.Tensor) -> bool:
    return t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))


def _disjoint(kernel_size, stride, dilation) -> bool:
    """Whether no two windows share a position (stride at least the dilated window span)."""
    return all(s >= d * (k - 1) + 1 for k, s, d in zip(kernel_size, stride, dilation))


@functools.lru_cache(maxsize=64)
def _pool_tables(h: int, w: int, kernel_size, stride, padding, dilation, ceil_mode: bool):
    """CPU lookup tables of one pool geometry (cached: a model reuses a handful).

    ``switch_of_index``: int8 over the ``h * w`` plane, the switch of each position inside the
    one window that holds it (disjoint windows only, else None); ``switch_of_offset``: int8 over
    the offsets from a window's corner (None when a window row does not fit the image row);
    ``index_of_switch``: int64 ``[kh * kw]`` offsets, ``corner``: int64 ``[oh, ow]`` flat
    in-plane index of each window's top-left corner (padding included); ``first``: int8
    ``[oh, ow]`` switch of each window's first real (non-padding) position.
    """
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    cpu = torch.device("cpu")
    # all-equal values: torch's first-wins picks each window's first real position
    _, first_index = F.max_pool2d(torch.zeros(1, 1, h, w), kernel_size, stride, padding, dilation, ceil_mode, return_indices=True)
    oh, ow = first_index.shape[-2:]
    corner = _window_origin(oh, sh, ph, cpu).view(-1, 1) * w + _window_origin(ow, sw, pw, cpu).view(1, -1)
    index_of_switch = torch.tensor([(a * dh) * w + b * dw for a in range(kh) for b in range(kw)], dtype=torch.int64)
    switch_of_offset = None
    if (kw - 1) * dw < w:
        switch_of_offset = torch.zeros(int(index_of_switch[-1]) + 1, dtype=torch.int8)
        switch_of_offset[index_of_switch] = torch.arange(kh * kw, dtype=torch.int8)
    switch_of_index = None
    if _disjoint(kernel_size, stride, dilation):

        def along(size, k, s, p, d):
            pos = torch.arange(size) + p
            inside = pos - (pos // s) * s  # offset from the corner of the one window that can hold pos
            return torch.where(inside % d == 0, inside // d, 0).clamp_(max=k - 1)

        rows, cols = along(h, kh, sh, ph, dh), along(w, kw, sw, pw, dw)
        switch_of_index = (rows.view(-1, 1) * kw + cols.view(1, -1)).to(torch.int8).reshape(-1)
    first = _index_to_switch_slow(first_index[0, 0], w, kernel_size, stride, padding, dilation)
    return switch_of_index, switch_of_offset, index_of_switch, corner, first


def _index_to_switch_slow(index, width, kernel_size, stride, padding, dilation):
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    oh, ow = index.shape[-2:]
    rows = index // width - _window_origin(oh, sh, ph, index.device).view(-1, 1)
    cols = index % width - _window_origin(ow, sw, pw, index.device).view(1, -1)
    return ((rows // dh) * kw + (cols // dw)).to(torch.int8)


def _index_to_switch_fast(index, tables, out):
    """int64 in-plane indices (a temporary: overwritten) -> int8 switches written to ``out`` (same layout)."""
    switch_of_index, switch_of_offset, _, corner, _ = tables
    if switch_of_index is not None:  # disjoint windows: the position alone names the switch
        torch.index_select(switch_of_index, 0, memory_order(index), out=memory_order(out))
    else:
        torch.index_select(switch_of_offset, 0, memory_order(index.sub_(corner)), out=memory_order(out))


def _pool_fast(x, kernel_size, stride, padding, dilation, ceil_mode, apply_relu):
    """(pooled, switches) of a dense CPU tensor, or None where the fast path does not apply.

    One ``max_pool2d_with_indices`` into preallocated outputs, a few images at a time, then
    one table lookup turns the int64 indices into switches. With ``apply_relu`` the pool runs
    on x itself: a window whose maximum is positive (or NaN) has the same argmax in
    ``relu(x)``; one whose maximum is negative is all zeros after the ReLU, so its switch is
    its first real position and its value +0. A window whose maximum is exactly zero would
    need the sign of its first element, so a slice holding one pools ``relu(x)`` instead.
    """
    n, c, h, w = x.shape
    tables = _pool_tables(h, w, tuple(kernel_size), tuple(stride), tuple(padding), tuple(dilation), bool(ceil_mode))
    if tables[0] is None and tables[1] is None:
        return None
    oh, ow = tables[3].shape
    fmt = _format_of(x)
    pooled = torch.empty((n, c, oh, ow), dtype=x.dtype, memory_format=fmt)
    switches = torch.empty((n, c, oh, ow), dtype=torch.int8, memory_format=fmt)
    step = _batch_step(x)
    index = torch.empty((min(step, n), c, oh, ow), dtype=torch.int64, memory_format=fmt)
    args = (kernel_size, stride, padding, dilation, ceil_mode)
    for i in range(0, n, step):
        part, out, sw, idx = x[i:i + step], pooled[i:i + step], switches[i:i + step], index[:min(step, n - i)]
        torch.ops.aten.max_pool2d_with_indices.out(part, *args, out=out, indices=idx)
        if apply_relu and bool((out == 0).any()):
            torch.ops.aten.max_pool2d_with_indices.out(torch.relu(part), *args, out=out, indices=idx)
            _index_to_switch_fast(idx, tables, sw)
            continue
        _index_to_switch_fast(idx, tables, sw)
        if apply_relu:
            torch.where(out < 0, tables[4], sw, out=sw)
            out.relu_()
    return pooled, switches


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
    """Max-pool a 4-D tensor; returns ``(pooled, int8 switches, bits of pooled > 0)``.

    A switch is the argmax's offset inside its window, ``kh * kernel_w + kw``. With
    ``apply_relu`` the pool runs on ``relu(x)`` (so ties among clipped zeros pick the first
    position, exactly as ``max_pool2d(relu(x))``).
    """
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    width = x.shape[-1]
    fast = None
    if FAST_POOL and _eager_cpu(x) and x.numel() > 0 and _dense_layout(x):
        fast = _pool_fast(x, list(kernel_size), list(stride), list(padding), list(dilation), ceil_mode, apply_relu)
    if fast is not None:
        pooled, switches = fast
        bits = positive_bits(pooled) if store_mask else x.new_empty(0, dtype=torch.uint8)
        return pooled, switches, bits

    def pool(part: torch.Tensor):
        src = torch.relu(part) if apply_relu else part
        pooled, index = F.max_pool2d(src, (kh, kw), (sh, sw), (ph, pw), (dh, dw), ceil_mode, return_indices=True)
        oh, ow = pooled.shape[-2:]
        tables = _switch_tables(oh, ow, width, kernel_size, stride, padding, dilation, x.device)
        if tables is not None:
            # offset from the window's corner, then a lookup: two passes instead of eight
            corner, switch_of_offset, _ = tables
            # take() returns a contiguous tensor: give the switches the pooled output's layout
            switches = torch.take(switch_of_offset, index - corner)
            return pooled, switches.contiguous(memory_format=_format_of(pooled))
        # int32 is plenty inside one plane (index < H * W) and twice as fast as int64
        index32 = index.to(torch.int32)
        rows = index32 // width - _window_origin(oh, sh, ph, x.device).view(-1, 1).to(torch.int32)
        cols = index32 % width - _window_origin(ow, sw, pw, x.device).view(1, -1).to(torch.int32)
        return pooled, ((rows // dh) * kw + (cols // dw)).to(torch.int8)

    step = _batch_step(x)
    if step >= x.shape[0]:
        pooled, switches = pool(x)
    else:  # a few images at a time: the int64 indices and relu(x) stay small
        parts = [pool(x[i:i + step]) for i in range(0, x.shape[0], step)]
        pooled = torch.cat([p for p, _ in parts])
        switches = torch.cat([s for _, s in parts])
    if store_mask:
        bits = pack_bits(pooled > 0)
    else:
        bits = x.new_empty(0, dtype=torch.uint8)
    return pooled, switches, bits


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
    """Unpool ``grad`` through the switches, summing where windows overlap.

    With ``rule >= 0`` (the fused ReLU) the rule is applied to the unpooled sum: every
    window whose switch points at a position saw the same ReLU input there, and its sign
    is the packed ``pooled > 0`` of the fused forward. (Applying the rule per window
    before summing would differ from ``max_pool2d(relu(x))`` where windows overlap.)
    """
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    n, c, h, w = input_shape
    oh, ow = switches.shape[-2:]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    # aten re-derives the output size, so it needs to know whether ceil_mode made it
    ceil_mode = (oh, ow) != (
        pool_output_size(h, kh, sh, ph, dh, False),
        pool_output_size(w, kw, sw, pw, dw, False),
    )
    if rule in (GRADIENT, GUIDED):
        # every window pointing at a position shares its sign, so the mask can go first
        grad = torch.ops.aten.threshold_backward(grad, unpack_bits(bits, switches).view(torch.uint8), 0)
    out = torch.empty((n, c, h, w), dtype=grad.dtype, device=grad.device, memory_format=fmt)
    if FAST_POOL and _eager_cpu(grad) and _eager_cpu(switches) and switches.numel() > 0 and _dense_layout(switches):
        tables = _pool_tables(h, w, tuple(kernel_size), tuple(stride), tuple(padding), tuple(dilation), ceil_mode)
        if tuple(tables[3].shape) == (oh, ow):
            return _unpool_fast(grad, switches, rule, out, tables, [kh, kw], [sh, sw], [ph, pw], [dh, dw], ceil_mode)
    step = _batch_step(out)
    tables = _switch_tables(oh, ow, w, kernel_size, stride, padding, dilation, grad.device)
    for i in range(0, max(n, 1), step):
        part = switches[i:i + step].long()
        if tables is not None:
            corner, _, offset_of_switch = tables
            # aten walks the indices in grad's layout, and take() returns a contiguous tensor
            index = (corner + torch.take(offset_of_switch, part)).contiguous(memory_format=_format_of(grad))
        else:
            rows = _window_origin(oh, sh, ph, grad.device).view(-1, 1) + (part // kw) * dh
            cols = _window_origin(ow, sw, pw, grad.device).view(1, -1) + (part % kw) * dw
            index = rows * w + cols
        # aten's max-pool backward reads only the shape and layout of its `self` argument
        torch.ops.aten.max_pool2d_with_indices_backward.grad_input(
            grad[i:i + step], out[i:i + step], [kh, kw], [sh, sw], [ph, pw], [dh, dw], ceil_mode,
            index, grad_input=out[i:i + step],
        )
    if rule in (DECONVNET, GUIDED):
        out = out.relu_()
    return out


def _unpool_fast(grad, switches, rule, out, tables, kernel_size, stride, padding, dilation, ceil_mode):
    """The CPU unpool: int64 indices rebuilt by one lookup and one add per slice, then aten's
    max-pool backward. Disjoint windows take the ReLU rule at pooled resolution (each input
    position receives at most one gradient, so ``relu`` commutes with the unpool)."""
    _, switch_of_offset, index_of_switch, corner, _ = tables
    disjoint = _disjoint(kernel_size, stride, dilation)
    if disjoint and rule in (DECONVNET, GUIDED):
        grad = grad.relu_() if rule == GUIDED else torch.relu(grad)  # GUIDED's grad is already a new tensor
    if grad.stride() != switches.stride():
        grad = grad.contiguous(memory_format=_format_of(switches))
    n = out.shape[0]
    step = _batch_step(out)
    index = torch.empty((min(step, n),) + tuple(switches.shape[1:]), dtype=torch.int64, memory_format=_format_of(switches))
    for i in range(0, n, step):
        idx = index[:min(step, n - i)]
        torch.index_select(index_of_switch, 0, memory_order(switches[i:i + step]).to(torch.int32), out=memory_order(idx))
        idx.add_(corner)
        # aten's max-pool backward reads only the shape and layout of its `self` argument
        torch.ops.aten.max_pool2d_with_indices_backward.grad_input(
            grad[i:i + step], out[i:i + step], kernel_size, stride, padding, dilation, ceil_mode, idx,
            grad_input=out[i:i + step],
        )
    if not disjoint and rule in (DECONVNET, GUIDED):
        out = out.relu_()
    return out
