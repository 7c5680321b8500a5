"""The Triton launchers against the plain-torch reference.

Without CUDA they run in Triton's interpreter (conftest sets TRITON_INTERPRET=1), so the
shapes stay small; with CUDA the `gpu` tests run the compiled kernels on bigger tensors.
"""

from __future__ import annotations

import pytest
import torch

from fastsal._kernels import _launch, reference, triton_available
from helpers import first_mismatches

pytestmark = pytest.mark.skipif(not triton_available(), reason="Triton is not installed")

if triton_available():
    from fastsal._kernels import maxpool as triton_pool
    from fastsal._kernels import relu as triton_relu

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
RULES = [0, 1, 2]
SHAPES = [(1,), (1031,), (17, 19), (2, 3, 5, 7)]


def _randn(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype).to(DEVICE)


def assert_same_bits(actual, expected):
    """Bit-identical, -0.0 included; NaNs only need to be NaN (the interpreter round-trips
    bf16 through numpy float32, which canonicalizes NaN payloads)."""
    nan = expected.isnan()
    assert torch.equal(actual.isnan(), nan)
    int_type = {2: torch.int16, 4: torch.int32, 8: torch.int64}[expected.element_size()]
    a, e = actual.contiguous().view(int_type), expected.contiguous().view(int_type)
    assert torch.equal(a[~nan], e[~nan]), first_mismatches(actual, expected)


def _relu_input(shape, dtype):
    x = _randn(shape, dtype)
    flat = x.view(-1)
    # exact zeros, -0.0 and NaN must take torch's path too
    if flat.numel() >= 4:
        flat[0] = 0.0
        flat[1] = -0.0
        flat[2] = float("nan")
    return x


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_relu_forward_matches_reference(shape, dtype):
    x = _relu_input(shape, dtype)
    y, bits = triton_relu.relu_forward(x, True)
    y_ref, bits_ref = reference.relu_forward(x, True)
    assert_same_bits(y, y_ref)
    assert torch.equal(bits, bits_ref)
    assert bits.numel() == (x.numel() + 7) // 8
    y2, no_bits = triton_relu.relu_forward(x, False)
    assert no_bits.numel() == 0 and torch.equal(torch.nan_to_num(y2), torch.nan_to_num(y_ref))


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_relu_backward_matches_reference(shape, dtype, rule):
    x = _relu_input(shape, dtype)
    grad = _randn(shape, dtype, seed=1)
    _, bits = reference.relu_forward(x, True)
    out = triton_relu.relu_backward(grad, bits, rule)
    expected = reference.relu_backward(grad, bits, rule)
    assert torch.equal(out, expected), first_mismatches(out, expected)


def test_relu_channels_last_keeps_layout_and_mask_order():
    x = _relu_input((2, 5, 3, 4), torch.float32).contiguous(memory_format=torch.channels_last)
    y, bits = triton_relu.relu_forward(x, True)
    assert y.stride() == x.stride()
    # bits follow memory order: byte 0 holds the first 8 elements of the NHWC walk
    nhwc = x.permute(0, 2, 3, 1).reshape(-1)
    first = sum(int(v > 0) << i for i, v in enumerate(nhwc[:8].tolist()))
    assert bits[0].item() == first
    grad = _randn(x.shape, torch.float32, 3).contiguous(memory_format=torch.channels_last)
    out = triton_relu.relu_backward(grad, bits, 2)
    assert out.stride() == x.stride()
    assert torch.equal(out, reference.relu_backward(grad, bits, 2))


def test_relu_empty():
    x = torch.empty(0, 3, device=DEVICE)
    y, bits = triton_relu.relu_forward(x, True)
    assert y.shape == x.shape and bits.numel() == 0
    assert triton_relu.relu_backward(x, bits, 2).shape == x.shape


@pytest.mark.parametrize("rule", RULES)
def test_relu_int64_offsets(monkeypatch, rule):
    monkeypatch.setattr(_launch, "INT64_THRESHOLD", 16)
    x = _relu_input((1031,), torch.float32)
    y, bits = triton_relu.relu_forward(x, True)
    y_ref, bits_ref = reference.relu_forward(x, True)
    assert torch.equal(torch.nan_to_num(y), torch.nan_to_num(y_ref)) and torch.equal(bits, bits_ref)
    grad = _randn((1031,), torch.float32, 1)
    assert torch.equal(triton_relu.relu_backward(grad, bits, rule), reference.relu_backward(grad, bits, rule))


# (kernel, stride, padding, dilation, ceil_mode)
POOLS = {
    "2x2s2": ((2, 2), (2, 2), (0, 0), (1, 1), False),
    "3x3s2p1_overlap": ((3, 3), (2, 2), (1, 1), (1, 1), False),
    "3x3s2_ceil": ((3, 3), (2, 2), (0, 0), (1, 1), True),
    "3x2_s1x2_p1x0_d2x1_ceil": ((3, 2), (1, 2), (1, 0), (2, 1), True),
    "3x3s1p1": ((3, 3), (1, 1), (1, 1), (1, 1), False),
}


def _pool_input(kind: str, dtype, shape=(2, 3, 11, 9)):
    if kind == "ties":
        # small integers: many equal maxima per window, so the tie-break decides the switch
        g = torch.Generator().manual_seed(5)
        return torch.randint(-2, 3, shape, generator=g).to(dtype).to(DEVICE)
    x = _randn(shape, dtype, seed=7)
    if kind == "nan":
        x.view(-1)[::13] = float("nan")
    return x


