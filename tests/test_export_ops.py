"""The ops' export mode (fastsal._export_ops) and fastsal's two decompositions, without ONNX.

The export-mode autograd Functions also run eagerly, so their backward is compared here,
exactly, with fastsal's eager ops (packed bits, int8 switches) on inputs full of ties and
zeros; the decompositions are compared with torch's own backward ops in float64. One small
``torch.export`` checks that the ops branch to export mode there, and that eager fastsal
keeps its packed bits afterwards.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastsal import _export_ops, ops
from fastsal.exporter import SaliencyGraph
from fastsal.exporter.decompositions import adaptive_avg_pool2d_backward, avg_pool2d_backward
from fastsal.reductions import get_reduction
from fastsal.rules import Rule

RULES = ("gradient", "deconvnet", "guided")


def _tied(*shape, seed=0):
    """Values in {-2, ..., 2}: many ties inside pool windows and many exact zeros."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-2, 3, shape, generator=g).float()


def _backward(fn, x, grad):
    x = x.clone().requires_grad_(True)
    out = fn(x)
    (g,) = torch.autograd.grad(out, x, grad)
    return out.detach(), g


@pytest.mark.parametrize("rule", RULES)
def test_relu_export_mode_equals_eager(rule):
    x = _tied(2, 3, 9, 7)
    grad = torch.randn(2, 3, 9, 7, generator=torch.Generator().manual_seed(1))
    grad[0, 0, 0] = 0.0
    out_e, g_e = _backward(lambda t: ops.relu(t, rule), x, grad)
    out_x, g_x = _backward(lambda t: _export_ops.relu(t, Rule(rule).code), x, grad)
    assert torch.equal(out_e, out_x)
    assert torch.equal(g_e, g_x)
    assert g_e.abs().sum() > 0


@pytest.mark.skipif(not hasattr(ops, "clipped_relu"), reason="the ReLU family ops are not in this checkout")
@pytest.mark.parametrize("rule", RULES)
def test_relu_family_export_mode_equals_eager(rule):
    from fastsal._kernels.reference import CLIPPED_RELU, LEAKY_RELU

    x = _tied(2, 3, 8, 8) * 3.5  # hits 0 and the clip value 7 exactly
    grad = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    code = Rule(rule).code
    for eager, act, param in (
        (lambda t: ops.clipped_relu(t, rule, 7.0), CLIPPED_RELU, 7.0),
        (lambda t: ops.leaky_relu(t, rule, 0.1), LEAKY_RELU, 0.1),
    ):
        out_e, g_e = _backward(eager, x, grad)
        out_x, g_x = _backward(lambda t: _export_ops.relu_family(t, code, act, param), x, grad)
        assert torch.equal(out_e, out_x)
        torch.testing.assert_close(g_x, g_e, rtol=0, atol=0)


POOLS = [
    # (kernel, stride, padding, dilation, ceil_mode, H, W): which unpool they take
    ((2, 2), (2, 2), (0, 0), (1, 1), False, 8, 8),  # VGG: windows tile the input -> compare
    ((2, 2), (2, 2), (0, 0), (1, 1), False, 9, 7),  # floor mode leaves a row and a column out -> compare + pad
    ((3, 3), (2, 2), (1, 1), (1, 1), False, 9, 9),  # ResNet stem: overlapping -> scatter-add
    ((3, 3), (2, 2), (0, 0), (1, 1), True, 10, 9),  # GoogLeNet: ceil mode, overlapping
    ((3, 3), (1, 1), (1, 1), (1, 1), False, 6, 6),  # GoogLeNet branch: stride 1
    ((2, 3), (3, 2), (1, 1), (2, 1), False, 9, 10),  # dilation, uneven
    ((2, 2), (2, 2), (0, 0), (1, 1), True, 7, 7),  # ceil mode with a partial window -> scatter
]


@pytest.mark.parametrize("pool", POOLS, ids=lambda p: f"k{p[0]}s{p[1]}p{p[2]}d{p[3]}{'c' if p[4] else ''}{p[5]}x{p[6]}")
@pytest.mark.parametrize("rule", (None,) + RULES)
def test_max_pool_export_mode_equals_eager(pool, rule):
    k, s, p, d, ceil, h, w = pool
    x = _tied(2, 3, h, w, seed=h * w)
    code = -1 if rule is None else Rule(rule).code
    if rule is None:
        def eager(t):
            return ops.max_pool2d(t, k, s, p, d, ceil)
    else:
        def eager(t):
            return ops.relu_max_pool2d(t, rule, k, s, p, d, ceil)
    pooled = eager(x)
    grad = torch.randn(pooled.shape, generator=torch.Generator().manual_seed(3))
    out_e, g_e = _backward(eager, x, grad)
    out_x, g_x = _backward(lambda t: _export_ops.max_pool2d(t, k, s, p, d, ceil, code), x, grad)
    assert torch.equal(out_e, out_x)
    # overlapping windows sum in another order: equal to rounding
    torch.testing.assert_close(g_x, g_e, rtol=1e-6, atol=1e-6)
    assert g_e.abs().sum() > 0


