"""fastsal.Explainer: one forward and one backward, the model's own logits, any grad mode, threads."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn as nn
from models import SMALL_MODELS, rel_l2

import fastsal


class CountingNet(nn.Module):
    """A small classifier that counts its forward and backward passes (class-level counters,
    since the explainer runs a structural copy of the module)."""

    forwards = 0
    backwards = 0

    class _CountBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.view_as(x)

        @staticmethod
        def backward(ctx, grad):
            CountingNet.backwards += 1
            return grad

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 6))

    def forward(self, x):
        CountingNet.forwards += 1
        return self.head(self.features(self._CountBackward.apply(x)))


@pytest.fixture
def net():
    torch.manual_seed(0)
    model = CountingNet()
    with torch.no_grad():
        bn = model.features[1]
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 1.5)
    return model.eval()


def _x(n=4, side=16, seed=0):
    return torch.randn(n, 3, side, side, generator=torch.Generator().manual_seed(seed))


def test_explain_under_no_grad_one_forward_one_backward(net):
    x = _x()
    explainer = fastsal.Explainer(net, method="guided")
    explainer.explain(x)  # first call: the rewrite is made
    CountingNet.forwards = CountingNet.backwards = 0
    with torch.no_grad():
        result = explainer.explain(x)
    assert (CountingNet.forwards, CountingNet.backwards) == (1, 1)
    with torch.no_grad():
        logits = net(x)
    assert torch.allclose(result.logits, logits, rtol=1e-5, atol=1e-6)
    assert torch.equal(result.targets, logits.argmax(1)) and result.targets.dtype == torch.long
    expected = fastsal.saliency(net, x, target=logits.argmax(1), method="guided")
    assert result.maps.shape == (4, 16, 16)
    assert rel_l2(result.maps, expected) <= 1e-6
    assert not result.logits.requires_grad and not result.maps.requires_grad


def test_inference_mode_tensors_and_caller_tensors_untouched(net):
    with torch.inference_mode():
        xi = _x()
        inside = fastsal.Explainer(net, method="deconvnet").explain(xi)
    outside = fastsal.Explainer(net, method="deconvnet").explain(xi)
    assert torch.equal(inside.maps, outside.maps) and torch.equal(inside.targets, outside.targets)
    x = _x().requires_grad_()
    fastsal.Explainer(net).explain(x)
    assert x.grad is None and x.requires_grad
    assert all(p.grad is None for p in net.parameters())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in net.modules())


@pytest.mark.parametrize("target", [2, [0, 1, 2, 3], torch.tensor([5, 4, 3, 2])])
def test_given_targets(net, target):
    x = _x()
    result = fastsal.Explainer(net, method="gradient", reduce=None).explain(x, target=target)
    want = torch.as_tensor(target).expand(4) if not isinstance(target, list) else torch.tensor(target)
    assert torch.equal(result.targets, want)
    expected = fastsal.saliency(net, x, target=target, method="gradient", reduce=None)
    assert rel_l2(result.maps, expected) <= 1e-6


def test_chunks_and_reduce(net):
    x = _x(n=5)
    whole = fastsal.Explainer(net, reduce="l2").explain(x, target=[0, 1, 2, 3, 4])
    chunked = fastsal.Explainer(net, reduce="l2", batch_size=2).explain(x, target=[0, 1, 2, 3, 4])
    assert torch.allclose(whole.maps, chunked.maps, rtol=1e-6, atol=1e-8)
    assert torch.allclose(whole.logits, chunked.logits, rtol=1e-6, atol=1e-6)
    assert torch.equal(whole.targets, chunked.targets) and len(chunked) == 5


def test_threads_with_two_rules_on_one_model(net):
    explainers = {rule: fastsal.Explainer(net, method=rule) for rule in ("guided", "deconvnet")}
    inputs = [_x(n=2, seed=s) for s in range(6)]
    expected = {(r, i): e.explain(x).maps for r, e in explainers.items() for i, x in enumerate(inputs)}
    results, errors = {}, []

    def work(rule, indices):
        try:
            for _ in range(3):
                for i in indices:
                    results[(rule, i)] = explainers[rule].explain(inputs[i]).maps
        except Exception as err:  # surfaced below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(rule, part)) for rule in explainers for part in ([0, 2, 4], [1, 3, 5])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert all(torch.equal(results[k], v) for k, v in expected.items())
    assert not torch.equal(expected[("guided", 0)], expected[("deconvnet", 0)])


def test_half_precision_and_channels_last(net):
    x = _x()
    full = fastsal.Explainer(net, reduce=None).explain(x, target=1)
    bf16 = fastsal.Explainer(net, reduce=None, dtype=torch.bfloat16).explain(x, target=1)
    assert bf16.maps.dtype == torch.float32 and rel_l2(bf16.maps, full.maps) <= 2e-2
    cl = fastsal.Explainer(net, reduce=None, channels_last=True).explain(x, target=1)
    assert rel_l2(cl.maps, full.maps) <= 1e-5


def test_compile_option_matches_eager():
    model, shape = SMALL_MODELS["conv+bn eval (resnet-style block)"]()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    eager = fastsal.Explainer(model).explain(x)
    # aot_eager traces forward and backward through fastsal's ops without needing a C++ compiler
    compiled = fastsal.Explainer(model, compile={"backend": "aot_eager", "fullgraph": True}).explain(x)
    assert torch.equal(compiled.targets, eager.targets)
    assert rel_l2(compiled.maps, eager.maps) <= 1e-5


def test_cuda_graph_flag_on_cpu_runs_eagerly(net):
    x = _x()
    with pytest.warns(RuntimeWarning, match="CPU inputs"):
        result = fastsal.Explainer(net, cuda_graph=True).explain(x)
    assert torch.equal(result.maps, fastsal.Explainer(net).explain(x).maps)


def test_bad_input(net):
    x = _x()
    explainer = fastsal.Explainer(net)
    with pytest.raises(IndexError, match="target 6 is out of range .* 6 classes"):
        explainer.explain(x, target=6)
    with pytest.raises(ValueError, match="3 entries but the batch has 4 samples"):
        explainer.explain(x, target=[0, 1, 2])
    with pytest.raises(TypeError, match="floating-point"):
        explainer.explain((x * 255).to(torch.uint8))
    bad = x.clone()
    bad[0, 0, 0, 0] = float("-inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        explainer.explain(bad)
    with pytest.raises(ValueError, match="unknown saliency rule"):
        fastsal.Explainer(net, method="smoothgrad")
    with pytest.raises(ValueError, match="unknown reduce"):
        fastsal.Explainer(net, reduce="median")
    with pytest.raises(ValueError, match=r"logits of shape \(N, C\)"):
        fastsal.Explainer(nn.Conv2d(3, 2, 3)).explain(x)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_cuda_graph_replay_equals_eager(net, dtype):
    model = net.cuda()
    eager = fastsal.Explainer(model, dtype=dtype)
    graphed = fastsal.Explainer(model, dtype=dtype, cuda_graph=True)
    for seed in range(3):  # capture on the first call, replay after
        x = _x(n=8, seed=seed).cuda()
        for target in (None, [seed] * 8):
            want, got = eager.explain(x, target), graphed.explain(x, target)
            assert torch.equal(got.targets, want.targets)
            assert rel_l2(got.maps.float(), want.maps.float()) <= (1e-5 if dtype is None else 2e-2)
    assert len(graphed._graphs) == 2  # one per target mode, reused across calls


def test_model_changed_after_the_explainer_was_made(net):
    x = _x()
    explainer = fastsal.Explainer(net, reduce=None)
    before = explainer.explain(x, target=0)
    net.double()  # param.data replaced: the same Parameter objects, new storage and dtype
    after = explainer.explain(x.double(), target=0)
    assert after.maps.dtype == torch.float64
    assert rel_l2(after.maps, before.maps) <= 1e-5
    net.float()
    with torch.no_grad():
        net.head[2].weight.mul_(2.0)  # in place, as an optimizer step would
    again = explainer.explain(x, target=0)
    assert rel_l2(again.maps, 2.0 * before.maps) <= 1e-5
