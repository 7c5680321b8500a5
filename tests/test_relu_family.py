"""The ReLU family (clipped ReLU: ReLU6, Hardtanh(0, m); LeakyReLU(α)) under the three rules.

* kernels (Triton's interpreter here, compiled on a GPU) against the plain-torch reference,
  mask bytes included;
* ``fastsal.ops.clipped_relu`` / ``leaky_relu`` against an independent per-call
  autograd.Function written here, and their gradient rule against plain autograd of
  ``F.relu6`` / ``F.hardtanh`` / ``F.leaky_relu``, bit for bit, boundaries included;
* in place, layouts, empty tensors, what autograd keeps, torch.compile, bad arguments.

The interpreter rounds fp32 -> bf16 by truncation where the GPU (and torch) round to
nearest even (see tests/test_kernels.py), so a bf16 value the kernels compute in fp32 (a
LeakyReLU's α·x, a clamp to an m that bf16 cannot hold) may be one ulp off when
interpreted; everywhere else, and on a GPU, the tests demand bit-identical results.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fastsal import ops
from fastsal._kernels import _launch, interpreting, reference, triton_available
from fastsal.rules import Activation, apply_rule
from helpers import first_mismatches, layouts

# α = 0 times an infinite input is NaN, in torch as in the kernels; the interpreter's numpy says so
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered in multiply:RuntimeWarning")

BACKENDS = ["torch"] + (["triton"] if triton_available() else [])
RULES = ["gradient", "deconvnet", "guided"]
RULE_CODES = {"gradient": 0, "deconvnet": 1, "guided": 2}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CLIPPED, LEAKY = Activation.CLIPPED_RELU.code, Activation.LEAKY_RELU.code

# (name, activation code, its scalar): m of a clipped ReLU, α of a LeakyReLU
ROWS = [
    ("relu6", CLIPPED, 6.0),
    ("hardtanh_0.1", CLIPPED, 0.1),  # an m that no float type holds exactly
    ("leaky_0.01", LEAKY, 0.01),
    ("leaky_0.2", LEAKY, 0.2),
    ("leaky_0", LEAKY, 0.0),
]
ROW_IDS = [r[0] for r in ROWS]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    monkeypatch.setenv("FASTSAL_BACKEND", request.param)
    return request.param


def _seed(shape, dtype=torch.float32, seed=3, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(dtype)


def _boundaries(m: float, dtype) -> list:
    """0, -0, m and its neighbours in ``dtype``, ±inf and NaN."""
    mt = torch.tensor(m, dtype=dtype)
    up, down = torch.tensor(math.inf, dtype=dtype), torch.tensor(-math.inf, dtype=dtype)
    return [0.0, -0.0, float(mt), float(torch.nextafter(mt, down)), float(torch.nextafter(mt, up)),
            math.inf, -math.inf, math.nan, 1e-30, -1e-30]


def _input(shape, dtype, m=6.0, seed=0):
    """randn spread over [-2m, 2m] with the boundary values at the start (no NaN: see _finite)."""
    x = _seed(shape, torch.float32, seed, scale=max(m, 1.0)).to(dtype)
    special = [v for v in _boundaries(m, dtype) if not math.isnan(v)]
    flat = x.view(-1) if x.is_contiguous() else None
    if flat is not None and flat.numel() >= len(special):
        flat[: len(special)] = torch.tensor(special, dtype=torch.float64).to(dtype)
    return x


# ---- the kernels against the reference ------------------------------------------------------


def _int_view(t):
    return t.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def assert_same(actual, expected, what="", signed_zeros=True):
    """Bit-identical (NaN == NaN, -0.0 != 0.0 unless ``signed_zeros`` is off), or within one ulp
    where the interpreter truncates bf16."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    if not signed_zeros:  # the independent reference's zeros carry no meaningful sign
        actual, expected = actual + 0.0, expected + 0.0  # -0.0 + 0.0 == +0.0, exact otherwise
    nan = expected.isnan()
    assert torch.equal(actual.isnan(), nan), what
    a, e = _int_view(actual)[~nan.contiguous()], _int_view(expected)[~nan.contiguous()]
    if actual.dtype == torch.bfloat16 and interpreting() and actual.device.type == "cpu":
        # truncation moves a result at most one step towards zero: one unit of its bit pattern
        bad = (a.int() - e.int()).abs() > 1
        assert not bad.any(), f"{what}: " + first_mismatches(actual, expected)
        return
    assert torch.equal(a, e), f"{what}: " + first_mismatches(actual, expected)


