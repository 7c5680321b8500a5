"""fastsal.visualize_feature: Zeiler & Fergus projections against a hand computation and the reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from models import RULES, SMALL_MODELS, reference_rule, rel_l2

import fastsal


def _reference_projection(model, x, layer, channel, rule, seed):
    """Plain autograd with the per-call reference ReLUs: seed the layer's output by hand."""
    captured = {}
    handle = layer.register_forward_hook(lambda m, a, out: captured.setdefault("out", out))
    try:
        xr = x.clone().requires_grad_()
        with reference_rule(rule):
            model(xr)
            acts = captured["out"]
            keep = torch.zeros_like(acts)
            chan = acts[:, channel].detach()
            if seed == "map":
                keep[:, channel] = chan
            else:
                flat = chan.reshape(len(chan), -1)
                best = flat.argmax(1)
                one = torch.zeros_like(flat)
                one[torch.arange(len(flat)), best] = flat[torch.arange(len(flat)), best]
                keep[:, channel] = one.view_as(chan)
            (grad,) = torch.autograd.grad(acts, xr, grad_outputs=keep)
    finally:
        handle.remove()
    return grad


def test_hand_computed_max_projection():
    """One 2x2 all-ones conv and a ReLU: the strongest activation projects back as its value on its window."""
    conv = nn.Conv2d(1, 2, 2, bias=False)
    with torch.no_grad():
        conv.weight[0].fill_(1.0)
        conv.weight[1].fill_(-1.0)
    model = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), nn.Linear(18, 3))
    x = torch.zeros(1, 1, 4, 4)
    x[0, 0, 1:3, 2:4] = torch.tensor([[1.0, 2.0], [3.0, 4.0]])  # the window at (1, 2) sums to 10
    proj = fastsal.visualize_feature(model, x, "1", channel=0, seed="max")
    expected = torch.zeros_like(x)
    expected[0, 0, 1:3, 2:4] = 10.0
    assert torch.equal(proj, expected)
    # channel 1 (negated weights) never fires on this non-negative input: nothing to project
    assert torch.equal(fastsal.visualize_feature(model, x, model[1], channel=1), torch.zeros_like(x))


CASES = [
    ("relu->maxpool sequential (vgg-like)", "1", 3),  # a ReLU fused into the pool after it
    ("relu->maxpool sequential (vgg-like)", "2", 5),  # that pool
    ("relu->maxpool sequential (vgg-like)", "4", 0),
    ("conv+bn eval (sequential)", "0", 2),  # a conv with the BatchNorm after it folded in
    ("conv+bn eval (sequential)", "5", 7),
    ("conv+bn eval (resnet-style block)", None, 1),  # the last ReLU-producing module, found below
    ("functional[F.relu]", None, 0),
]


def _layer(model, name):
    if name is not None:
        return model.get_submodule(name)
    # the last module with a 4-D output
    found = {}
    hooks = [m.register_forward_hook(lambda m, a, o, n=n: found.__setitem__("name", n) if o.dim() == 4 else None)
             for n, m in model.named_modules() if n and not list(m.children())]
    return hooks, found


@pytest.mark.parametrize("seed", ["map", "max"])
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("model_name,layer_name,channel", CASES)
def test_equals_reference(model_name, layer_name, channel, rule, seed):
    model, shape = SMALL_MODELS[model_name]()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(7))
    if layer_name is None:
        hooks, found = _layer(model, None)
        model(x)
        for h in hooks:
            h.remove()
        layer_name = found["name"]
    layer = model.get_submodule(layer_name)
    got = fastsal.visualize_feature(model, x, layer_name, channel, method=rule, seed=seed)
    expected = _reference_projection(model, x, layer, channel, rule, seed)
    assert got.shape == x.shape
    assert float(expected.abs().max()) > 0, "a case with nothing to project tests nothing"
    assert rel_l2(got, expected) <= 1e-4
    by_module = fastsal.visualize_feature(model, x, layer, channel, method=rule, seed=seed)
    assert torch.equal(by_module, got)


class StopsEarly(nn.Module):
    """Its head raises: visualizing a feature before the head must not run it."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        x = self.body(x)
        raise RuntimeError("the head ran")


def test_forward_stops_at_the_layer():
    proj = fastsal.visualize_feature(StopsEarly(), torch.randn(1, 3, 8, 8), "body.1", channel=2)
    assert proj.shape == (1, 3, 8, 8)


def test_bad_input():
    model, shape = SMALL_MODELS["relu->maxpool sequential (vgg-like)"]()
    x = torch.randn(shape)
    with pytest.raises(ValueError, match="no layer named 'features.1'"):
        fastsal.visualize_feature(model, x, "features.1", 0)
    with pytest.raises(ValueError, match="did you mean '1'"):
        fastsal.visualize_feature(model, x, "1 ", 0)
    with pytest.raises(ValueError, match="not a submodule"):
        fastsal.visualize_feature(model, x, nn.ReLU(), 0)
    with pytest.raises(IndexError, match="channel 8 is out of range: layer '1' has 8 channels"):
        fastsal.visualize_feature(model, x, "1", 8)
    with pytest.raises(IndexError, match="channel -1 is out of range"):
        fastsal.visualize_feature(model, x, "1", -1)
    with pytest.raises(TypeError, match="channel must be an int"):
        fastsal.visualize_feature(model, x, "1", 1.0)
    with pytest.raises(ValueError, match="seed must be 'map' or 'max'"):
        fastsal.visualize_feature(model, x, "1", 0, seed="top")
    with pytest.raises(ValueError, match="unknown saliency rule"):
        fastsal.visualize_feature(model, x, "1", 0, method="occlusion")
    with pytest.raises(TypeError, match="floating-point"):
        fastsal.visualize_feature(model, x.to(torch.int32), "1", 0)
    with pytest.raises(IndexError, match="channel 10 is out of range: layer '9' has 10 channels"):
        fastsal.visualize_feature(model, x, "9", 10)  # the logits: their "channels" are the classes
