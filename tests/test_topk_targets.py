"""Several classes per sample from one forward: ``top_k=K`` or an ``(N, K)`` target.

The maps must equal K separate single-target explains (and Captum's K separate calls),
from one forward and K backward passes, with the same guarantees as single targets
(no_grad, inference tensors, chunks, threads) and clear errors for bad K or shapes.
"""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn as nn
from models import RULES, SMALL_MODELS, rel_l2

import fastsal

# models with every pattern the backward must retain correctly: fused relu+pool with
# overlapping windows, in-place ReLUs reused, a ReLU whose input feeds a skip, folded BN
MODELS = ("overlapping pools", "reused nn.ReLU(inplace=True)", "shared-input skip", "conv+bn eval (resnet-style block)")


def _model(name):
    model, shape = SMALL_MODELS[name]()
    x = torch.randn(3, *shape[1:], generator=torch.Generator().manual_seed(1))
    return model, x


def _assert_same(actual, expected):
    # the same forward and the same seeds: equal up to the order autograd sums in (exact on CPU here)
    assert actual.shape == expected.shape
    assert rel_l2(actual, expected) <= 1e-6, rel_l2(actual, expected)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("rule", RULES)
def test_top_k_equals_k_single_explains(name, rule):
    model, x = _model(name)
    explainer = fastsal.Explainer(model, method=rule)
    result = explainer.explain(x, top_k=3)
    assert result.targets.shape == (3, 3) and result.targets.dtype == torch.long
    assert result.maps.shape == (3, 3, *x.shape[2:])
    assert result.logits.shape == (3, 10)
    # the K largest logits, largest first
    assert torch.equal(result.targets, result.logits.topk(3, dim=1).indices)
    picked = result.logits.gather(1, result.targets)
    assert bool((picked[:, :-1] >= picked[:, 1:]).all())
    for k in range(3):
        single = explainer.explain(x, target=result.targets[:, k])
        _assert_same(result.maps[:, k], single.maps)
        assert torch.equal(single.logits, result.logits)


@pytest.mark.parametrize("reduce", [None, "abs", "l2", "max"])  # abs_sum, sum: the same path as l2, max
@pytest.mark.parametrize("rule", RULES)
def test_target_matrix_with_reductions(rule, reduce):
    model, x = _model("overlapping pools")
    # repeated and negative classes are allowed, as for single targets
    target = torch.tensor([[0, 9, -1], [4, 4, 2], [7, 1, 3]])
    explainer = fastsal.Explainer(model, method=rule, reduce=reduce)
    result = explainer.explain(x, target=target)
    assert torch.equal(result.targets, target % 10)
    for k in range(3):
        single = explainer.explain(x, target=target[:, k])
        _assert_same(result.maps[:, k], single.maps)
    # fastsal.saliency: the same maps, from the tensor or a list of lists
    maps = fastsal.saliency(model, x, target=target, method=rule, reduce=reduce)
    _assert_same(maps, result.maps)
    _assert_same(fastsal.saliency(model, x, target=target.tolist(), method=rule, reduce=reduce), result.maps)


@pytest.mark.parametrize("rule", RULES)
def test_saliency_top_k_equals_single_calls(rule):
    model, x = _model("reused nn.ReLU(inplace=True)")
    maps = fastsal.saliency(model, x, top_k=4, method=rule)
    assert maps.shape == (3, 4, *x.shape[2:])
    with torch.no_grad():
        top = model(x).topk(4, dim=1).indices
    for k in range(4):
        _assert_same(maps[:, k], fastsal.saliency(model, x, target=top[:, k], method=rule))
    # K = 1 keeps the K dimension
    assert fastsal.saliency(model, x, top_k=1, method=rule).shape == (3, 1, *x.shape[2:])


@pytest.mark.parametrize("rule", ["deconvnet", "guided"])
def test_matches_captum_k_separate_calls(rule):
    captum_attr = pytest.importorskip("captum.attr")
    model, x = _model("relu->maxpool sequential (vgg-like)")  # a model Captum gets right
    result = fastsal.Explainer(model, method=rule, reduce=None).explain(x, top_k=3)
    cls = captum_attr.GuidedBackprop if rule == "guided" else captum_attr.Deconvolution
    for k in range(3):
        expected = cls(model).attribute(x, target=result.targets[:, k].tolist())
        assert rel_l2(result.maps[:, k], expected) <= 1e-5