if triton_available():
    from fastsal._kernels import relu as triton_relu


@pytest.mark.skipif(not triton_available(), reason="Triton is not installed")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("row", ROWS, ids=ROW_IDS)
def test_kernels_match_reference(row, dtype):
    """3003 elements: two full (unmasked, vector) programs and a masked tail; NaN included."""
    _, act, param = row
    x = _input((3003,), dtype, m=param if act == CLIPPED else 6.0).to(DEVICE)
    x[11] = math.nan
    y, bits = triton_relu.relu_family_forward(x, act, param, True)
    y_ref, bits_ref = reference.relu_family_forward(x.cpu(), act, param, True)
    assert_same(y.cpu(), y_ref, "forward")
    assert torch.equal(bits.cpu(), bits_ref), "mask bits"
    assert bits.numel() == (x.numel() + 7) // 8
    assert reference.unpack_bits(bits_ref, x.cpu())[11].item() is False  # NaN: bit 0, as the ReLU row
    y2, none = triton_relu.relu_family_forward(x, act, param, False)
    assert none.numel() == 0
    assert_same(y2.cpu(), y_ref, "forward without mask")
    r = _seed(x.shape, dtype, seed=1).to(DEVICE)
    for rule in (0, 1, 2):
        out = triton_relu.relu_family_backward(r, bits, rule, act, param)
        expected = reference.relu_family_backward(r.cpu(), bits_ref, rule, act, param)
        assert_same(out.cpu(), expected, f"rule {rule}")


@pytest.mark.skipif(not triton_available(), reason="Triton is not installed")
def test_kernels_in_place_channels_last_and_int64(monkeypatch):
    x = _input((2, 5, 3, 4), torch.float32, m=0.5).to(DEVICE).contiguous(memory_format=torch.channels_last)
    # in place: the same values and bits as out of place
    y, bits = reference.relu_family_forward(x.cpu(), CLIPPED, 0.5, True)
    z = x.clone()
    bits_ = triton_relu.relu_family_forward_(z, CLIPPED, 0.5, True)
    assert_same(z.cpu(), y) and torch.equal(bits_.cpu(), bits)
    assert z.stride() == x.stride()
    # bits follow memory order: byte 0 holds the first 8 elements of the NHWC walk
    nhwc = x.cpu().permute(0, 2, 3, 1).reshape(-1)
    assert bits[0].item() == sum(int(0 < v < 0.5) << i for i, v in enumerate(nhwc[:8].tolist()))
    r = _seed(x.shape, seed=4).to(DEVICE).contiguous(memory_format=torch.channels_last)
    out = triton_relu.relu_family_backward(r, bits_.to(DEVICE), 2, LEAKY, 0.2)
    assert out.stride() == x.stride()
    assert_same(out.cpu(), reference.relu_family_backward(r.cpu(), bits, 2, LEAKY, 0.2))
    # int64 offsets
    monkeypatch.setattr(_launch, "INT64_THRESHOLD", 16)
    x = _input((1031,), torch.float32, m=6.0).to(DEVICE)
    y, bits = triton_relu.relu_family_forward(x, LEAKY, 0.2, True)
    y_ref, bits_ref = reference.relu_family_forward(x.cpu(), LEAKY, 0.2, True)
    assert_same(y.cpu(), y_ref) and torch.equal(bits.cpu(), bits_ref)
    r = _seed((1031,), seed=5).to(DEVICE)
    assert_same(triton_relu.relu_family_backward(r, bits, 0, LEAKY, 0.2).cpu(),
                reference.relu_family_backward(r.cpu(), bits_ref, 0, LEAKY, 0.2))


@pytest.mark.skipif(not triton_available(), reason="Triton is not installed")
def test_kernels_empty_and_bad_code():
    x = torch.empty(0, 3, device=DEVICE)
    y, bits = triton_relu.relu_family_forward(x, LEAKY, 0.1, True)
    assert y.shape == x.shape and bits.numel() == 0
    assert triton_relu.relu_family_backward(x, bits, 2, LEAKY, 0.1).shape == x.shape
    with pytest.raises(ValueError, match="unknown activation code 7"):
        triton_relu.relu_family_forward(torch.ones(3, device=DEVICE), 7, 0.0, True)


