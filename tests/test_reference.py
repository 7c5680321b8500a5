"""The CPU reference's sliced path (large tensors) equals its whole-tensor path."""

import pytest
import torch

from fastsal._kernels import reference


def _whole_and_sliced(monkeypatch, fn):
    whole = fn()
    monkeypatch.setattr(reference, "CHUNK", 64)
    sliced = fn()
    monkeypatch.setattr(reference, "CHUNK", 1 << 22)
    return whole, sliced


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("rule", [0, 1, 2])
def test_relu_sliced_equals_whole(monkeypatch, rule, channels_last):
    x = torch.randn(3, 5, 7, 9)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    g = torch.randn_like(x)
    (y1, b1), (y2, b2) = _whole_and_sliced(monkeypatch, lambda: reference.relu_forward(x, True))
    assert torch.equal(y1, y2) and torch.equal(b1, b2) and y2.stride() == x.stride()
    i1, i2 = _whole_and_sliced(monkeypatch, lambda: reference.relu_forward_(x.clone(), True))
    assert torch.equal(i1, i2) and torch.equal(i1, b1)
    g1, g2 = _whole_and_sliced(monkeypatch, lambda: reference.relu_backward(g, b1, rule))
    assert torch.equal(g1, g2) and g2.stride() == x.stride()


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("rule", [-1, 0, 1, 2])
def test_pool_sliced_equals_whole(monkeypatch, rule, channels_last):
    x = torch.randn(5, 3, 11, 9)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    args = ((3, 3), (2, 2), (1, 1), (1, 1))
    fused = rule >= 0
    f1, f2 = _whole_and_sliced(monkeypatch, lambda: reference.max_pool2d_forward(x, *args, True, fused, fused))
    for a, b in zip(f1, f2):
        assert torch.equal(a, b)
    pooled, sw, bits = f1
    g = torch.randn_like(pooled)
    b1, b2 = _whole_and_sliced(
        monkeypatch, lambda: reference.max_pool2d_backward(g, sw, bits, rule, list(x.shape), *args, channels_last)
    )
    torch.testing.assert_close(b1, b2, rtol=0, atol=0)
    assert b2.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


# The fast CPU pool path (table lookups on aten's indices; the fused ReLU taken on the
# pooled maxima) against the plain path, bit for bit, on the values that decide the switch:
# ties, signed zeros, NaN and -inf windows, padding, dilation, ceil_mode, both layouts.
POOLS = [
    ((2, 2), (2, 2), (0, 0), (1, 1)),
    ((3, 3), (2, 2), (1, 1), (1, 1)),
    ((3, 3), (1, 1), (1, 1), (1, 1)),
    ((1, 1), (1, 1), (0, 0), (1, 1)),
    ((2, 3), (3, 2), (1, 1), (1, 2)),
    ((3, 3), (3, 3), (1, 0), (1, 1)),
    ((2, 2), (3, 3), (1, 1), (2, 2)),
    ((3, 2), (2, 3), (0, 1), (2, 1)),
    ((2, 2), (1, 1), (0, 0), (1, 1)),
]


def _values(kind, shape, gen):
    if kind == "ties":
        return torch.randint(-2, 3, shape, generator=gen).float()
    if kind == "signed_zeros":  # -0.0, +0.0 and negatives: windows whose maximum is exactly zero
        sign = torch.randint(0, 2, shape, generator=gen).float() * 2 - 1
        return torch.randint(-2, 1, shape, generator=gen).float() * sign
    x = torch.randint(-2, 3, shape, generator=gen).float()
    x.view(-1)[::7] = float("nan")
    x.view(-1)[3::11] = float("-inf")
    if kind == "all_-inf":
        x.fill_(float("-inf"))
    return x


def _bits_equal(a, b):
    same_layout = a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
    def raw(t):
        return torch.empty(t.shape, dtype=t.dtype).copy_(t).view(torch.uint8)

    return same_layout and torch.equal(raw(a), raw(b))


@pytest.mark.parametrize("pool", POOLS)
@pytest.mark.parametrize("kind", ["ties", "signed_zeros", "nan", "all_-inf"])
def test_fast_pool_path_equals_plain_path(monkeypatch, pool, kind):
    gen = torch.Generator().manual_seed(0)
    for shape in [(2, 3, 9, 11), (1, 2, 2, 5)]:
        for channels_last, ceil_mode, fused in [(c, m, f) for c in (False, True) for m in (False, True) for f in (False, True)]:
            x = _values(kind, shape, gen)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            try:
                expected = torch.nn.functional.max_pool2d(torch.relu(x) if fused else x, *pool, ceil_mode)
            except RuntimeError:
                continue
            if expected.numel() == 0:
                continue
            args = (*pool, ceil_mode, fused, fused)
            monkeypatch.setattr(reference, "FAST_POOL", False)
            plain = reference.max_pool2d_forward(x, *args)
            monkeypatch.setattr(reference, "FAST_POOL", True)
            fast = reference.max_pool2d_forward(x, *args)
            assert _bits_equal(fast[0], expected) and fast[1].stride() == expected.stride()
            for a, b in zip(fast, plain):
                # (the plain path may give a size-1 plane other, equivalent strides)
                assert _bits_equal(a, b.as_strided(a.shape, a.stride()) if a.dim() == 4 else b), (
                    pool, kind, shape, channels_last, ceil_mode, fused,
                )
            for rule in ([0, 1, 2] if fused else [-1]):
                g = torch.randn(expected.shape, generator=gen)
                g_copy = g.clone()
                bwd = (rule, list(x.shape), *pool, channels_last)
                monkeypatch.setattr(reference, "FAST_POOL", False)
                slow_in = reference.max_pool2d_backward(g, fast[1], fast[2], *bwd)
                monkeypatch.setattr(reference, "FAST_POOL", True)
                fast_in = reference.max_pool2d_backward(g, fast[1], fast[2], *bwd)
                assert torch.equal(g, g_copy)  # the incoming gradient is never overwritten
                assert torch.equal(fast_in, slow_in) and fast_in.stride() == slow_in.stride()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_positive_bits_equals_packed_comparison(dtype):
    x = torch.tensor([1.0, -1.0, 0.0, -0.0, float("nan"), float("inf"), float("-inf"), 1e-30, -1e-30, 2.0, 3.0])
    x = torch.cat([x, torch.randn(1000)]).to(dtype)
    assert torch.equal(reference.positive_bits(x), reference.pack_bits(x > 0))
    xc = torch.randn(2, 3, 5, 7).to(dtype).contiguous(memory_format=torch.channels_last)
    assert torch.equal(reference.positive_bits(xc), reference.pack_bits(xc > 0))