class _Counting(nn.Module):
    """Counts forward passes and backward passes through its input (class-level counters: the
    explainer runs a structural copy of the module)."""

    forwards = 0
    backwards = 0

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 5 * 5, 6))

    def forward(self, x):
        _Counting.forwards += 1
        x = x.view_as(x)
        if x.requires_grad:
            x.register_hook(_Counting._count_backward)
        return self.body(x)

    @staticmethod
    def _count_backward(grad):
        _Counting.backwards += 1


@pytest.mark.parametrize("rule", RULES)
def test_one_forward_and_k_backward_passes_under_no_grad(rule):
    torch.manual_seed(0)
    model = _Counting().eval()
    x = torch.randn(2, 3, 12, 12)
    explainer = fastsal.Explainer(model, method=rule)
    explainer.explain(x)  # the rewrite is made on the first call
    _Counting.forwards = _Counting.backwards = 0
    with torch.no_grad():
        result = explainer.explain(x, top_k=4)
    assert (_Counting.forwards, _Counting.backwards) == (1, 4)
    assert result.maps.shape == (2, 4, 12, 12) and not result.maps.requires_grad


def test_inference_mode_chunks_and_caller_untouched():
    model, x = _model("overlapping pools")
    target = torch.tensor([[1, 2], [3, 4], [5, 6]])
    whole = fastsal.Explainer(model, method="guided").explain(x, target=target)
    chunked = fastsal.Explainer(model, method="guided", batch_size=2)
    with torch.inference_mode():
        xi = x.clone()
        parts = chunked.explain(xi, target=target)
        top = chunked.explain(xi, top_k=2)
    _assert_same(parts.maps, whole.maps)
    assert torch.equal(parts.targets, target)
    assert torch.equal(top.targets, whole.logits.topk(2, dim=1).indices)
    assert xi.grad is None and not xi.requires_grad
    assert all(p.grad is None for p in model.parameters())
    _assert_same(fastsal.saliency(model, x, target=target, method="guided", batch_size=1), whole.maps)


def test_threads_share_one_explainer():
    model, x = _model("shared-input skip")
    explainer = fastsal.Explainer(model, method="guided")
    expected = explainer.explain(x, top_k=3).maps
    results, errors = [], []

    def work():
        try:
            for _ in range(3):
                results.append(explainer.explain(x, top_k=3).maps)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 9
    for maps in results:
        _assert_same(maps, expected)