# ---- the reference's table ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_reference_slices_large_cpu_tensors(monkeypatch, dtype):
    """Above CHUNK elements the CPU reference works slice by slice: the same values, bits, layout."""
    x = _input((2, 3, 10, 9), dtype, m=6.0, seed=15).contiguous(memory_format=torch.channels_last)
    r = _seed(x.shape, dtype, seed=16).contiguous(memory_format=torch.channels_last)
    for act, param in ((CLIPPED, 6.0), (LEAKY, 0.2)):
        whole_y, whole_bits = reference.relu_family_forward(x, act, param, True)
        whole = [reference.relu_family_backward(r, whole_bits, rule, act, param) for rule in (0, 1, 2)]
        monkeypatch.setattr(reference, "CHUNK", 64)
        y, bits = reference.relu_family_forward(x, act, param, True)
        z = x.clone()
        bits_ = reference.relu_family_forward_(z, act, param, True)
        assert torch.equal(y, whole_y) and torch.equal(z, whole_y) and y.stride() == x.stride()
        assert torch.equal(bits, whole_bits) and torch.equal(bits_, whole_bits)
        for rule, expected in zip((0, 1, 2), whole):
            out = reference.relu_family_backward(r, bits, rule, act, param)
            assert torch.equal(out, expected) and out.stride() == x.stride(), rule
        monkeypatch.undo()



def test_rule_table_on_hand_values():
    f = torch.tensor([-2.0, 0.0, 1.0, 6.0, 7.0, -2.0, 1.0, 7.0])
    r = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, -1.0, -1.0, -1.0])
    clipped = f.gt(0) & f.lt(6)
    assert apply_rule(r, clipped, "gradient", "clipped_relu", 6.0).tolist() == [0, 0, 1, 0, 0, 0, -1, 0]
    assert apply_rule(r, clipped, "guided", "clipped_relu", 6.0).tolist() == [0, 0, 1, 0, 0, 0, 0, 0]
    assert apply_rule(r, None, "deconvnet", "clipped_relu", 6.0).tolist() == [1, 1, 1, 1, 1, 0, 0, 0]
    pos = f > 0
    assert apply_rule(r, pos, "gradient", "leaky_relu", 0.5).tolist() == [0.5, 0.5, 1, 1, 1, -0.5, -1, -1]
    assert apply_rule(r, pos, "guided", "leaky_relu", 0.5).tolist() == [0.5, 0.5, 1, 1, 1, 0, 0, 0]
    # a negative slope: guided masks R, not the product, so a negative value passes
    assert apply_rule(r, pos, "guided", "leaky_relu", -0.5).tolist() == [-0.5, -0.5, 1, 1, 1, 0, 0, 0]
    assert apply_rule(r, None, "deconvnet", "leaky_relu", 0.5).tolist() == [1, 1, 1, 1, 1, 0, 0, 0]


# ---- the ops against an independent per-call reference ------------------------------------------


class _RuleFamily(torch.autograd.Function):
    """Independent reference: torch's forward; the table written out in the backward from the
    saved input (compared with m, multiplied by α in float32 or wider, as torch's own backward)."""

    @staticmethod
    def forward(ctx, x, rule, kind, param):
        ctx.save_for_backward(x)
        ctx.rule, ctx.kind, ctx.param = rule, kind, param
        return F.hardtanh(x, 0.0, param) if kind == "clipped" else F.leaky_relu(x, param)

    @staticmethod
    def backward(ctx, r):
        (f,) = ctx.saved_tensors
        wide = torch.promote_types(r.dtype, torch.float32)
        fw, rw = f.to(wide), r.to(wide)
        if ctx.kind == "clipped":
            local = torch.where((fw > 0) & (fw < ctx.param), rw, torch.zeros_like(rw))
        else:
            local = torch.where(fw > 0, rw, rw * ctx.param)
        if ctx.rule == "gradient":
            out = local
        elif ctx.rule == "deconvnet":
            out = torch.where(rw > 0, rw, torch.zeros_like(rw))
        else:
            out = torch.where(rw > 0, local, torch.zeros_like(rw))
        return out.to(r.dtype), None, None, None


def _op(kind, rule, param, inplace=False):
    if kind == "clipped":
        return lambda t: ops.clipped_relu(t, rule, param, inplace=inplace)
    return lambda t: ops.leaky_relu(t, rule, param, inplace=inplace)


