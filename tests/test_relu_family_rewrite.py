"""fastsal.rewrite at the rest of the ReLU family (ReLU6, Hardtanh(0, m), LeakyReLU, module and
functional forms, in place or not) and, with ``activations="all"``, at smooth activations:
against the independent per-call reference in float64, plus the report, the warning when no
site gets the rule, the memory each site keeps and bad input."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastsal
from fastsal import modules as fm
from fastsal._pass import TwinCache
from models import RULES, input_grad, reference_input_grads, rel_l2

TOL = 1e-12  # float64


def _x(shape=(2, 3, 12, 12), seed=1):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


class ActNet(nn.Module):
    """conv → act → conv → act → mean → linear; ``act`` a module or a function of x."""

    def __init__(self, act):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.act = act
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)
        with torch.no_grad():  # pre-activations spread over (-8, 8): ReLU6's upper clip is reached
            self.conv1.weight.mul_(6.0)

    def forward(self, x):
        x = self.act(self.conv1(x))
        x = self.act(self.conv2(x) * 3.0)
        return self.fc(x.mean((2, 3)))


def _check_against_reference(model, activations="relu", x=None):
    model = model.double().eval()
    x = _x() if x is None else x
    expected = reference_input_grads(model, x, target=[1, 4], activations=activations)
    plain = input_grad(model, x, [1, 4])
    twins = {}
    for rule in RULES:
        twin = fastsal.rewrite(model, rule, activations=activations)
        with torch.no_grad():
            assert torch.equal(twin(x), model(x)), "the forward changed"
        err = rel_l2(input_grad(twin, x, [1, 4]), expected[rule])
        assert err <= TOL, f"{rule}: relative L2 error {err:.2e}"
        twins[rule] = twin
    assert rel_l2(expected["guided"], plain) > 1e-3, "the rules changed nothing: a weak test"
    return twins


# ----- the ReLU family: module forms ----------------------------------------------------------------------

MODULES = {
    "nn.ReLU6": (lambda: nn.ReLU6(), fm.SaliencyClippedReLU),
    "nn.ReLU6(inplace=True)": (lambda: nn.ReLU6(inplace=True), fm.SaliencyClippedReLU),
    "nn.Hardtanh(0, 3)": (lambda: nn.Hardtanh(0.0, 3.0), fm.SaliencyClippedReLU),
    "nn.Hardtanh(0, 2.5, inplace=True)": (lambda: nn.Hardtanh(0, 2.5, inplace=True), fm.SaliencyClippedReLU),
    "nn.LeakyReLU": (lambda: nn.LeakyReLU(), fm.SaliencyLeakyReLU),
    "nn.LeakyReLU(0.2, inplace=True)": (lambda: nn.LeakyReLU(0.2, inplace=True), fm.SaliencyLeakyReLU),
    "nn.LeakyReLU(-0.3)": (lambda: nn.LeakyReLU(-0.3), fm.SaliencyLeakyReLU),
}


@pytest.mark.parametrize("name", list(MODULES))
def test_relu_family_modules_match_reference(name):
    make, replacement = MODULES[name]
    model = ActNet(make())
    twins = _check_against_reference(model)
    twin = twins["guided"]
    assert isinstance(twin.act, replacement)
    assert twin.act.inplace == model.act.inplace
    report = twin.fastsal_report
    assert report.rule_sites() == 1 and report.relu_sites() == 1
    assert report.replaced_counts.get(f"nn.{type(model.act).__name__} -> fastsal "
                                      f"{'leaky_relu' if 'Leaky' in name else 'clipped_relu'} (guided)") == 1, str(report)
    assert type(model.act) is not replacement  # the user's model is untouched


# ----- the ReLU family: functional forms -------------------------------------------------------------------

FUNCTIONS = {
    "F.relu6": (lambda x: F.relu6(x), "F.relu6"),
    "F.relu6(inplace=True)": (lambda x: F.relu6(x, inplace=True), "F.relu6"),
    "F.hardtanh(0, 4)": (lambda x: F.hardtanh(x, 0.0, 4.0), "F.hardtanh"),
    "F.hardtanh(min_val=0, max_val=4, inplace=True)": (lambda x: F.hardtanh(x, min_val=0, max_val=4, inplace=True), "F.hardtanh"),
    "F.hardtanh_(0, 4)": (lambda x: F.hardtanh_(x, 0.0, 4.0), "F.hardtanh_"),
    "F.leaky_relu": (lambda x: F.leaky_relu(x), "F.leaky_relu"),
    "F.leaky_relu(0.1, inplace=True)": (lambda x: F.leaky_relu(x, 0.1, inplace=True), "F.leaky_relu"),
    "F.leaky_relu_(0.1)": (lambda x: F.leaky_relu_(x, 0.1), "F.leaky_relu_"),
    "F.leaky_relu(negative_slope=0.3)": (lambda x: F.leaky_relu(x, negative_slope=0.3), "F.leaky_relu"),
}


class FunctionalNet(ActNet):
    def __init__(self, fn):
        super().__init__(None)
        self.fn = fn

    def forward(self, x):
        x = self.fn(self.conv1(x))
        x = self.fn(self.conv2(x) * 3.0)
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("form", list(FUNCTIONS))
def test_relu_family_functional_forms_match_reference(form):
    fn, kind = FUNCTIONS[form]
    twins = _check_against_reference(FunctionalNet(fn))
    report = twins["deconvnet"].fastsal_report
    sites = [s for s in report.replaced if s.kind == kind]
    assert len(sites) == 1 and sites[0].rule_site and "(deconvnet)" in sites[0].action, str(report)
    assert "2 calls per forward" in str(report)


def test_hardtanh_with_another_lower_bound_is_left_alone_and_reported():
    class Net(ActNet):
        def forward(self, x):
            x = self.act(self.conv1(x))  # nn.Hardtanh(-1, 1)
            x = F.hardtanh(self.conv2(x), -0.5, 2.0)
            return self.fc(F.relu(x).mean((2, 3)))

    model = Net(nn.Hardtanh()).double().eval()
    x = _x()
    twin = fastsal.rewrite(model, "guided")
    expected = reference_input_grads(model, x, rules=("guided",))["guided"]  # only the F.relu gets the rule
    assert rel_l2(input_grad(twin, x), expected) <= TOL
    report = twin.fastsal_report
    assert report.activations_left() == {"nn.Hardtanh": 1, "F.hardtanh": 1}
    assert "not ReLU-like" in str(report) and "min_val=-1" in str(report) and "min_val=-0.5" in str(report)
    assert isinstance(twin.act, nn.Hardtanh) and not isinstance(twin.act, fm.SaliencyClippedReLU)
    assert report.relu_like_left() == []  # not ReLU-like, so strict does not refuse it
    fastsal.rewrite(model, "guided", strict=True)


def test_clipped_relu_before_max_pool_is_not_fused_and_exact_at_ties():
    """relu6 → max-pool is not fused: the clip makes ties at 6, where a fused pool would pick another
    switch than the pool after the clip does. DeconvNet passes R through whatever switch is picked."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU6(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 36, 5))
    with torch.no_grad():
        model[0].weight.mul_(20.0)  # most windows hold several values above 6: ties after the clip
    model = model.double().eval()
    x = _x()
    with torch.no_grad():
        assert (model[1](model[0](x)) == 6).float().mean() > 0.2
    twins = _check_against_reference(model)
    assert isinstance(twins["deconvnet"][1], fm.SaliencyClippedReLU)
    assert type(twins["deconvnet"][2]) is fm.SaliencyMaxPool2d


