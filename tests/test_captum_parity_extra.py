"""Captum parity details, and the intended differences the README lists, checked against Captum."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fastsal

captum_attr = pytest.importorskip("captum.attr")

CLASSES = ("Saliency", "Deconvolution", "GuidedBackprop", "NeuronGradient", "NeuronDeconvolution", "NeuronGuidedBackprop")


class _Twice(nn.Module):
    """Calls one conv twice: which call does a neuron method see?"""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.fc = nn.Linear(3 * 6 * 6, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(torch.relu(self.conv(x)))).flatten(1))


def _make(module, name, model):
    cls = getattr(module, name)
    return cls(model, model.conv) if name.startswith("Neuron") else cls(model)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return _Twice().eval()


@pytest.mark.parametrize("name", CLASSES)
def test_attribute_future_is_not_implemented(model, name):
    ours = _make(fastsal, name, model)
    with pytest.raises(NotImplementedError, match=f"attribute_future is not implemented for {name}"):
        ours.attribute_future()
    theirs = _make(captum_attr, name, model)
    if name.startswith("Neuron"):
        assert not hasattr(theirs, "attribute_future")  # Captum 0.9's neuron classes lack it (README)
    else:
        with pytest.raises(NotImplementedError, match="attribute_future is not implemented"):
            theirs.attribute_future()


def test_a_layer_called_twice_is_captured_at_its_first_call(model):
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    xl = x.clone().requires_grad_(True)
    (first,) = torch.autograd.grad(model.conv(xl)[:, 0, 3, 3].sum(), xl)
    ours = fastsal.NeuronGradient(model, model.conv).attribute(x, (0, 3, 3))
    theirs = captum_attr.NeuronGradient(model, model.conv).attribute(x, (0, 3, 3))
    assert torch.allclose(ours, first, atol=1e-7)
    assert not torch.allclose(theirs, first, atol=1e-4)  # Captum keeps the last call's tensor


def test_device_ids_and_neuron_index(model):
    x = torch.randn(1, 3, 6, 6)
    captum_attr.NeuronGradient(model, model.conv, device_ids=[0])  # accepted by Captum (DataParallel)
    with pytest.raises(ValueError, match="device_ids"):
        fastsal.NeuronGradient(model, model.conv, device_ids=[0])
    for module in (captum_attr, fastsal):  # neither takes the old keyword
        with pytest.raises(TypeError, match="neuron_index"):
            module.NeuronGradient(model, model.conv).attribute(x, neuron_index=(0, 1, 1))


def test_value_errors_where_captum_asserts(model):
    x = torch.randn(2, 3, 6, 6)
    with pytest.raises(AssertionError):
        captum_attr.Saliency(model).attribute(x, target=[1, 2, 3])
    with pytest.raises(ValueError, match="3 entries but the batch has 2"):
        fastsal.Saliency(model).attribute(x, target=[1, 2, 3])
    with pytest.raises(AssertionError):
        captum_attr.Saliency(model).attribute(x)
    with pytest.raises(ValueError, match="target is None"):
        fastsal.Saliency(model).attribute(x)
