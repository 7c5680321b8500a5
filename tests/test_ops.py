"""fastsal.ops against torch: forward bit-identical, backward equal to an independent
autograd reference, what autograd keeps, torch.compile, and clear errors for bad input.

Each test runs on the reference backend and, through Triton's interpreter (or the GPU),
on the kernels.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastsal import ops
from fastsal._kernels import triton_available
from helpers import layouts, rel_l2

BACKENDS = ["torch"] + (["triton"] if triton_available() else [])
RULES = ["gradient", "deconvnet", "guided"]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    monkeypatch.setenv("FASTSAL_BACKEND", request.param)
    return request.param


class _RuleReLU(torch.autograd.Function):
    """Independent reference: torch.relu forward; the rule written out in the backward."""

    @staticmethod
    def forward(ctx, x, rule):
        ctx.save_for_backward(x)
        ctx.rule = rule
        return torch.relu(x)

    @staticmethod
    def backward(ctx, r):
        (f,) = ctx.saved_tensors
        zero = torch.zeros_like(r)
        if ctx.rule == "gradient":
            return torch.where(f > 0, r, zero), None
        if ctx.rule == "deconvnet":
            return torch.where(r > 0, r, zero), None
        return torch.where((f > 0) & (r > 0), r, zero), None


def _grad_of(fn, x, seed_grad):
    x = x.detach().clone().requires_grad_(True)
    out = fn(x)
    out.backward(seed_grad)
    return out.detach(), x.grad


def _seed(shape, dtype=torch.float32, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype)


@pytest.mark.parametrize("rule", RULES)
def test_relu_forward_and_backward(backend, rule):
    x = _seed((2, 3, 7, 5), seed=1)
    for name, xl in layouts(x):
        r = _seed(x.shape, seed=2)
        out, g = _grad_of(lambda t: ops.relu(t, rule), xl, r)
        out_ref, g_ref = _grad_of(lambda t: _RuleReLU.apply(t, rule), xl, r)
        assert torch.equal(out, out_ref), name
        assert torch.equal(g, g_ref), name
        if name == "channels_last":
            assert g.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_relu_half_dtypes(backend, dtype):
    x, r = _seed((1031,), dtype, 1), _seed((1031,), dtype, 2)
    out, g = _grad_of(lambda t: ops.relu(t, "guided"), x, r)
    out_ref, g_ref = _grad_of(lambda t: _RuleReLU.apply(t, "guided"), x, r)
    assert out.dtype == dtype and torch.equal(out, out_ref) and torch.equal(g, g_ref)


@pytest.mark.parametrize("rule", RULES)
def test_relu_inplace_modifies_and_tracks(backend, rule):
    a = _seed((2, 3, 5, 4), seed=1)
    r = _seed(a.shape, seed=2)
    _, g_ref = _grad_of(lambda t: _RuleReLU.apply(t, rule), a, r)
    for name, al in layouts(a):
        al = al.detach().requires_grad_(True)
        b = al * 1.0
        if name == "non_contiguous":
            b = torch.repeat_interleave(b, 2, dim=1)[:, ::2]  # a strided view, as a user's slice
        out = ops.relu(b, rule, inplace=True)
        assert out is b and torch.equal(b, torch.relu(al.detach())), name
        out.backward(r)
        assert torch.equal(al.grad, g_ref), name
    torch.library.opcheck(torch.ops.fastsal.relu_forward_.default, (torch.randn(3, 5), True))


def test_relu_empty(backend):
    x = torch.empty(0, 4, requires_grad=True)
    out = ops.relu(x, "guided")
    out.sum().backward()
    assert out.shape == (0, 4) and x.grad.shape == (0, 4)


POOL_CASES = [
    dict(kernel_size=2),
    dict(kernel_size=3, stride=2, padding=1),
    dict(kernel_size=3, stride=2, ceil_mode=True),
    dict(kernel_size=(3, 2), stride=(1, 2), padding=(1, 0), dilation=(2, 1), ceil_mode=True),
]


@pytest.mark.parametrize("case", POOL_CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_max_pool2d_equals_torch(backend, case):
    x = _seed((2, 3, 11, 10), seed=4)
    for name, xl in layouts(x):
        out_ref = F.max_pool2d(xl, **case)
        r = _seed(out_ref.shape, seed=5)
        out, g = _grad_of(lambda t: ops.max_pool2d(t, **case), xl, r)
        _, g_ref = _grad_of(lambda t: F.max_pool2d(t, **case), xl, r)
        assert torch.equal(out, out_ref), name
        assert rel_l2(g, g_ref) <= 1e-6, name


def test_max_pool2d_ties_and_unbatched(backend):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-1, 2, (3, 9, 9), generator=g).float()
    out, grad = _grad_of(lambda t: ops.max_pool2d(t, 3, 2, 1), x, torch.ones(3, 5, 5))
    out_ref, grad_ref = _grad_of(lambda t: F.max_pool2d(t, 3, 2, 1), x, torch.ones(3, 5, 5))
    assert out.shape == (3, 5, 5) and torch.equal(out, out_ref) and torch.equal(grad, grad_ref)


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("case", POOL_CASES[:3], ids=["2", "3s2p1", "3s2ceil"])
def test_relu_max_pool2d_equals_the_pair(backend, rule, case):
    x = _seed((2, 3, 11, 10), seed=6)
    for name, xl in layouts(x):
        out_ref = F.max_pool2d(torch.relu(xl), **case)
        r = _seed(out_ref.shape, seed=7)
        out, g = _grad_of(lambda t: ops.relu_max_pool2d(t, rule, **case), xl, r)
        _, g_pair = _grad_of(lambda t: ops.max_pool2d(ops.relu(t, rule), **case), xl, r)
        _, g_ref = _grad_of(lambda t: F.max_pool2d(_RuleReLU.apply(t, rule), **case), xl, r)
        assert torch.equal(out, out_ref), name
        assert rel_l2(g, g_ref) <= 1e-6 and rel_l2(g, g_pair) <= 1e-6, name


def test_conv2d_and_linear_equal_torch(backend):
    x = _seed((2, 4, 9, 8), seed=8)
    w, b = _seed((6, 2, 3, 3), seed=9), _seed((6,), seed=10)
    for name, xl in layouts(x):
        kw = dict(stride=2, padding=1, dilation=1, groups=2)
        out_ref = F.conv2d(xl, w, b, **kw)
        r = _seed(out_ref.shape, seed=11)
        out, g = _grad_of(lambda t: ops.conv2d(t, w, b, **kw), xl, r)
        _, g_ref = _grad_of(lambda t: F.conv2d(t, w, b, **kw), xl, r)
        assert torch.equal(out, out_ref), name
        assert rel_l2(g, g_ref) <= 1e-6, name
    for pad in ("same", "valid"):
        w2 = _seed((5, 4, 4, 3), seed=12)  # even kernel: asymmetric 'same' padding
        out_ref = F.conv2d(x, w2, padding=pad)
        r = _seed(out_ref.shape, seed=13)
        out, g = _grad_of(lambda t: ops.conv2d(t, w2, padding=pad), x, r)
        _, g_ref = _grad_of(lambda t: F.conv2d(t, w2, padding=pad), x, r)
        assert torch.equal(out, out_ref) and rel_l2(g, g_ref) <= 1e-6, pad
    xl, wl, bl = _seed((3, 5, 7), seed=14), _seed((4, 7), seed=15), _seed((4,), seed=16)
    r = _seed((3, 5, 4), seed=17)
    out, g = _grad_of(lambda t: ops.linear(t, wl, bl), xl, r)
    out_ref, g_ref = _grad_of(lambda t: F.linear(t, wl, bl), xl, r)
    assert torch.equal(out, out_ref) and rel_l2(g, g_ref) <= 1e-6


def test_conv_and_linear_give_weights_no_gradient():
    w = torch.randn(3, 2, 3, 3, requires_grad=True)
    x = torch.randn(1, 2, 6, 6, requires_grad=True)
    ops.conv2d(x, w).sum().backward()
    assert w.grad is None and x.grad is not None


def test_gradcheck_float64():
    # float64 always takes the exact reference; the rule-free parts are true gradients
    x = torch.randn(1, 2, 7, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: ops.max_pool2d(t, 3, 2, 1), (x,))
    assert torch.autograd.gradcheck(lambda t: ops.relu(t, "gradient"), (x,))
    assert torch.autograd.gradcheck(lambda t: ops.relu_max_pool2d(t, "gradient", 2), (x,))
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: ops.conv2d(t, w, padding=1, stride=2), (x,))
    wl = torch.randn(4, 6, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: ops.linear(t, wl), (x,))


# ---- what autograd keeps ---------------------------------------------------------------


def _saved(fn, x):
    """Tensors autograd keeps for fn(x): (total bytes, list of tensors)."""
    kept = []

    def pack(t):
        kept.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(x)
    out.sum().backward()
    return sum(t.numel() * t.element_size() for t in kept), kept


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_saved_memory(backend, dtype):
    x = torch.randn(2, 8, 16, 16, dtype=dtype, requires_grad=True)  # 4096 elements
    n, pooled = x.numel(), x.numel() // 4
    for rule in ("gradient", "guided"):
        assert _saved(lambda t: ops.relu(t, rule), x)[0] * 8 <= n  # <= 1 bit per element
    assert _saved(lambda t: ops.relu(t, "deconvnet"), x)[0] == 0
    assert _saved(lambda t: ops.max_pool2d(t, 2), x)[0] <= pooled  # one int8 per pooled element
    for rule in ("gradient", "guided"):
        assert _saved(lambda t: ops.relu_max_pool2d(t, rule, 2), x)[0] <= pooled + (pooled + 7) // 8
    assert _saved(lambda t: ops.relu_max_pool2d(t, "deconvnet", 2), x)[0] <= pooled
    # conv/linear keep the weight and nothing else
    w = torch.randn(4, 8, 3, 3, dtype=dtype)
    _, kept = _saved(lambda t: ops.conv2d(t, w, padding=1), x)
    assert len(kept) == 1 and kept[0] is w
    wl = torch.randn(3, 16, dtype=dtype)
    _, kept = _saved(lambda t: ops.linear(t, wl), x)
    assert len(kept) == 1 and kept[0] is wl
    # plain autograd for comparison: relu keeps its full output
    assert _saved(torch.relu, x)[0] == n * x.element_size()


def test_nothing_is_saved_without_grad(backend):
    x = torch.randn(2, 8, 16, 16)
    assert _saved_no_grad(lambda t: ops.relu(t, "guided"), x) == 0


def _saved_no_grad(fn, x):
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        fn(x)
    return sum(t.numel() for t in kept)


# ---- torch.compile -----------------------------------------------------------------------


def test_compile_fullgraph_no_graph_break():
    def step(x, w):
        y = ops.conv2d(x, w, padding=1)
        y = ops.relu_max_pool2d(y, "guided", 2)
        y = ops.relu(ops.max_pool2d(y, 3, 2, 1), "deconvnet")
        return y

    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    w = torch.randn(4, 3, 3, 3)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    out = compiled(x, w)
    out.sum().backward()
    g_compiled = x.grad.clone()
    x.grad = None
    ref = step(x, w)
    ref.sum().backward()
    assert torch.equal(out, ref) and torch.equal(g_compiled, x.grad)


@pytest.mark.slow
def test_compile_inductor_on_cpu():
    def step(x):
        return ops.relu_max_pool2d(ops.relu(x, "guided") * 2, "guided", 2)

    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    out = torch.compile(step, fullgraph=True)(x)
    out.sum().backward()
    g = x.grad.clone()
    x.grad = None
    step(x).sum().backward()
    assert torch.equal(g, x.grad)


def test_library_ops_pass_opcheck():
    x = torch.randn(2, 3, 8, 8)
    torch.library.opcheck(torch.ops.fastsal.relu_forward.default, (x, True))
    _, bits = torch.ops.fastsal.relu_forward(x, True)
    torch.library.opcheck(torch.ops.fastsal.relu_backward.default, (x, bits, 2))
    args = ([3, 3], [2, 2], [1, 1], [1, 1], False, True, True)
    torch.library.opcheck(torch.ops.fastsal.max_pool2d_forward.default, (x, *args))
    pooled, sw, pbits = torch.ops.fastsal.max_pool2d_forward(x, *args)
    torch.library.opcheck(
        torch.ops.fastsal.max_pool2d_backward.default,
        (torch.randn_like(pooled), sw, pbits, 2, [2, 3, 8, 8], [3, 3], [2, 2], [1, 1], [1, 1], False),
    )


# ---- bad input -----------------------------------------------------------------------------


def test_bad_input_errors():
    x = torch.randn(1, 2, 8, 8)
    with pytest.raises(ValueError, match="unknown saliency rule 'smooth'.*'guided'"):
        ops.relu(x, "smooth")
    with pytest.raises(TypeError, match="floating-point"):
        ops.relu(torch.ones(3, dtype=torch.int64), "guided")
    with pytest.raises(TypeError, match="torch.Tensor"):
        ops.relu([1.0, 2.0], "guided")
    with pytest.raises(ValueError, match="3-D or 4-D"):
        ops.max_pool2d(torch.randn(8, 8), 2)
    with pytest.raises(ValueError, match="at most 127"):
        ops.max_pool2d(x, 12)
    with pytest.raises(ValueError, match="half the kernel"):
        ops.max_pool2d(x, 2, padding=2)
    with pytest.raises(TypeError, match="kernel_size"):
        ops.max_pool2d(x, "2")
    with pytest.raises(ValueError, match="stride must be >= 1"):
        ops.max_pool2d(x, 2, stride=0)
    with pytest.raises(ValueError, match="one device"):
        ops.conv2d(x, torch.randn(2, 2, 3, 3, device="meta"))
    with pytest.raises(ValueError, match="in_features"):
        ops.linear(torch.randn(2, 5), torch.randn(3, 4))
    with pytest.raises(TypeError, match="floating-point"):
        ops.max_pool2d(torch.ones(1, 1, 4, 4, dtype=torch.uint8), 2)


# ---- on a GPU: the ops through the compiled kernels, torch.compile and CUDA graphs ----------


@pytest.fixture
def no_tf32():
    """fp32 convolutions and matmuls in full precision: cuDNN runs TF32 by default, whose
    ~1e-3 relative error flips pool switches and puts the input gradient ~2e-2 off."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def test_no_tf32_fixture_turns_tf32_off(no_tf32):  # runs on CPU: the flags still exist
    assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32