def test_leaky_relu_before_max_pool_is_not_fused():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.LeakyReLU(0.1), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 36, 5))
    twins = _check_against_reference(model)
    assert isinstance(twins["guided"][1], fm.SaliencyLeakyReLU) and type(twins["guided"][2]) is fm.SaliencyMaxPool2d


# ----- smooth activations, opt in -------------------------------------------------------------------------

SMOOTH_MODULES = {
    "nn.SiLU": lambda: nn.SiLU(),
    "nn.SiLU(inplace=True)": lambda: nn.SiLU(inplace=True),
    "nn.GELU": lambda: nn.GELU(),
    "nn.GELU(tanh)": lambda: nn.GELU(approximate="tanh"),
    "nn.Hardswish(inplace=True)": lambda: nn.Hardswish(inplace=True),
    "nn.Mish": lambda: nn.Mish(),
    "nn.ELU(0.5, inplace=True)": lambda: nn.ELU(0.5, inplace=True),
    "nn.CELU(0.7)": lambda: nn.CELU(0.7),
    "nn.SELU": lambda: nn.SELU(),
    "nn.Softplus(2, 5)": lambda: nn.Softplus(2.0, 5.0),
}


@pytest.mark.parametrize("name", list(SMOOTH_MODULES))
def test_smooth_modules_with_activations_all_match_reference(name):
    model = ActNet(SMOOTH_MODULES[name]())
    twins = _check_against_reference(model, activations="all")
    twin = twins["guided"]
    assert isinstance(twin.act, fm.SaliencyActivation) and twin.fastsal_report.rule_sites() == 1
    # gradient under "all" is the ordinary derivative: plain autograd
    x = _x()
    plain = input_grad(model, x, [1, 4])
    assert rel_l2(input_grad(twins["gradient"], x, [1, 4]), plain) <= TOL
    # and by default the activation is left alone: every rule gives the plain gradient
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        default = fastsal.rewrite(model, "guided")
        assert rel_l2(input_grad(default, x, [1, 4]), plain) <= TOL
    assert type(default.act) is type(model.act)
    assert "given the rule only with activations='all'" in str(default.fastsal_report)


