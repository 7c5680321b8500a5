"""TorchScript models: the gradient runs on them as they are (Captum's result); the other rules
refuse them with an error whose advice is checked here to be true."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from models import randomize_batch_norm, rel_l2

import fastsal


class _Net(nn.Module):
    """conv + BN, an in-place ReLU, max-pool, a functional ReLU on a skip, a linear head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True), nn.MaxPool2d(2))
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 5))

    def forward(self, x):
        y = self.stem(x)
        return self.head(F.relu(self.conv(y)) + y)


def _net():
    torch.manual_seed(0)
    return randomize_batch_norm(_Net()).eval()


def _x(n=3):
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(2))


def _scripted(kind, model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch >= 2.9 calls torch.jit deprecated
        if kind == "script":
            return torch.jit.script(model)
        return torch.jit.trace(model, _x(1))


@pytest.fixture(params=["script", "trace"])
def scripted(request):
    model = _net()
    return model, _scripted(request.param, model)


def test_saliency_class_equals_captum_on_the_same_scripted_model(scripted):
    captum_attr = pytest.importorskip("captum.attr")
    model, sm = scripted
    x = _x()
    for target, abs_ in ((3, True), ([0, 4, 2], False), (torch.tensor([1, 1, 0]), True)):
        ours = fastsal.Saliency(sm).attribute(x, target=target, abs=abs_)
        theirs = captum_attr.Saliency(sm).attribute(x, target=target, abs=abs_)
        assert rel_l2(ours, theirs) <= 1e-6
        # and the scripted model's gradient is the Python model's
        assert rel_l2(ours, fastsal.Saliency(model).attribute(x, target=target, abs=abs_)) <= 1e-5
    # NoiseTunnel wraps it too (SmoothGrad over the scripted model)
    nt = captum_attr.NoiseTunnel(fastsal.Saliency(sm))
    torch.manual_seed(5)
    ours = nt.attribute(x, nt_type="smoothgrad", nt_samples=3, stdevs=0.1, target=2)
    torch.manual_seed(5)
    theirs = captum_attr.NoiseTunnel(captum_attr.Saliency(sm)).attribute(
        x, nt_type="smoothgrad", nt_samples=3, stdevs=0.1, target=2
    )
    assert rel_l2(ours, theirs) <= 1e-6


def test_saliency_function_and_explainer_use_plain_autograd(scripted):
    model, sm = scripted
    x = _x()
    xl = x.clone().requires_grad_(True)
    logits = sm(xl)
    expected = torch.autograd.grad(logits.gather(1, logits.argmax(1, keepdim=True)).sum(), xl)[0]
    raw = fastsal.saliency(sm, x, method="gradient", reduce=None)
    assert rel_l2(raw, expected) <= 1e-6
    with torch.no_grad():
        result = fastsal.Explainer(sm, method="gradient").explain(x)
    assert rel_l2(result.maps, expected.abs().amax(1)) <= 1e-6
    assert torch.equal(result.targets, logits.argmax(1))
    # several targets from one forward work on it too
    top = fastsal.Explainer(sm, method="gradient", reduce=None).explain(x, top_k=2)
    for k in range(2):
        single = fastsal.saliency(sm, x, target=top.targets[:, k], method="gradient", reduce=None)
        assert rel_l2(top.maps[:, k], single) <= 1e-6
    # half precision: plain autocast (the weights of a scripted module cannot be swapped)
    half = fastsal.saliency(sm, x, method="gradient", reduce=None, dtype=torch.bfloat16)
    xh = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sm(xh)
    by_hand = torch.autograd.grad(out.gather(1, out.argmax(1, keepdim=True)).sum(), xh)[0]
    assert half.dtype == x.dtype and rel_l2(half, by_hand) <= 1e-6
    assert rel_l2(half, expected) <= 0.1  # bf16 has 8 bits of mantissa


@pytest.mark.parametrize("make", [
    lambda sm: fastsal.GuidedBackprop(sm),
    lambda sm: fastsal.Deconvolution(sm),
    lambda sm: fastsal.saliency(sm, _x()),  # guided by default
    lambda sm: fastsal.saliency(sm, _x(), method="deconvnet"),
    lambda sm: fastsal.Explainer(sm, method="guided"),
])
def test_other_rules_refuse_with_advice(scripted, make):
    _, sm = scripted
    with pytest.raises(TypeError) as info:
        make(sm)
    message = str(info.value)
    assert "TorchScript" in message
    assert "model.load_state_dict(scripted.state_dict())" in message
    assert "cannot be saved" in message and "method='gradient'" in message


def test_neuron_classes_refuse_scripted_models(scripted):
    _, sm = scripted
    for cls in (fastsal.NeuronGradient, fastsal.NeuronGuidedBackprop):
        with pytest.raises(TypeError, match="TorchScript.*load_state_dict"):
            cls(sm, sm.conv)


def test_the_advice_in_the_message_is_true(tmp_path):
    """What the refusal says: loading the scripted weights into the Python class works; the
    twin cannot be scripted, and a trace of it cannot be saved."""
    model = _net()
    sm = _scripted("script", model)
    x = _x()
    python_again = _Net().eval()
    python_again.load_state_dict(sm.state_dict())
    expected = fastsal.GuidedBackprop(model).attribute(x, target=1)
    assert torch.equal(fastsal.GuidedBackprop(python_again).attribute(x, target=1), expected)

    twin = fastsal.rewrite(model, "guided")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(Exception):
            torch.jit.script(twin)
        traced = torch.jit.trace(twin, _x(1).requires_grad_(True), check_trace=False)
        with pytest.raises(RuntimeError, match="Python function"):
            traced.save(str(tmp_path / "twin.pt"))
    with pytest.raises(TypeError, match="load_state_dict"):
        fastsal.rewrite(sm, "guided")


def test_python_model_with_a_scripted_submodule_still_works():
    """Only a TorchScript *root* takes the plain path; a scripted part of a Python model is
    left alone by the rewrite and reported (its ReLUs keep the ordinary gradient)."""
    model = _net()
    model.conv = _scripted("script", model.conv)
    x = _x()
    maps = fastsal.saliency(model, x, target=0, method="gradient", reduce=None)
    xl = x.clone().requires_grad_(True)
    model(xl)[:, 0].sum().backward()
    assert rel_l2(maps, xl.grad) <= 1e-5