def _grad_of(fn, x, seed_grad):
    x = x.detach().clone().requires_grad_(True)
    out = fn(x)
    out.backward(seed_grad)
    return out.detach(), x.grad


OP_ROWS = [("clipped", 6.0), ("clipped", 0.1), ("leaky", 0.01), ("leaky", 0.2), ("leaky", 0.0)]
OP_IDS = [f"{k}_{p}" for k, p in OP_ROWS]


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("row", OP_ROWS, ids=OP_IDS)
def test_ops_match_per_call_reference(backend, row, rule):
    kind, param = row
    x = _input((2, 3, 7, 5), torch.float32, m=param if kind == "clipped" else 6.0, seed=1)
    r = _seed(x.shape, seed=2)
    for name, xl in layouts(x):
        out, g = _grad_of(_op(kind, rule, param), xl, r)
        out_ref, g_ref = _grad_of(lambda t: _RuleFamily.apply(t, rule, kind, param), xl, r)
        assert_same(out, out_ref, f"{name} forward")
        assert_same(g, g_ref, f"{name} {rule}", signed_zeros=False)
        if name == "channels_last":
            assert out.is_contiguous(memory_format=torch.channels_last)
            assert g.is_contiguous(memory_format=torch.channels_last)


def _torch_forms(kind, param):
    """The torch functions the op stands for: F.relu6 and F.hardtanh for a clipped ReLU of 6."""
    if kind == "leaky":
        return {"leaky_relu": lambda t: F.leaky_relu(t, param)}
    forms = {"hardtanh": lambda t: F.hardtanh(t, 0.0, param)}
    if param == 6.0:
        forms["relu6"] = F.relu6
    return forms


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("row", [("clipped", 6.0), ("clipped", 0.1), ("leaky", 0.2), ("leaky", 0.0)],
                         ids=["relu6", "hardtanh_0.1", "leaky_0.2", "leaky_0"])
def test_gradient_rule_is_plain_autograd(backend, row, dtype):
    """Bit for bit, boundaries included: 0, -0, m and its neighbours, ±inf, tiny values."""
    kind, param = row
    x = _input((4, 3, 9, 11), dtype, m=param if kind == "clipped" else 6.0, seed=6)
    r = _seed(x.shape, dtype, seed=7)
    for name, xl in layouts(x):
        out, g = _grad_of(_op(kind, "gradient", param), xl, r)
        for which, fn in _torch_forms(kind, param).items():
            out_ref, g_ref = _grad_of(fn, xl, r)
            assert_same(out, out_ref, f"{name} forward vs {which}")
            assert_same(g, g_ref, f"{name} gradient vs {which}")
    if kind == "clipped":  # torch.clamp is the same forward
        assert_same(ops.clipped_relu(x, "gradient", param), torch.clamp(x, 0, param))


def test_nan_convention():
    """At a NaN input the clipped ReLU's mask is 0 (as the ReLU row's; autograd passes R there);
    the LeakyReLU's is autograd's (α·R)."""
    x = torch.tensor([math.nan, 1.0], requires_grad=True)
    ops.clipped_relu(x, "gradient", 6.0).backward(torch.tensor([2.0, 2.0]))
    assert x.grad.tolist() == [0.0, 2.0]
    x.grad = None
    y = ops.leaky_relu(x, "gradient", 0.5)
    y.backward(torch.tensor([2.0, 2.0]))
    assert y[0].isnan() and x.grad.tolist() == [1.0, 2.0]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_dtypes_all_rules(backend, dtype):
    x = _input((1031,), dtype, m=6.0, seed=8)
    r = _seed((1031,), dtype, seed=9)
    for kind, param in (("clipped", 6.0), ("leaky", 0.2)):
        for rule in RULES:
            out, g = _grad_of(_op(kind, rule, param), x, r)
            out_ref, g_ref = _grad_of(lambda t: _RuleFamily.apply(t, rule, kind, param), x, r)
            assert out.dtype == dtype and g.dtype == dtype
            assert_same(out, out_ref, f"{kind} forward")
            assert_same(g, g_ref, f"{kind} {rule}", signed_zeros=False)


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("kind,param", [("clipped", 6.0), ("leaky", 0.2), ("leaky", -0.5)],
                         ids=["relu6", "leaky_0.2", "leaky_neg"])
