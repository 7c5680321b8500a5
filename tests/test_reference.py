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