SMOOTH_FUNCTIONS = {
    "F.silu": lambda x: F.silu(x),
    "F.silu(inplace=True)": lambda x: F.silu(x, inplace=True),
    "F.gelu(approximate='tanh')": lambda x: F.gelu(x, approximate="tanh"),
    "F.hardswish": lambda x: F.hardswish(x),
    "F.mish(inplace=True)": lambda x: F.mish(x, inplace=True),
    "F.elu_(0.8)": lambda x: F.elu_(x, 0.8),
    "F.celu(alpha=0.5)": lambda x: F.celu(x, alpha=0.5),
    "torch.selu_": lambda x: torch.selu_(x),
    "F.softplus(beta=2)": lambda x: F.softplus(x, beta=2),
}


@pytest.mark.parametrize("form", list(SMOOTH_FUNCTIONS))
def test_smooth_functional_forms_with_activations_all_match_reference(form):
    twins = _check_against_reference(FunctionalNet(SMOOTH_FUNCTIONS[form]), activations="all")
    report = twins["guided"].fastsal_report
    assert report.rule_sites() == 1 and "(guided)" in [s for s in report.replaced if s.rule_site][0].action


def test_gates_get_no_rule_even_with_activations_all():
    class SE(nn.Module):  # conv → SiLU → squeeze-excitation gate (sigmoid) → head
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.act = nn.SiLU()
            self.gate = nn.Sigmoid()
            self.fc = nn.Linear(8, 5)

        def forward(self, x):
            x = self.act(self.conv(x))
            x = x * self.gate(x.mean((2, 3), keepdim=True)) * torch.tanh(x)
            return self.fc(x.mean((2, 3)))

    torch.manual_seed(0)
    model = SE().double().eval()
    twins = _check_against_reference(model, activations="all")
    left = twins["guided"].fastsal_report.activations_left()
    assert left == {"nn.Sigmoid": 1, "torch.tanh": 1}, left


# ----- the warning when no site gets the rule -------------------------------------------------------------


def _fastsal_warnings(caught):
    return [str(w.message) for w in caught if issubclass(w.category, UserWarning) and "fastsal.rewrite" in str(w.message)]


def test_warning_when_no_site_gets_the_rule_once_per_rewrite():
    model = ActNet(nn.SiLU()).double().eval()
    x = _x()
    twin = fastsal.rewrite(model, "guided")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            twin(x)  # no autograd: functional sites unknown, nothing said yet
        assert _fastsal_warnings(caught) == []
        input_grad(twin, x)
        input_grad(twin, x)
    (message,) = _fastsal_warnings(caught)
    assert "ActNet" in message and "'guided'" in message and "plain gradients" in message
    assert "1 x nn.SiLU" in message and "activations='all'" in message
    (where,) = [w.filename for w in caught if "fastsal.rewrite" in str(w.message)]
    assert where.endswith("models.py")  # the line that called the model (input_grad's), not fastsal's or torch's

    # a second rewrite warns again; the gradient rule, activations="all" or a ReLU somewhere do not
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        input_grad(fastsal.rewrite(model, "deconvnet"), x)
        input_grad(fastsal.rewrite(model, "gradient"), x)
        input_grad(fastsal.rewrite(model, "guided", activations="all"), x)
        input_grad(fastsal.rewrite(nn.Sequential(nn.Conv2d(3, 4, 3), nn.SiLU(), nn.ReLU(), nn.Flatten()).double(), "guided"), x)
    (message,) = _fastsal_warnings(caught)
    assert "'deconvnet'" in message


def test_warning_names_functional_sites_and_says_when_nothing_was_found():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        input_grad(fastsal.rewrite(FunctionalNet(F.gelu).double().eval(), "guided"), _x())
        input_grad(fastsal.rewrite(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten()).double(), "guided"), _x())
        input_grad(fastsal.rewrite(ActNet(nn.Tanh()).double().eval(), "guided"), _x())
    gelu, nothing, tanh = _fastsal_warnings(caught)
    assert "2 x F.gelu left as is" in gelu  # two call sites (two lines) and "activations='all'" in gelu
    assert "no ReLU or other activation found" in nothing
    assert "1 x nn.Tanh left as is" in tanh and "activations='all'" not in tanh  # a gate: "all" would not help


