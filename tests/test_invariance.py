"""Input invariance (Kindermans et al. 2017, "The (Un)reliability of saliency methods").

Shift every input by a constant per channel and absorb the shift in the first layer's bias:
the network computes exactly the same function of the original image, so a method whose map
depends only on the function (and the shifted input's activations, which are unchanged) must
give the same map. Gradient, DeconvNet and Guided Backprop all pass; fastsal must too, through
every part of its rewrite (the first conv's rewrite, BN folding, the fused ReLU->max-pool,
functional ReLUs).

The first conv has ``padding=0``: every output pixel sees only real input pixels, so
``conv(x + s) = conv(x) + sum_{c,i,j} W[o, c, i, j] · s[c]`` holds everywhere and the
compensation ``b' = b - sum W · s`` is exact. (With zero padding the border pixels would see
the padding's zeros, which are not shifted, and the identity would fail there.)
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastsal

RULES = ("gradient", "deconvnet", "guided")
SHIFT = torch.tensor([0.7, -1.3, 2.1]).view(1, 3, 1, 1)


class ShiftNet(nn.Module):
    def __init__(self, batch_norm: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=0)
        self.bn1 = nn.BatchNorm2d(8) if batch_norm else nn.Identity()
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = self.pool(self.relu(self.bn1(self.conv1(x))))
        x = F.relu(self.conv2(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def _model(batch_norm: bool) -> nn.Module:
    torch.manual_seed(0)
    model = ShiftNet(batch_norm)
    if batch_norm:
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            model.bn1.running_mean.copy_(torch.randn(8, generator=g) * 0.3)
            model.bn1.running_var.copy_(torch.rand(8, generator=g) + 0.5)
            model.bn1.weight.copy_(torch.rand(8, generator=g) + 0.5)
            model.bn1.bias.copy_(torch.randn(8, generator=g) * 0.1)
    return model.eval()


def _compensated(model: nn.Module, shift: torch.Tensor) -> nn.Module:
    """A copy whose first conv's bias absorbs the input shift: ``b' = b - sum_{c,i,j} W · shift``."""
    shifted = copy.deepcopy(model)
    with torch.no_grad():
        w = shifted.conv1.weight.double()
        shifted.conv1.bias.copy_((shifted.conv1.bias.double() - (w * shift.double()).sum(dim=(1, 2, 3))).float())
    return shifted


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.mark.parametrize("batch_norm", [False, True], ids=["plain", "bn"])
def test_shift_compensated_in_the_first_bias_leaves_maps_unchanged(batch_norm):
    model = _model(batch_norm)
    shifted = _compensated(model, SHIFT)
    x = torch.randn(4, 3, 18, 18, generator=torch.Generator().manual_seed(2))
    xs = x + SHIFT
    with torch.no_grad():
        logits, logits_s = model(x), shifted(xs)
    assert _rel(logits_s, logits) < 1e-5
    target = logits.argmax(dim=1)
    for rule in RULES:
        raw = fastsal.saliency(model, x, target=target, method=rule, reduce=None)
        raw_s = fastsal.saliency(shifted, xs, target=target, method=rule, reduce=None)
        assert raw.abs().sum() > 0, rule
        assert _rel(raw_s, raw) < 1e-5, rule
        shown = fastsal.saliency(model, x, target=target, method=rule)  # max_c |g_c|
        shown_s = fastsal.saliency(shifted, xs, target=target, method=rule)
        assert _rel(shown_s, shown) < 1e-5, rule


def test_captum_classes_are_invariant_too():
    model = _model(batch_norm=True)
    shifted = _compensated(model, SHIFT)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    for cls in (fastsal.Saliency, fastsal.Deconvolution, fastsal.GuidedBackprop):
        a = cls(model).attribute(x, target=1)
        b = cls(shifted).attribute(x + SHIFT, target=1)
        assert _rel(b, a) < 1e-5, cls.__name__


def test_uncompensated_shift_changes_the_maps():
    # the control: without the bias compensation the same shift changes the gradient map
    model = _model(batch_norm=False)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    a = fastsal.saliency(model, x, target=0, method="gradient", reduce=None)
    b = fastsal.saliency(model, x + SHIFT, target=0, method="gradient", reduce=None)
    assert _rel(b, a) > 1e-3