def _check_pool(x, params, apply_relu, dtype):
    out, sw, bits = triton_pool.max_pool2d_forward(x, *params, apply_relu, True)
    out_ref, sw_ref, bits_ref = reference.max_pool2d_forward(x, *params, apply_relu, True)
    assert torch.equal(torch.nan_to_num(out), torch.nan_to_num(out_ref)) and torch.equal(out.isnan(), out_ref.isnan())
    assert torch.equal(sw, sw_ref), first_mismatches(sw, sw_ref)
    assert torch.equal(bits, bits_ref)
    assert out.is_contiguous(memory_format=torch.channels_last) == x.is_contiguous(memory_format=torch.channels_last)
    grad = _randn(out.shape, dtype, seed=11)
    channels_last = triton_pool._is_channels_last(x)
    for rule in (-1, 0, 1, 2):
        g_in = triton_pool.max_pool2d_backward(grad, sw, bits, rule, list(x.shape), *params[:4], channels_last)
        # the reference accumulates overlapping windows in float32, as the kernel does
        g_ref = reference.max_pool2d_backward(
            grad.float(), sw_ref, bits_ref, rule, list(x.shape), *params[:4], channels_last
        )
        assert g_in.dtype == dtype and g_in.stride() == g_ref.stride()
        # only the order of the float32 sums over overlapping windows may differ
        tol = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
        torch.testing.assert_close(g_in.float(), g_ref, rtol=tol, atol=tol, msg=lambda m: f"rule {rule}: {m}")


@pytest.mark.parametrize("apply_relu", [False, True], ids=["pool", "relu_pool"])
@pytest.mark.parametrize("kind", ["randn", "ties", "nan"])
@pytest.mark.parametrize("pool", list(POOLS), ids=str)
def test_pool_matches_reference(pool, kind, apply_relu):
    _check_pool(_pool_input(kind, torch.float32), POOLS[pool], apply_relu, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("pool", ["2x2s2", "3x3s2p1_overlap"])
def test_pool_half_dtypes(pool, dtype):
    _check_pool(_pool_input("randn", dtype), POOLS[pool], True, dtype)


@pytest.mark.parametrize("layout", ["channels_last", "non_contiguous"])
def test_pool_layouts(layout):
    x = _pool_input("randn", torch.float32, shape=(2, 4, 9, 10))
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    else:
        x = torch.repeat_interleave(x, 2, dim=3)[..., ::2]
        assert not x.is_contiguous()
    _check_pool(x, POOLS["3x3s2p1_overlap"], True, torch.float32)


def test_pool_all_negative_infinity_picks_first_valid_position():
    x = torch.full((1, 1, 4, 4), float("-inf"), device=DEVICE)
    params = POOLS["3x3s2p1_overlap"]
    _, sw, _ = triton_pool.max_pool2d_forward(x, *params, False, False)
    _, sw_ref, _ = reference.max_pool2d_forward(x, *params, False, False)
    assert torch.equal(sw, sw_ref)


def test_pool_empty_batch():
    x = torch.empty(0, 3, 8, 8, device=DEVICE)
    out, sw, bits = triton_pool.max_pool2d_forward(x, *POOLS["2x2s2"], True, True)
    assert out.shape == (0, 3, 4, 4) and sw.shape == out.shape and bits.numel() == 0
    g = triton_pool.max_pool2d_backward(out, sw, bits, 2, [0, 3, 8, 8], *POOLS["2x2s2"][:4], False)
    assert g.shape == x.shape


def test_pool_int64_offsets(monkeypatch):
    monkeypatch.setattr(_launch, "INT64_THRESHOLD", 64)
    _check_pool(_pool_input("randn", torch.float32), POOLS["3x3s2p1_overlap"], True, torch.float32)


# ---- compiled kernels on a GPU: bigger tensors, every dtype ------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rule", RULES)
def test_gpu_relu_large(dtype, rule):
    x = torch.randn(8, 64, 56, 57, device="cuda", dtype=dtype).contiguous(memory_format=torch.channels_last)
    y, bits = triton_relu.relu_forward(x, True)
    y_ref, bits_ref = reference.relu_forward(x, True)
    assert torch.equal(y, y_ref) and torch.equal(bits, bits_ref)
    grad = torch.randn_like(x)
    assert torch.equal(triton_relu.relu_backward(grad, bits, rule), reference.relu_backward(grad, bits, rule))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("pool", list(POOLS), ids=str)
@pytest.mark.parametrize("channels_last", [False, True])
def test_gpu_pool_large(dtype, pool, channels_last):
    x = torch.randn(4, 64, 56, 55, device="cuda", dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    _check_pool(x, POOLS[pool], True, dtype)
    _check_pool(x, POOLS[pool], False, dtype)


@pytest.mark.gpu
def test_gpu_int64_path_on_a_real_large_tensor():
    # 2**31 + 9 bf16 elements (4 GiB): the offsets no longer fit int32
    n = 2**31 + 9
    x = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    y, bits = triton_relu.relu_forward(x, True)
    tail = slice(n - 4096, n)
    assert torch.equal(y[tail], torch.relu(x[tail]))
    assert torch.equal(bits[-512:], reference.pack_bits(x[tail] > 0)[-512:])
    del y, bits, x
    torch.cuda.empty_cache()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_relu_forward_in_place_matches_reference(dtype):
    x = _relu_input((2, 3, 17, 19), dtype).contiguous(memory_format=torch.channels_last)
    expected_y, expected_bits = reference.relu_forward(x, True)
    inplace = x.clone()
    bits = triton_relu.relu_forward_(inplace, True)
    assert_same_bits(inplace, expected_y)
    assert torch.equal(bits, expected_bits) and inplace.stride() == x.stride()
