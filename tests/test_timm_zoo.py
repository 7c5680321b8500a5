"""fastsal.rewrite on the timm zoo, in float64, against the independent per-call reference.

Random weights (``pretrained=False``: nothing is downloaded), BatchNorm statistics measured on
random images and then perturbed (so folding is exercised on non-trivial statistics), small
inputs. Each model is built once and checked under the three rules. Run with ``-s`` to see
the errors.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import fastsal
from models import RULES, calibrate_batch_norm, input_grad, reference_input_grads, rel_l2

timm = pytest.importorskip("timm")

TOL = 1e-10  # float64 end to end: what is left is summation order (BatchNorm folded into the conv)

# name -> (input side, activations, {report kind: how many module sites must get the rule})
TIMM_ZOO = {
    "resnet50d": (64, "relu", {"nn.ReLU": 1}),
    "densenet121": (64, "relu", {"nn.ReLU": 1}),
    "inception_v3": (75, "relu", {"nn.ReLU": 1}),
    "regnety_008": (64, "relu", {"nn.ReLU": 1}),
    "dla34": (64, "relu", {"nn.ReLU": 1}),
    "hrnet_w18_small": (64, "relu", {"nn.ReLU": 1}),
    "repvgg_a2": (64, "relu", {"nn.ReLU": 1}),
    "dpn68": (64, "relu", {"nn.ReLU": 1}),
    "mobilenetv2_100": (64, "relu", {"nn.ReLU6": 35}),
    "cspresnet50": (64, "relu", {"nn.LeakyReLU": 51}),
    "efficientnet_b0": (64, "all", {"nn.SiLU": 49}),
    "mobilenetv3_large_100": (64, "all", {"nn.Hardswish": 21, "nn.ReLU": 19}),
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """float64 convolutions on a CPU run aten's slow path, one small parallel region per group:
    on a loaded machine two OpenMP threads then wait on each other for most of the time
    (mobilenetv2: 125 s instead of 6 s measured here at load 10). One thread is robust."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def timm_model(name: str, side: int, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, num_classes=10)
    g = torch.Generator().manual_seed(seed)
    calibrate_batch_norm(model, torch.randn(2, 3, side, side, generator=g), g)
    return model.double().eval()


def _rule_sites_by_kind(report) -> dict:
    out = {}
    for site in report.replaced:
        if site.rule_site:
            out[site.kind] = out.get(site.kind, 0) + 1
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", list(TIMM_ZOO))
def test_timm_model_matches_reference(name):
    side, activations, expected_sites = TIMM_ZOO[name]
    model = timm_model(name, side)
    x = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    target = [3, 7]
    expected = reference_input_grads(model, x, target=target, dtype=torch.float64, activations=activations)
    errors = {}
    for rule in RULES:
        twin = fastsal.rewrite(model, rule, activations=activations)
        errors[rule] = rel_l2(input_grad(twin, x, target), expected[rule])
        sites = _rule_sites_by_kind(twin.fastsal_report)
        for kind, n in expected_sites.items():
            assert sites.get(kind, 0) >= n, f"{name}: {kind} sites with the rule: {sites}\n{twin.fastsal_report}"
    print(f"\n{name:22s} " + "  ".join(f"{rule}: {err:.1e}" for rule, err in errors.items()))
    for rule, err in errors.items():
        assert err <= TOL, f"{name} / {rule}: relative L2 error {err:.2e} against the float64 reference"
    # the rules changed something: guided is not the plain gradient
    assert rel_l2(expected["guided"], expected["gradient"]) > 1e-3
    if name == "mobilenetv3_large_100":  # the squeeze-excitation gates get no rule, and say so
        assert twin.fastsal_report.activations_left().get("nn.Hardsigmoid", 0) >= 8


@pytest.mark.slow
def test_efficientnet_guided_without_activations_all_warns():
    """The user who asks for Guided Backprop on EfficientNet and would get plain gradients is told so."""
    side = 64
    model = timm_model("efficientnet_b0", side)
    twin = fastsal.rewrite(model, "guided")
    x = torch.randn(1, 3, side, side, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plain = input_grad(twin, x)
        input_grad(twin, x)  # once per rewrite, not per forward
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning) and "fastsal" in str(w.message)]
    assert len(messages) == 1, messages
    assert "49 x nn.SiLU" in messages[0] and "activations='all'" in messages[0]
    assert rel_l2(plain, input_grad(model, x)) < 1e-10  # indeed the plain gradient