def test_bad_k_and_shapes():
    model, x = _model("overlapping pools")  # 10 classes, 3 samples
    explainer = fastsal.Explainer(model)
    with pytest.raises(ValueError, match="at least 1"):
        explainer.explain(x, top_k=0)
    with pytest.raises(ValueError, match="at least 1"):
        fastsal.saliency(model, x, top_k=-2)
    with pytest.raises(ValueError, match="more than the model's 10 classes"):
        explainer.explain(x, top_k=11)
    with pytest.raises(ValueError, match="more than the model's 10 classes"):
        fastsal.saliency(model, x, top_k=11)
    with pytest.raises(TypeError, match="top_k must be an int"):
        explainer.explain(x, top_k=2.0)
    with pytest.raises(TypeError, match="top_k must be an int"):
        explainer.explain(x, top_k=True)
    with pytest.raises(ValueError, match="either target= or top_k="):
        explainer.explain(x, target=1, top_k=2)
    with pytest.raises(ValueError, match=r"shape \(4, 2\) but the batch has 3 samples"):
        explainer.explain(x, target=torch.zeros(4, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"shape \(2, 2\) but the batch has 3 samples"):
        fastsal.saliency(model, x, target=[[0, 1], [2, 3]])
    # a one-row target must not be spread over one-sample chunks
    with pytest.raises(ValueError, match=r"shape \(1, 2\) but the batch has 3 samples"):
        fastsal.Explainer(model, batch_size=1).explain(x, target=torch.zeros(1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="at least one class per sample"):
        explainer.explain(x, target=torch.zeros(3, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="same number of classes"):
        explainer.explain(x, target=[[0, 1], [2], [3, 4]])
    with pytest.raises(TypeError, match="integer class indices"):
        explainer.explain(x, target=torch.zeros(3, 2))
    with pytest.raises(IndexError, match="target 10 is out of range"):
        explainer.explain(x, target=torch.tensor([[0, 1], [2, 10], [3, 4]]))
    with pytest.raises(IndexError, match="target -11 is out of range"):
        fastsal.saliency(model, x, target=[[0, 1], [2, -11], [3, 4]])
    # several classes need (N, C) logits
    flat = nn.Sequential(nn.Conv2d(3, 2, 3))
    with pytest.raises(ValueError, match=r"logits of shape \(N, C\)"):
        fastsal.saliency(flat, x, top_k=2, method="gradient")
    with pytest.raises(ValueError, match=r"logits of shape \(N, C\)"):
        fastsal.saliency(flat, x, target=torch.zeros(3, 2, dtype=torch.long), method="gradient")


def test_bench_top_k_appends_rows(monkeypatch, tmp_path):
    pytest.importorskip("captum")
    from fastsal import cli
    from fastsal.bench import topk as bench_topk

    monkeypatch.setattr(bench_topk, "build_model", lambda name: _model("overlapping pools")[0])
    out = tmp_path / "topk.csv"
    args = ["bench", "--top-k", "3", "--model", "tiny", "--batch-size", "2", "--size", "25", "--repeats", "1",
            "--warmup", "0", "--out", str(out)]
    assert cli.main(args) == 0
    assert cli.main([*args, "--method", "deconvnet"]) == 0
    import csv

    with open(out) as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["engine"], r["method"]) for r in rows] == [
        ("inference", "-"), ("captum-k-calls", "guided"), ("fastsal-k-calls", "guided"), ("fastsal-topk", "guided"),
        ("inference", "-"), ("captum-k-calls", "deconvnet"), ("fastsal-k-calls", "deconvnet"),
        ("fastsal-topk", "deconvnet"),
    ]
    for r in rows:
        assert r["top_k"] == "3" and float(r["images_per_s"]) > 0 and r["card"] and r["load_before"] and r["date"]
    assert float(rows[1]["vs_captum_throughput"]) == 1.0
    with pytest.raises(SystemExit, match="at least 1"):
        cli.main([*args[:2], "0", *args[3:]])


def test_cuda_graph_path_captures_k_backward_passes(monkeypatch):
    """The CUDA-graph logic on CPU tensors (test_explainer's FakeCuda: capture runs the step
    eagerly, replay does nothing): one graph per target mode, K included, equal to eager."""
    from test_explainer import FakeCuda

    fake = FakeCuda(monkeypatch)
    model, x = _model("overlapping pools")
    eager = fastsal.Explainer(model, method="guided")
    graphed = fastsal.Explainer(model, method="guided", cuda_graph=True)
    fn = graphed._function()
    target = torch.tensor([[1, 2], [3, 4], [5, 6]])
    for _ in range(2):  # captured on the first call, replayed on the second
        top = graphed._explain_graph(fn, x, None, 3, False, 3)
        given = graphed._explain_graph(fn, x, target, 3, False)
        single = graphed._explain_graph(fn, x, None, 3, False)
    assert len(fake.of("capture")) == 3 and len(fake.of("replay")) == 6  # a capture is replayed at once
    want = eager.explain(x, top_k=3)
    assert torch.equal(top.targets, want.targets) and top.maps.shape == (3, 3, *x.shape[2:])
    _assert_same(top.maps, want.maps)
    # a fake replay recomputes nothing, so given targets are checked by where they go
    assert torch.equal(given.targets, target) and given.maps.shape == (3, 2, *x.shape[2:])
    shapes = [tuple(g.static_targets.shape) for g in graphed._graphs.values() if g.static_targets is not None]
    assert shapes == [(3, 2)]
    assert single.maps.shape == (3, *x.shape[2:])
