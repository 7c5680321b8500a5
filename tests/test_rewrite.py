"""fastsal.rewrite: equivalence with the per-call reference, the report, filter_fn, bad input,
the untouched original, threads and torch.compile. The zoo and the memory check are in
test_rewrite_zoo.py."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastsal
from fastsal import modules as fm
from models import (
    CAPTUM_SAFE,
    RULES,
    SMALL_MODELS,
    FunctionalReLUNet,
    ReferenceReLU,
    input_grad,
    reference_input_grads,
    rel_l2,
)

TOL = 1e-4


def _input(shape, seed=1):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# ----- equivalence on the small models -----------------------------------------------------------------


@pytest.mark.parametrize("name", list(SMALL_MODELS))
def test_small_models_match_reference(name):
    model, shape = SMALL_MODELS[name]()
    x = _input(shape)
    expected = reference_input_grads(model, x)
    plain = input_grad(model, x)
    for rule in RULES:
        twin = fastsal.rewrite(model, rule)
        with torch.no_grad():
            assert rel_l2(twin(x), model(x)) <= 1e-5, "the forward changed"
        err = rel_l2(input_grad(twin, x), expected[rule])
        assert err <= TOL, f"{name} / {rule}: relative L2 error {err:.2e}"
    if name != "no relu":  # the rules must actually have changed something
        assert rel_l2(plain, expected["guided"]) > 1e-2


@pytest.mark.parametrize("name", CAPTUM_SAFE)
def test_matches_captum_where_captum_is_right(name):
    captum_attr = pytest.importorskip("captum.attr")
    model, shape = SMALL_MODELS[name]()
    x = _input(shape)
    for rule, method in (("guided", captum_attr.GuidedBackprop), ("deconvnet", captum_attr.Deconvolution)):
        theirs = method(model).attribute(x.clone().requires_grad_(True), target=0)
        ours = input_grad(fastsal.rewrite(model, rule), x)
        assert rel_l2(ours, theirs) <= TOL, f"{name} / {rule}"


def test_shared_input_skip_is_right_where_captum_is_not():
    captum_attr = pytest.importorskip("captum.attr")
    model, shape = SMALL_MODELS["shared-input skip"]()
    x = _input(shape)
    expected = reference_input_grads(model, x, rules=("guided",))["guided"]
    ours = input_grad(fastsal.rewrite(model, "guided"), x)
    theirs = captum_attr.GuidedBackprop(model).attribute(x.clone().requires_grad_(True), target=0)
    assert rel_l2(ours, expected) <= TOL
    assert rel_l2(theirs, expected) > 1e-2  # the known Captum bug this case exists for


@pytest.mark.parametrize("form", ["F.relu", "F.relu_", "F.relu(inplace=True)", "torch.relu", "torch.relu_",
                                  "Tensor.relu", "Tensor.relu_", "aten.relu"])
def test_every_functional_form_is_reported(form):
    torch.manual_seed(0)
    model = FunctionalReLUNet(form).eval()
    twin = fastsal.rewrite(model, "guided")
    input_grad(twin, _input((1, 3, 16, 16)))
    report = twin.fastsal_report
    kinds = {s.kind for s in report.replaced}
    expected_kind = {"F.relu(inplace=True)": "F.relu", "F.relu_": "torch.relu_"}.get(form, form)
    assert expected_kind in kinds, str(report)
    assert report.relu_sites() == 1  # one line of code (the form's lambda in models.py), called twice
    assert "2 calls per forward" in str(report)
    assert "F.max_pool2d" in kinds


# ----- what the twin is made of ------------------------------------------------------------------------


def test_module_swaps_fusion_and_folding():
    model, _ = SMALL_MODELS["relu->maxpool sequential (vgg-like)"]()
    twin = fastsal.rewrite(model, "deconvnet")
    assert isinstance(twin[1], fm.FusedReLU) and isinstance(twin[2], fm.SaliencyReLUMaxPool2d)
    assert isinstance(twin[0], fm.SaliencyConv2d) and isinstance(twin[7], fm.SaliencyLinear)
    assert isinstance(twin[8], fm.SaliencyReLU)
    text = repr(twin)
    assert "SaliencyReLUMaxPool2d(relu rule=deconvnet" in text and "fused into 2" in text
    assert "fastsal: rule=deconvnet" in text

    model, _ = SMALL_MODELS["conv+bn eval (resnet-style block)"]()
    twin = fastsal.rewrite(model, "guided")
    assert isinstance(twin.bn1, fm.FoldedBatchNorm2d) and twin.conv1.folded_batch_norm == "bn1"
    assert isinstance(twin.bn2, fm.FoldedBatchNorm2d) and isinstance(twin.stem[1], fm.FoldedBatchNorm2d)

    model, _ = SMALL_MODELS["bn before relu (densenet-style)"]()
    twin = fastsal.rewrite(model, "guided")
    assert isinstance(twin.norm, fm.SaliencyBatchNorm2d)  # nothing to fold into: input-gradient-only affine


def test_report_lists_what_was_left_alone():
    model, shape = SMALL_MODELS["SiLU/GELU/ReLU6 and a ReLU"]()
    twin = fastsal.rewrite(model, "guided")
    text = str(twin.fastsal_report)
    assert "nn.SiLU [no rule]" in text and "nn.GELU [no rule]" in text
    assert "nn.ReLU6 -> fastsal clipped_relu (guided)" in text  # the ReLU family gets the rule (issue 11)
    assert twin.fastsal_report.relu_like_left() == []
    clamped = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Threshold(0.0, 0.0), nn.Flatten())
    with pytest.raises(ValueError, match=r"strict rewrite.*1 \(nn.Threshold\)"):
        fastsal.rewrite(clamped, "guided", strict=True)


def test_strict_checks_functional_relu_like_calls_as_they_run():
    class Clamped(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return torch.clamp(self.conv(x), min=0).sum((1, 2, 3))

    model = Clamped().eval()
    twin = fastsal.rewrite(model, "guided", strict=True)  # nothing visible before it runs
    x = _input((1, 3, 8, 8)).requires_grad_(True)
    with pytest.raises(RuntimeError, match="torch.clamp .* is ReLU-like"):
        twin(x)
    lenient = fastsal.rewrite(model, "guided")
    lenient(x)
    assert [s.kind for s in lenient.fastsal_report.relu_like_left()] == ["torch.clamp"]


def test_training_mode_keeps_batch_norm_and_says_so():
    model, shape = SMALL_MODELS["conv+bn eval (sequential)"]()
    model.train()
    twin = fastsal.rewrite(model, "guided")
    assert type(twin[1]) is nn.BatchNorm2d and twin[1].training
    text = str(twin.fastsal_report)
    assert "training mode" in text and "nn.BatchNorm2d [kept]" in text
    x = _input(shape)
    expected = reference_input_grads(model, x, rules=("guided",), dtype=torch.float32)["guided"]
    assert rel_l2(input_grad(twin, x), expected) <= TOL
    # a folded twin switched to training mode refuses to run rather than give wrong numbers
    folded = fastsal.rewrite(model.eval(), "guided").train()
    with pytest.raises(RuntimeError, match="folded"):
        folded(x)


def test_no_relu_model_works_and_report_says_so():
    model, shape = SMALL_MODELS["no relu"]()
    twin = fastsal.rewrite(model, "guided")
    x = _input(shape)
    assert rel_l2(input_grad(twin, x), input_grad(model, x)) <= 1e-6
    assert "no ReLU found" in str(twin.fastsal_report)


# ----- filter_fn ------------------------------------------------------------------------------------------


def test_filter_fn_restricts_module_and_functional_sites():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())
            self.b = nn.Sequential(nn.Conv2d(8, 8, 3), nn.ReLU())
            self.fc = nn.Linear(8, 5)

        def forward(self, x):
            x = F.relu(self.b(self.a(x)) - 0.1)  # functional site in the root
            return self.fc(x.mean((2, 3)))

    torch.manual_seed(0)
    model = Net().eval()
    calls = []

    def only_a(module, name):
        calls.append(name)
        return name.startswith("a")

    twin = fastsal.rewrite(model, "guided", filter_fn=only_a)
    assert "a.1" in calls and "" in calls
    assert isinstance(twin.a[1], fm.SaliencyReLU) and type(twin.b[1]) is nn.ReLU
    # the expected map: the rule on a's ReLU only; b's ReLU and the root's F.relu keep their gradient
    expected_model = copy.deepcopy(model)
    expected_model.a[1] = ReferenceReLU("guided")
    x = _input((1, 3, 12, 12))
    assert rel_l2(input_grad(twin, x), input_grad(expected_model, x)) <= TOL
    assert "filter_fn excluded it" in str(twin.fastsal_report)


# ----- the original model is untouched; parameters are shared ---------------------------------------------


def _snapshot(model: nn.Module):
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "tensors": {k: v for k, v in model.state_dict(keep_vars=True).items()},
        "types": [(n, type(m)) for n, m in model.named_modules()],
        "flags": [(n, m.training, getattr(m, "inplace", None)) for n, m in model.named_modules()],
        "hooks": [(n, dict(m._forward_hooks), dict(m._forward_pre_hooks), dict(m._backward_hooks))
                  for n, m in model.named_modules()],
        "requires_grad": [(n, p.requires_grad) for n, p in model.named_parameters()],
    }


@pytest.mark.parametrize("name", ["conv+bn eval (resnet-style block)", "relu->maxpool sequential (vgg-like)",
                                  "reused nn.ReLU(inplace=True)", "functional[Tensor.relu_]"])
def test_original_model_is_untouched(name):
    model, shape = SMALL_MODELS[name]()
    model.register_forward_hook(lambda m, i, o: None)
    list(model.modules())[-1].register_forward_pre_hook(lambda m, i: None)
    before = _snapshot(model)
    twin = fastsal.rewrite(model, "guided")
    input_grad(twin, _input(shape))
    twin.train()
    twin.register_forward_hook(lambda m, i, o: None)
    after = _snapshot(model)
    assert before["types"] == after["types"] and before["flags"] == after["flags"]
    assert before["hooks"] == after["hooks"] and before["requires_grad"] == after["requires_grad"]
    assert before["tensors"].keys() == after["tensors"].keys()
    assert all(before["tensors"][k] is after["tensors"][k] for k in before["tensors"])
    assert all(torch.equal(before["state"][k], after["state"][k]) for k in before["state"])
    assert all(p.grad is None for p in model.parameters())

    # the twin shares the storage of every parameter it did not fold
    storage = {p.data_ptr() for p in model.parameters()}
    for module in twin.modules():
        for pname, p in module.named_parameters(recurse=False):
            folded = isinstance(module, fm.SaliencyConv2d) and module.folded_batch_norm
            assert folded or p.data_ptr() in storage, pname


def test_twin_follows_in_place_weight_updates():
    model, shape = SMALL_MODELS["nn.ReLU"]()
    twin = fastsal.rewrite(model, "gradient")
    with torch.no_grad():
        model[0].weight.mul_(2.0)  # e.g. an optimizer step or load_state_dict on the user's model
    x = _input(shape)
    assert rel_l2(input_grad(twin, x), input_grad(model, x)) <= 1e-6


# ----- bad input ------------------------------------------------------------------------------------------


def test_bad_input_gives_clear_errors():
    with pytest.raises(TypeError, match="expects a torch.nn.Module"):
        fastsal.rewrite(lambda x: x, "guided")
    model, shape = SMALL_MODELS["nn.ReLU"]()
    with pytest.raises(ValueError, match="unknown saliency rule 'guidedd'"):
        fastsal.rewrite(model, "guidedd")
    with pytest.raises(TypeError, match="filter_fn must be callable"):
        fastsal.rewrite(model, "guided", filter_fn="features")
    with pytest.raises(TypeError, match="TorchScript"):
        fastsal.rewrite(torch.jit.script(model), "guided")
    twin = fastsal.rewrite(model, "guided")
    with pytest.raises(ValueError, match="already the output of fastsal.rewrite"):
        fastsal.rewrite(twin, "deconvnet")
    with pytest.raises(RuntimeError) as info:
        twin(torch.randn(1, 5, 24, 24))  # wrong channel count: the original fails too
    assert "fastsal-rewritten Sequential" in "".join(getattr(info.value, "__notes__", []))


def test_untraceable_model_still_rewritten():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2))
            self.fc = nn.Linear(8, 4)

        def forward(self, x):
            x = self.features(x)
            if x.sum() > 0:  # fx cannot trace a branch on data
                x = x * 2
            return self.fc(x.mean((2, 3)))

    torch.manual_seed(0)
    model = DataDependent().eval()
    with torch.no_grad():
        model.features[1].running_var.uniform_(0.5, 2)
    twin = fastsal.rewrite(model, "guided")
    assert isinstance(twin.features[1], fm.FoldedBatchNorm2d)  # found inside the Sequential
    assert isinstance(twin.features[3], fm.SaliencyReLUMaxPool2d)
    assert "could not trace <root>" in str(twin.fastsal_report)
    x = _input((1, 3, 12, 12))
    assert rel_l2(input_grad(twin, x), reference_input_grads(model, x, rules=("guided",))["guided"]) <= TOL


# ----- threads, copies, compile -----------------------------------------------------------------------------


def test_two_threads_two_rules_same_model():
    model, shape = SMALL_MODELS["functional[F.relu]"]()
    x = _input(shape)
    expected = reference_input_grads(model, x)
    errors, barrier = {}, threading.Barrier(2)

    def work(rule):
        twin = fastsal.rewrite(model, rule)
        barrier.wait()
        errors[rule] = max(rel_l2(input_grad(twin, x), expected[rule]) for _ in range(20))

    threads = [threading.Thread(target=work, args=(rule,)) for rule in ("guided", "deconvnet")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors["guided"] <= TOL and errors["deconvnet"] <= TOL, errors


def test_deepcopy_of_twin():
    model, shape = SMALL_MODELS["functional[torch.relu]"]()
    twin = fastsal.rewrite(model, "deconvnet")
    clone = copy.deepcopy(twin)
    x = _input(shape)
    assert rel_l2(input_grad(clone, x), input_grad(twin, x)) == 0.0


def test_torch_compile_fullgraph():
    model, shape = SMALL_MODELS["reused nn.ReLU"]()

    class Mixed(nn.Module):  # module ReLUs, a fused pair, functional relu, pool, conv and linear
        def __init__(self):
            super().__init__()
            self.body = model
            self.pre = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(2))

        def forward(self, x):
            return self.body(F.relu(self.pre(x)) + F.max_pool2d(x, 2))

    mixed = Mixed().eval()
    x = _input((2, 3, 16, 16))
    expected = reference_input_grads(mixed, x)
    torch._dynamo.reset()
    for rule in ("guided", "deconvnet"):
        twin = fastsal.rewrite(mixed, rule)
        compiled = torch.compile(twin, backend="aot_eager", fullgraph=True)
        err = rel_l2(input_grad(compiled, x), expected[rule])
        assert err <= TOL, f"{rule}: {err:.2e}"


def test_rewrite_under_inference_mode_gives_a_usable_twin():
    import torchvision

    model = torchvision.models.resnet18().eval()
    with torch.inference_mode():
        twin = fastsal.rewrite(model, "guided")
    x = torch.randn(1, 3, 32, 32, requires_grad=True)
    twin(x)[:, 0].sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