def test_compare_unpool_is_taken_where_windows_tile():
    assert _export_ops.tiles((2, 2), (2, 2), (0, 0), (1, 1))
    assert not _export_ops.tiles((3, 3), (2, 2), (1, 1), (1, 1))
    assert not _export_ops.tiles((2, 2), (2, 2), (1, 1), (1, 1))


@pytest.mark.parametrize("size,out", [((2, 2), (7, 7)), ((7, 7), (7, 7)), ((5, 9), (3, 4)), ((13, 6), (1, 1))])
def test_adaptive_avg_pool_backward_decomposition(size, out):
    x = torch.randn(2, 3, *size, dtype=torch.float64, requires_grad=True)
    y = F.adaptive_avg_pool2d(x, out)
    g = torch.randn_like(y)
    (ref,) = torch.autograd.grad(y, x, g)
    torch.testing.assert_close(adaptive_avg_pool2d_backward(g, x), ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("k,s,p,ceil,count_pad,div", [
    (2, 2, 0, False, True, None),  # DenseNet transition
    (3, 2, 1, True, False, None),
    (3, 2, 1, True, True, None),
    (3, 1, 1, False, False, None),
    (2, 3, 1, True, True, 3),
])
def test_avg_pool_backward_decomposition(k, s, p, ceil, count_pad, div):
    for shape in ((2, 3, 7, 8), (3, 9, 5)):  # batched and unbatched
        x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
        y = F.avg_pool2d(x, k, s, p, ceil, count_pad, div)
        g = torch.randn_like(y)
        (ref,) = torch.autograd.grad(y, x, g)
        got = avg_pool2d_backward(g, x, [k, k], [s, s], [p, p], ceil, count_pad, div)
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(4 * 4 * 4, 5)

    def forward(self, x):
        x = self.pool(F.relu(self.bn(self.conv(x)), inplace=True))
        return self.fc(torch.flatten(x, 1))


def _saved(fn, x):
    """(dtype, numel) of what autograd saves while ``fn(x)`` runs."""
    seen = []

    def pack(t):
        seen.append((t.dtype, t.numel()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x.clone().requires_grad_(True))
    return seen


def test_torch_export_uses_export_mode_and_eager_keeps_bits():
    import fastsal

    model = _Tiny().eval()
    twin = fastsal.rewrite(model, "guided")
    program = torch.export.export(SaliencyGraph(twin, get_reduction("abs_max"), False), (torch.randn(2, 3, 8, 8),))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert not any("fastsal" in t for t in targets), targets
    assert "aten.max_pool2d_with_indices.default" in targets
    # eager fastsal after an export: still 1 bit per ReLU element, packed in uint8
    x = torch.randn(2, 3, 8, 8)
    saved = _saved(lambda t: ops.relu(t, "guided"), x)
    assert saved == [(torch.uint8, x.numel() // 8)]
    # the export-mode op (called directly, as torch.export does) keeps a bool mask
    saved = _saved(lambda t: _export_ops.relu(t, Rule.GUIDED.code), x)
    assert saved == [(torch.bool, x.numel())]


@pytest.mark.parametrize("stride,padding,dilation,groups", [
    (1, 1, 1, 1), (1, 0, 1, 1), (1, 2, 2, 2), (1, (0, 1), 1, 4), (2, 1, 1, 1), (2, 3, 1, 2), (3, 0, 2, 1),
])
def test_conv_export_mode_equals_eager(stride, padding, dilation, groups):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 4, 11, 10, generator=g, dtype=torch.float64)
    weight = torch.randn(8, 4 // groups, 3, 3, generator=g, dtype=torch.float64)
    bias = torch.randn(8, generator=g, dtype=torch.float64)
    p = padding if isinstance(padding, tuple) else (padding, padding)
    s, d = (stride, stride), (dilation, dilation)
    out = ops.conv2d(x, weight, bias, s, p, d, groups)
    grad = torch.randn(out.shape, generator=g, dtype=torch.float64)
    out_e, g_e = _backward(lambda t: ops.conv2d(t, weight, bias, s, p, d, groups), x, grad)
    out_x, g_x = _backward(lambda t: _export_ops.conv2d(t, weight, bias, s, p, d, groups), x, grad)
    assert torch.equal(out_e, out_x)
    torch.testing.assert_close(g_x, g_e, rtol=1e-12, atol=1e-12)
