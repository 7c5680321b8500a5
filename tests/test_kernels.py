"""The Triton launchers against the plain-torch reference.

Without CUDA they run in Triton's interpreter (conftest sets TRITON_INTERPRET=1), so the
shapes stay small; with CUDA the `gpu` tests run the compiled kernels on bigger tensors.

The interpreter is not the GPU in two ways these tests allow for:
* it converts fp32 to bf16 by truncation, where the GPU rounds to nearest even
  (``cvt.rn.bf16.f32``), so a bf16 result computed in fp32 (the unpool's sums over
  overlapping windows) may be one bf16 ulp below the correctly rounded value; on a GPU the
  `gpu` tests demand the exact rounding;
* it reads bf16 subnormals as 0.0, so interpreter inputs have none (randn never makes one);
  the `gpu` tests cover them.
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
# 3003 and 2048 elements span full programs (1024 elements each, the unmasked vector path)
# and, for 3003, a masked last program; the small ones are a masked program alone.
SHAPES = [(1,), (1031,), (17, 19), (2, 3, 5, 7), (3, 7, 11, 13), (2048,)]


def _randn(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype).to(DEVICE)


def assert_same_bits(actual, expected):
    """Bit-identical, -0.0 included; NaNs only need to be NaN: the kernels pass a NaN's
    payload through, while torch's vectorized CPU relu on bf16 returns 0xffff for any NaN."""
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
        if dtype == torch.float32:
            # only the order of the float32 sums over overlapping windows may differ
            torch.testing.assert_close(g_in, g_ref, rtol=1e-6, atol=1e-6, msg=lambda m: f"rule {rule}: {m}")
        else:
            # the sum order may move a half-precision rounding by one ulp, and so may the
            # interpreter's truncating fp32 -> bf16 (see the module docstring)
            assert_within_one_ulp(g_in, g_ref, f"rule {rule}")