# ----- memory: 1 bit per element for the ReLU family, the input for smooth activations ------------------


def _saved_bytes(fn, x):
    kept = {}

    def pack(t):
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(x)
        total = sum(v for k, v in kept.items() if k != x.untyped_storage().data_ptr())
    del out
    return total


@pytest.mark.parametrize("act, activations, per_element", [
    (nn.ReLU6(), "relu", 1 / 8), (nn.Hardtanh(0, 2), "relu", 1 / 8), (nn.LeakyReLU(0.1), "relu", 1 / 8),
    (nn.ReLU6(inplace=True), "relu", 1 / 8), (nn.SiLU(), "all", 4), (nn.GELU(), "all", 4), (nn.SiLU(inplace=True), "all", 4),
])
def test_what_each_site_keeps(act, activations, per_element):
    twin = fastsal.rewrite(nn.Sequential(act), "guided", activations=activations)
    x = torch.randn(4, 16, 32, 32)  # float32
    n = x.numel()
    kept = _saved_bytes(lambda t: twin(t * 1.0), x.requires_grad_(True))
    assert abs(kept - per_element * n) <= 64, f"{kept} bytes kept for {n} elements"
    # DeconvNet keeps nothing
    deconv = fastsal.rewrite(nn.Sequential(act), "deconvnet", activations=activations)
    assert _saved_bytes(lambda t: deconv(t * 1.0), x) == 0


# ----- bad input, the cache ---------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["smooth", "ALL ", None, 3, ["relu"]])
def test_activations_is_validated(bad):
    model = ActNet(nn.ReLU())
    if bad == "ALL ":
        assert fastsal.rewrite(model, "guided", activations=bad).fastsal_report.activations == "all"
        return
    with pytest.raises(ValueError, match=r"activations must be 'relu' .* or 'all'"):
        fastsal.rewrite(model, "guided", activations=bad)


def test_user_model_is_not_modified():
    model = ActNet(nn.SiLU(inplace=True)).double().eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    twin = fastsal.rewrite(model, "guided", activations="all")
    input_grad(twin, _x())
    assert type(model.act) is nn.SiLU and model.act.inplace
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_twin_cache_keeps_one_twin_per_rule_and_activations():
    model = ActNet(nn.SiLU()).eval()
    cache = TwinCache(model, activations="all")
    assert cache.get("guided").fastsal_report.activations == "all"
    relu_only = cache.get("guided", activations="relu")
    assert relu_only.fastsal_report.activations == "relu" and relu_only is not cache.get("guided")
    assert cache.get("guided", activations="relu") is relu_only
    with pytest.raises(ValueError, match="activations must be"):
        cache.get("guided", activations="smooth")


def test_public_apis_take_activations():
    model = ActNet(nn.SiLU()).double().eval()
    x = _x()
    expected = reference_input_grads(model, x, rules=("guided",), target=[1, 4], activations="all")["guided"]
    maps = fastsal.saliency(model, x, target=[1, 4], method="guided", reduce=None, activations="all")
    assert rel_l2(maps, expected) <= TOL
    attr = fastsal.GuidedBackprop(model, activations="all").attribute(x, target=[1, 4])
    assert rel_l2(attr, expected) <= TOL
    r = fastsal.Explainer(model, "guided", reduce=None, activations="all").explain(x, target=[1, 4])
    assert rel_l2(r.maps, expected) <= TOL
    with pytest.raises(ValueError, match="activations must be"):
        fastsal.Explainer(model, "guided", activations="smooth")
    with pytest.raises(ValueError, match="activations must be"):
        fastsal.Deconvolution(model, activations="every")


@pytest.mark.slow
def test_torch_compile_fullgraph_through_the_new_sites():
    """ReLU6, LeakyReLU, hardtanh(0, m) and smooth activations (in place too) compile as one graph."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.silu, self.relu6, self.leaky = nn.SiLU(inplace=True), nn.ReLU6(), nn.LeakyReLU(0.1)

        def forward(self, x):
            x = F.gelu(self.silu(self.conv(x)))
            x = F.hardtanh(self.leaky(self.relu6(x * 4.0)), 0.0, 3.0)
            return x.mean((1, 2, 3))

    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(2, 3, 8, 8)
    twin = fastsal.rewrite(model, "guided", activations="all")
    compiled = torch.compile(twin, fullgraph=True, backend="aot_eager")
    eager = input_grad(twin, x, None)
    assert rel_l2(input_grad(compiled, x, None), eager) <= 1e-6
    assert rel_l2(eager, reference_input_grads(model, x, rules=("guided",), target=None, activations="all")["guided"]) <= 1e-5