def _gpu_step(x, w):
    y = ops.conv2d(x, w, padding=1)
    y = ops.relu_max_pool2d(y, "guided", 3, 2, 1)
    return ops.max_pool2d(ops.relu(y, "guided"), 2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_gpu_ops_match_cpu_reference(dtype, no_tf32):
    x = torch.randn(4, 3, 37, 41, dtype=dtype)
    w = torch.randn(16, 3, 3, 3, dtype=dtype)
    r = torch.randn(4, 16, 9, 10, dtype=dtype)
    outs = {}
    for device in ("cpu", "cuda"):
        xd = x.to(device).contiguous(memory_format=torch.channels_last).requires_grad_(True)
        out = _gpu_step(xd, w.to(device))
        out.backward(r.to(device))
        outs[device] = (out.detach().float().cpu(), xd.grad.float().cpu())
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert rel_l2(outs["cuda"][0], outs["cpu"][0]) <= tol
    assert rel_l2(outs["cuda"][1], outs["cpu"][1]) <= tol


@pytest.mark.gpu
def test_gpu_compile_inductor_and_cuda_graph(no_tf32):
    # eager against inductor (which may pick another conv layout and algorithm): without TF32
    x = torch.randn(8, 3, 32, 32, device="cuda", requires_grad=True)
    w = torch.randn(16, 3, 3, 3, device="cuda")
    r = torch.randn(8, 16, 8, 8, device="cuda")
    _gpu_step(x, w).backward(r)
    expected = x.grad.clone()

    x.grad = None
    compiled = torch.compile(_gpu_step, fullgraph=True)
    compiled(x, w).backward(r)
    assert rel_l2(x.grad, expected) <= 1e-5

    # one static-shape forward + backward captured as a CUDA graph and replayed
    static_x = x.detach().clone().requires_grad_(True)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            static_x.grad = None
            _gpu_step(static_x, w).backward(r)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    static_x.grad = None
    with torch.cuda.graph(graph):
        _gpu_step(static_x, w).backward(r)
    new_x = torch.randn_like(x)
    static_x.data.copy_(new_x)
    graph.replay()
    torch.cuda.synchronize()
    new_x.requires_grad_(True)
    _gpu_step(new_x, w).backward(r)
    assert rel_l2(static_x.grad, new_x.grad) <= 1e-5


def test_conv_and_linear_under_autocast():
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    w, wl = torch.randn(4, 3, 3, 3), torch.randn(5, 4 * 8 * 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ops.linear(ops.conv2d(x, w, padding=1).flatten(1), wl)
    y.float().sum().backward()
    x2 = x.detach().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y2 = F.linear(F.conv2d(x2, w, padding=1).flatten(1), wl)
    y2.float().sum().backward()
    assert y.dtype == torch.bfloat16 and rel_l2(x.grad, x2.grad) <= 2e-2