def ulp(exact: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of ``dtype`` at each value of the float32 tensor ``exact`` (normal range)."""
    _, exponent = torch.frexp(exact.abs())
    return torch.finfo(dtype).eps * torch.pow(2.0, (exponent - 1).float())


def assert_within_one_ulp(actual: torch.Tensor, exact: torch.Tensor, what: str = "") -> None:
    """``actual`` (half precision) is one of the two ``actual.dtype`` neighbours of ``exact`` (fp32)."""
    a, e = actual.float(), exact.float()
    same_nan = torch.equal(a.isnan(), e.isnan())
    a, e = torch.nan_to_num(a), torch.nan_to_num(e)
    bad = (a - e).abs() > ulp(e, actual.dtype)
    assert same_nan and not bad.any(), f"{what}: " + first_mismatches(a, e, atol=float("inf")) + (
        f"; {int(bad.sum())} beyond one ulp, e.g. got {a[bad][:3].tolist()} for {e[bad][:3].tolist()}"
    )


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


@pytest.mark.parametrize(
    "pool, dtype",
    [("2x2s2", torch.float32), ("3x3s2p1_overlap", torch.float32), ("2x2s2", torch.bfloat16),
     ("3x3s2p1_overlap", torch.float16)],
    ids=str,
)
def test_pool_full_programs(pool, dtype):
    # 9 x 17 x 15 = 2295 (2x2) or 9 x 17 x 16 = 2448 (3x3) pooled elements: one full program
    # of 2048 takes the unmasked path (vector stores, 16 switches to a 128-bit store, 16 sign
    # bits to a 16-bit one) and a second is masked
    x = _randn((1, 9, 34, 31), dtype, seed=3)
    _check_pool(x, POOLS[pool], True, dtype)
    _check_pool(x.contiguous(memory_format=torch.channels_last), POOLS[pool], False, dtype)


def test_largest_offset():
    dense = torch.empty(2, 3, 5, 7)
    assert _launch.largest_offset(dense) == dense.numel()
    assert _launch.largest_offset(dense.contiguous(memory_format=torch.channels_last)) == dense.numel()
    assert _launch.largest_offset(dense[:, :, ::2, 1:]) == 1 + 1 * 105 + 2 * 35 + 2 * 14 + 5 * 1
    assert _launch.largest_offset(torch.empty(4, 1).expand(4, 9)) == 4
    assert _launch.largest_offset(torch.empty(0, 5)) == 0


class _LaunchSpy:
    """Stands in for ``launchable``: records each launch's keyword arguments, then launches."""

    def __init__(self):
        self.launches = []

    def __call__(self, kernel):
        def at(grid):
            def launch(*args, **kwargs):
                self.launches.append(kwargs)
                return kernel[grid](*args, **kwargs)

            return launch

        return type("Spied", (), {"__getitem__": lambda _, grid: at(grid)})()


def test_int64_decision_counts_strides_not_numel(monkeypatch):
    """A small view into a large storage forms offsets past numel(): those decide int64."""
    monkeypatch.setattr(_launch, "INT64_THRESHOLD", 1000)
    storage = _randn((2, 6, 40, 40), torch.float32, seed=9)
    view = storage[:, ::3, 3::2, 1::2]  # 2 x 2 x 19 x 20 = 1520 elements, offsets up to ~19200
    small = storage[:1, :2, 30:, 30:]  # 200 elements, but offsets up to ~2900 in its storage
    assert small.numel() < 1000 <= _launch.largest_offset(small)
    assert _launch.needs_int64(small) and not _launch.needs_int64(small.contiguous())
    spy = _LaunchSpy()
    monkeypatch.setattr(triton_pool, "launchable", spy)
    for x in (view, small):
        _check_pool(x, POOLS["3x3s2p1_overlap"], True, torch.float32)
    forward_flags = [k["INT64"] for k in spy.launches if "APPLY_RELU" in k]
    assert forward_flags == [True, True], spy.launches


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
    # the last 512 mask bytes hold the elements from 8 * (nbytes - 512) on
    start = 8 * (bits.numel() - 512)
    assert torch.equal(bits[-512:], reference.pack_bits(x[start:] > 0))
    del y, bits, x
    torch.cuda.empty_cache()


@pytest.mark.gpu
@pytest.mark.parametrize("channels_last", [False, True])
def test_gpu_pool_on_a_strided_view_past_int32(channels_last):
    """numel() is small, but the view's offsets pass 2**31: the launcher must pick int64."""
    s = 2**31 - 4096
    storage = torch.zeros(2 * s + 2**16, device="cuda", dtype=torch.bfloat16)  # 8 GiB
    if channels_last:  # (1, 2, 64, 64) with C innermost, then H and W far apart
        view = storage.as_strided((1, 2, 64, 64), (4 * s, 1, s // 32, 2))
    else:
        view = storage.as_strided((1, 2, 64, 64), (2 * s, s, 64, 1))
    assert view.numel() < 2**31 <= _launch.largest_offset(view)
    view.copy_(torch.randn(view.shape, device="cuda"))
    _check_pool(view, POOLS["3x3s2p1_overlap"], True, torch.bfloat16)
    del storage, view
    torch.cuda.empty_cache()


@pytest.mark.gpu
def test_gpu_bf16_unpool_sums_round_to_nearest_even():
    """On a GPU the bf16 unpool sums equal bf16(fp32 sum) bit for bit.

    The gradients are bf16 values in [1, 2): every sum of up to nine of them is exact in
    fp32, whatever the order, so the bf16 result is decided by the rounding alone.
    """
    x = torch.randn(4, 16, 40, 40, device="cuda").to(torch.bfloat16)
    params = POOLS["3x3s1p1"]
    out, sw, bits = triton_pool.max_pool2d_forward(x, *params, False, False)
    grad = (1 + torch.rand(out.shape, device="cuda")).to(torch.bfloat16)
    got = triton_pool.max_pool2d_backward(grad, sw, bits, -1, list(x.shape), *params[:4], False)
    exact = reference.max_pool2d_backward(grad.float(), sw, bits, -1, list(x.shape), *params[:4], False)
    assert (exact.to(torch.bfloat16).float() != exact).any(), "nothing needed rounding"
    assert torch.equal(got.view(torch.int16), exact.to(torch.bfloat16).view(torch.int16)), first_mismatches(
        got, exact.to(torch.bfloat16)
    )


@pytest.mark.gpu
def test_gpu_bf16_subnormals():
    """bf16 subnormals (which the interpreter reads as 0.0) keep their sign in mask and switch."""
    g = torch.Generator().manual_seed(4)
    codes = torch.randint(1, 128, (2, 8, 33, 35), generator=g, dtype=torch.int16)
    sign = torch.randint(0, 2, codes.shape, generator=g, dtype=torch.int16) << 15
    x = (codes | sign).view(torch.bfloat16).cuda()
    assert (x != 0).all() and (x.abs() < torch.finfo(torch.bfloat16).tiny).all()
    y, bits = triton_relu.relu_forward(x, True)
    y_ref, bits_ref = reference.relu_forward(x, True)
    assert_same_bits(y, y_ref)
    assert torch.equal(bits, bits_ref) and bits.any()
    for rule in RULES:
        grad = x.flip(0)
        assert torch.equal(triton_relu.relu_backward(grad, bits, rule), reference.relu_backward(grad, bits, rule))
    _check_pool(x, POOLS["3x3s2p1_overlap"], True, torch.bfloat16)
    _check_pool(x, POOLS["2x2s2"], False, torch.bfloat16)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_relu_forward_in_place_matches_reference(dtype):
    x = _relu_input((2, 3, 17, 19), dtype).contiguous(memory_format=torch.channels_last)
    expected_y, expected_bits = reference.relu_forward(x, True)
    inplace = x.clone()
    bits = triton_relu.relu_forward_(inplace, True)
    assert_same_bits(inplace, expected_y)
    assert torch.equal(bits, expected_bits) and inplace.stride() == x.stride()


def test_bf16_unpool_sums_within_one_ulp_of_exact():
    """The bf16 unpool sums against the exact value (see the gpu test above for the
    construction): here the interpreter's truncation may leave them one ulp low, never more."""
    x = _randn((2, 3, 12, 13), torch.bfloat16, seed=8)
    params = POOLS["3x3s1p1"]
    out, sw, bits = triton_pool.max_pool2d_forward(x, *params, False, False)
    grad = (1 + torch.rand(out.shape, generator=torch.Generator().manual_seed(2))).to(torch.bfloat16).to(DEVICE)
    got = triton_pool.max_pool2d_backward(grad, sw, bits, -1, list(x.shape), *params[:4], False)
    exact = reference.max_pool2d_backward(grad.float(), sw, bits, -1, list(x.shape), *params[:4], False)
    assert (exact.to(torch.bfloat16).float() != exact).any(), "nothing needed rounding"
    assert_within_one_ulp(got, exact, "bf16 unpool")


def test_every_launch_runs_under_its_tensors_device(monkeypatch):
    """Triton launches on the current device: each launcher makes its tensor's device current."""
    import contextlib

    entered = []
    real_kernels = []

    @contextlib.contextmanager
    def recording_guard(t):
        entered.append(t.device)
        yield
        entered.append(None)

    def launch_checked(kernel):
        def at(grid):
            def launch(*args, **kwargs):
                # the launch happens inside the guard: entered, not yet left
                assert entered and entered[-1] is not None
                real_kernels.append(kernel)
                return kernel[grid](*args, **kwargs)

            return launch

        return type("Checked", (), {"__getitem__": lambda _, grid: at(grid)})()

    for module in (triton_relu, triton_pool):
        monkeypatch.setattr(module, "on_device_of", recording_guard)
        monkeypatch.setattr(module, "launchable", launch_checked)
    x = _randn((2, 3, 8, 8), torch.float32)
    y, bits = triton_relu.relu_forward(x, True)
    triton_relu.relu_forward_(y.clone(), True)
    triton_relu.relu_backward(x, bits, 2)
    out, sw, pbits = triton_pool.max_pool2d_forward(x, *POOLS["2x2s2"], True, True)
    triton_pool.max_pool2d_backward(out, sw, pbits, 2, list(x.shape), *POOLS["2x2s2"][:4], False)
    assert len(real_kernels) == 5 and entered.count(None) == 5


def test_device_guard_only_for_real_cuda_tensors(monkeypatch):
    from torch._subclasses.fake_tensor import FakeTensorMode

    def no_cuda(*_):
        raise AssertionError("torch.cuda.device must not be entered")

    monkeypatch.setattr(torch.cuda, "device", no_cuda)
    with _launch.on_device_of(torch.empty(3)):
        pass
    with FakeTensorMode():
        fake = torch.empty(3, device="cuda")
    # torch.compile traces with fake tensors, and inductor guards the device in its own code
    with _launch.on_device_of(fake):
        pass


@pytest.mark.gpu
def test_gpu_launch_on_a_device_that_is_not_current():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs: a tensor on cuda:1 while cuda:0 is current")
    torch.cuda.set_device(0)
    x = torch.randn(4, 16, 30, 30, device="cuda:1")
    y, bits = triton_relu.relu_forward(x, True)
    y_ref, bits_ref = reference.relu_forward(x, True)
    assert torch.equal(y, y_ref) and torch.equal(bits, bits_ref)
    _check_pool(x, POOLS["3x3s2p1_overlap"], True, torch.float32)
    assert torch.cuda.current_device() == 0