def test_inplace_modifies_and_tracks(backend, rule, kind, param):
    a = _input((2, 3, 5, 4), torch.float32, seed=10)
    r = _seed(a.shape, seed=11)
    expected_out, g_ref = _grad_of(lambda t: _RuleFamily.apply(t, rule, kind, param), a, r)
    for name, al in layouts(a):
        al = al.detach().requires_grad_(True)
        b = al * 1.0
        if name == "non_contiguous":
            b = torch.repeat_interleave(b, 2, dim=1)[:, ::2]  # a strided view, as a user's slice
        out = _op(kind, rule, param, inplace=True)(b)
        assert out is b, name
        assert_same(b.detach(), expected_out, name)
        out.backward(r)
        # a negative slope makes guided's zeros -0.0 (0·α), the reference's +0.0
        assert_same(al.grad, g_ref, f"{name} {rule}", signed_zeros=False)
    # the in-place forms torch users write, and autograd's answer, on the same tensor
    if rule == "gradient" and param >= 0:
        c = a.clone().requires_grad_(True)
        (F.relu6(c * 1.0, inplace=True) if kind == "clipped" else F.leaky_relu_(c * 1.0, param)).backward(r)
        assert_same(c.grad, g_ref, "torch in place")


def test_inplace_without_grad_and_leaf_errors(backend):
    x = _input((3, 40), torch.float32, seed=12)
    y = x.clone()
    assert ops.clipped_relu(y, "guided", 6.0, inplace=True) is y and torch.equal(y, F.relu6(x))
    y = x.clone()
    assert ops.leaky_relu(y, "guided", 0.1, inplace=True) is y and torch.equal(y, F.leaky_relu(x, 0.1))
    leaf = x.clone().requires_grad_(True)
    with pytest.raises(RuntimeError, match="leaf Variable"):
        ops.leaky_relu(leaf, "guided", 0.1, inplace=True)


def test_empty(backend):
    for fn in (_op("clipped", "guided", 6.0), _op("leaky", "gradient", 0.1)):
        x = torch.empty(0, 4, requires_grad=True)
        out = fn(x)
        out.sum().backward()
        assert out.shape == (0, 4) and x.grad.shape == (0, 4)


# ---- what autograd keeps ------------------------------------------------------------------------


def _saved_bytes(fn, x):
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        out = fn(x)
    out.sum().backward()
    return sum(t.numel() * t.element_size() for t in kept)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_saved_memory_one_bit(backend, dtype):
    x = torch.randn(2, 8, 16, 16, dtype=dtype, requires_grad=True)  # 4096 elements
    n = x.numel()
    for kind, param in (("clipped", 6.0), ("leaky", 0.01)):
        for rule in ("gradient", "guided"):
            assert _saved_bytes(_op(kind, rule, param), x) == n // 8, (kind, rule)
        assert _saved_bytes(_op(kind, "deconvnet", param), x) == 0, kind
    # plain autograd keeps the whole input
    assert _saved_bytes(F.relu6, x) == n * x.element_size()
    with torch.no_grad():
        kept = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
            ops.leaky_relu(x, "guided", 0.1)
        assert not kept


# ---- torch.compile -------------------------------------------------------------------------------


def test_compile_fullgraph_no_graph_break():
    def step(x):
        y = ops.clipped_relu(x * 3.0, "guided", 6.0)
        y = ops.leaky_relu(y - 2.0, "gradient", 0.2)
        y = ops.leaky_relu(y * 1.5, "guided", 0.1, inplace=True)  # the in-place forms too
        y = ops.clipped_relu(y, "gradient", 0.8, inplace=True) * 1.0
        return ops.leaky_relu(ops.clipped_relu(y, "deconvnet", 0.5), "guided", 0.01)

    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    out.backward(torch.ones_like(out))
    g_compiled = x.grad.clone()
    x.grad = None
    ref = step(x)
    ref.backward(torch.ones_like(ref))
    assert torch.equal(out, ref) and torch.equal(g_compiled, x.grad)


def test_library_ops_pass_opcheck():
    x = torch.randn(2, 3, 8, 8) * 4
    for act, param in ((CLIPPED, 6.0), (LEAKY, 0.2)):
        torch.library.opcheck(torch.ops.fastsal.relu_family_forward.default, (x, act, param, True))
        torch.library.opcheck(torch.ops.fastsal.relu_family_forward_.default, (x.clone(), act, param, True))
        _, bits = torch.ops.fastsal.relu_family_forward(x, act, param, True)
        for rule in (0, 1, 2):
            torch.library.opcheck(torch.ops.fastsal.relu_family_backward.default, (x, bits, rule, act, param))


# ---- bad arguments -------------------------------------------------------------------------------


def test_bad_arguments():
    x = torch.randn(2, 3, requires_grad=True)
    for bad in (0, 0.0, -1.0, math.nan, -math.inf):
        with pytest.raises(ValueError, match="max_value must be > 0"):
            ops.clipped_relu(x, "guided", bad)
    for bad in ("6", None, True, torch.tensor(6.0), [6.0]):
        with pytest.raises(ValueError, match="max_value must be a real number"):
            ops.clipped_relu(x, "guided", bad)
    for bad in ("0.1", None, False, torch.tensor(0.1), (0.1,)):
        with pytest.raises(ValueError, match="negative_slope must be a real number"):
            ops.leaky_relu(x, "guided", bad)
    for bad in (math.nan, math.inf):
        with pytest.raises(ValueError, match="negative_slope must be finite"):
            ops.leaky_relu(x, "guided", bad)
    with pytest.raises(ValueError, match="unknown saliency rule"):
        ops.leaky_relu(x, "smooth")
    with pytest.raises(TypeError, match="floating-point"):
        ops.clipped_relu(torch.ones(3, dtype=torch.int64), "guided", 6.0)
    # ints are numbers too, as in torch
    assert torch.equal(ops.clipped_relu(x, "guided", 6), F.relu6(x))
    assert torch.equal(ops.leaky_relu(x, "guided", 1), F.leaky_relu(x, 1))
    assert torch.equal(ops.clipped_relu(x, "guided", math.inf), torch.relu(x))


def test_gradcheck_float64():
    # float64 takes the exact reference; the gradient rule is the true derivative away from the kinks
    x = (torch.rand(2, 3, 5, dtype=torch.float64) * 14 - 4)
    x = (x + 0.3 * (x.round() == x)).requires_grad_(True)  # no point on a kink (0 or 6)
    assert torch.autograd.gradcheck(lambda t: ops.clipped_relu(t, "gradient", 6.0), (x,))
    assert torch.autograd.gradcheck(lambda t: ops.leaky_relu(t, "gradient", 0.3), (x,))


# ---- on a GPU: the compiled kernels, inductor and a CUDA graph -------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_gpu_ops_bit_identical_to_cpu(dtype):
    """The CUDA kernels through the ops: the same bits as torch's CPU forward and the CPU reference."""
    for kind, param in OP_ROWS:
        x = _input((8, 64, 33, 17), dtype, m=param if kind == "clipped" else 6.0, seed=13)
        x = x.contiguous(memory_format=torch.channels_last)
        r = _seed(x.shape, dtype, seed=14).contiguous(memory_format=torch.channels_last)
        for rule in RULES:
            res = {}
            for device in ("cpu", "cuda"):
                out, g = _grad_of(_op(kind, rule, param), x.to(device), r.to(device))
                res[device] = (out.cpu(), g.cpu())
            assert_same(res["cuda"][0], res["cpu"][0], f"{kind} {param} forward")
            assert_same(res["cuda"][1], res["cpu"][1], f"{kind} {param} {rule}")


@pytest.mark.gpu
def test_gpu_compile_inductor_and_cuda_graph():
    def step(x):
        y = ops.clipped_relu(x * 3.0, "guided", 6.0, inplace=False)
        return ops.leaky_relu(y - 2.0, "guided", 0.2)

    x = torch.randn(8, 16, 32, 32, device="cuda", requires_grad=True)
    r = torch.randn_like(x)
    step(x).backward(r)
    expected = x.grad.clone()
    x.grad = None
    torch.compile(step, fullgraph=True)(x).backward(r)
    torch.testing.assert_close(x.grad, expected, rtol=1e-6, atol=0)

    static_x = x.detach().clone().requires_grad_(True)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            static_x.grad = None
            step(static_x).backward(r)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    static_x.grad = None
    with torch.cuda.graph(graph):
        step(static_x).backward(r)
    new_x = torch.randn_like(x)
    static_x.data.copy_(new_x)
    graph.replay()
    torch.cuda.synchronize()
    new_x.requires_grad_(True)
    step(new_x).backward(r)
    assert torch.equal(static_x.grad, new_x.grad)
