"""fastsal.export end to end: torchvision CNNs -> ONNX file -> ONNX Runtime, against fastsal
eager and an independent float64 reference; the command; the Triton config; clear errors.

ONNX exports are slow (tens of seconds each on 2 CPU cores), so each model is exported for
some of the rules; every rule meets every unpool kind (compare on VGG, scatter-add on ResNet
and GoogLeNet) and tests/test_export_ops.py checks each op's backward against eager fastsal
exactly, for all rules, without ONNX.
"""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")
torchvision = pytest.importorskip("torchvision")

import fastsal  # noqa: E402
from fastsal.exporter import ExportCheckError, SaliencyGraph, run_onnx  # noqa: E402
from fastsal.exporter.check import MAP_TOLERANCE  # noqa: E402
from fastsal.reductions import get_reduction  # noqa: E402
from fastsal.rules import Rule  # noqa: E402
from models import randomize_batch_norm, reference_input_grads, rel_l2  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def vgg_small():
    """torchvision's VGG with a narrow make_layers config (BN, fused ReLU -> 2x2 pools, the 7x7
    adaptive pool, whose backward needs fastsal's decomposition) and a small classifier."""
    from torchvision.models import vgg

    torch.manual_seed(0)
    model = vgg.VGG(vgg.make_layers([8, "M", 16, "M", 32, 32, "M"], batch_norm=True), num_classes=10)
    model.classifier = nn.Sequential(nn.Linear(32 * 7 * 7, 64), nn.ReLU(True), nn.Dropout(), nn.Linear(64, 10))
    return model


def resnet18():
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10)


def densenet_small():
    """torchvision's DenseNet class (functional F.relu, norm -> relu not foldable, 2x2 average-pool
    transitions, adaptive pool) with two layers per block instead of densenet121's 6-24-16."""
    from torchvision.models import densenet

    torch.manual_seed(0)
    return densenet.DenseNet(growth_rate=8, block_config=(2, 2, 2, 2), num_init_features=16, bn_size=2, num_classes=10)


def googlenet():
    torch.manual_seed(0)
    return torchvision.models.googlenet(num_classes=10, aux_logits=False, init_weights=True)


BUILDERS = {"vgg_small": vgg_small, "resnet18": resnet18, "densenet_small": densenet_small, "googlenet": googlenet}

CASES = [  # (model, rule, example batch, image side)
    ("vgg_small", "guided", 2, 32),
    ("vgg_small", "deconvnet", 1, 32),
    ("vgg_small", "gradient", 2, 32),
    ("resnet18", "guided", 2, 64),
    ("resnet18", "deconvnet", 1, 64),
    ("densenet_small", "gradient", 2, 32),
    ("googlenet", "guided", 1, 64),
]


def _model(name):
    """Randomized BatchNorm statistics (so folding matters) and fan-in scaled weights, so the
    signal neither dies nor explodes through the depth and the maps do not vanish."""
    model = BUILDERS[name]()
    torch.manual_seed(1)
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if m.bias is not None:
                nn.init.normal_(m.bias, std=0.1)
    return randomize_batch_norm(model).eval()


def _eager(model, rule, x, target=None, reduce="abs_max"):
    """fastsal eager: the same graph module, run in eager (packed bits, int8 switches)."""
    graph = SaliencyGraph(fastsal.rewrite(model, rule), get_reduction(reduce), target is not None)
    return graph(x) if target is None else graph(x, target)


@pytest.mark.parametrize("name,rule,batch,side", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_onnx_equals_eager_at_batch_1_and_5(tmp_path, name, rule, batch, side):
    model = _model(name)
    path = str(tmp_path / f"{name}.onnx")
    example = torch.randn(batch, 3, side, side, generator=torch.Generator().manual_seed(1))
    program = fastsal.export(model, rule, example, path=path)

    check = program.fastsal_check
    assert check.ran and check.passed, str(check)
    assert isinstance(program, torch.export.ExportedProgram)
    assert not any("fastsal" in str(n.target) for n in program.graph.nodes)

    tol = MAP_TOLERANCE[Rule(rule)]
    for n in (1, 5):  # one export serves every batch size
        x = torch.randn(n, 3, side, side, generator=torch.Generator().manual_seed(10 + n))
        logits, maps = run_onnx(path, [x])
        e_logits, e_maps = _eager(model, rule, x)
        assert logits.shape == (n, 10) and maps.shape == (n, side, side)
        torch.testing.assert_close(torch.from_numpy(logits), e_logits, rtol=1e-4, atol=1e-4 * float(e_logits.abs().max()))
        scale = float(e_maps.abs().max())
        assert scale > 0 and float((e_maps > 0).float().mean()) > 0.05, "the map vanishes: the test could not fail"
        assert float((torch.from_numpy(maps) - e_maps).abs().max()) <= tol * scale
        if n == 5:
            # independent of fastsal: plain autograd with a per-call rule Function, in float64
            predicted = e_logits.argmax(1)
            ref = reference_input_grads(model, x, rules=(rule,), target=predicted.tolist())[rule]
            assert rel_l2(torch.from_numpy(maps), ref.abs().amax(1)) < 1e-3


def _tiny_net():
    """One of each: in-place ReLU, ReLU6, LeakyReLU, SiLU (a rule with activations="all"),
    an overlapping max-pool, an adaptive average pool."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU6(), nn.Conv2d(8, 8, 3, padding=1), nn.LeakyReLU(0.1),
        nn.Conv2d(8, 8, 1), nn.SiLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 6),
    )
    return randomize_batch_norm(net).eval()


def test_target_input_signature_and_raw_gradient(tmp_path):
    model = _tiny_net()
    path = str(tmp_path / "tiny.onnx")
    example = (torch.randn(1, 3, 16, 16), torch.tensor([4]))
    program = fastsal.export(model, "guided", example, target="input", reduce=None, path=path, activations="all")
    assert program.fastsal_check.passed, str(program.fastsal_check)
    replaced = str(program.fastsal_report)
    assert "ReLU6" in replaced and "LeakyReLU" in replaced and "SiLU" in replaced

    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    assert [(i.name, i.type) for i in session.get_inputs()] == [("image", "tensor(float)"), ("target", "tensor(int64)")]
    assert [o.name for o in session.get_outputs()] == ["logits", "saliency"]
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    target = torch.tensor([0, 5, 2])
    logits, grads = session.run(None, {"image": x.numpy(), "target": target.numpy()})
    graph = SaliencyGraph(fastsal.rewrite(model, "guided", activations="all"), None, True)
    e_logits, e_grads = graph(x, target)
    assert grads.shape == (3, 3, 16, 16)  # reduce=None: the raw gradient
    torch.testing.assert_close(torch.from_numpy(grads), e_grads, rtol=1e-5, atol=1e-6 * float(e_grads.abs().max()))
    # the class given, not the argmax: another target gives another map
    _, other = session.run(None, {"image": x.numpy(), "target": torch.tensor([1, 1, 1]).numpy()})
    assert not torch.allclose(torch.from_numpy(other), torch.from_numpy(grads))


def test_mismatch_raises_or_warns(tmp_path, monkeypatch):
    import fastsal.exporter.check as check

    monkeypatch.setitem(check.MAP_TOLERANCE, Rule.GRADIENT, -1.0)  # nothing can pass
    path = str(tmp_path / "tiny.onnx")
    with pytest.raises(ExportCheckError, match="saliency"):
        fastsal.export(_tiny_net(), "gradient", torch.randn(2, 3, 16, 16), path=path)
    assert os.path.exists(path)  # kept for inspection
    with pytest.warns(RuntimeWarning, match="FAILED"):
        program = fastsal.export(_tiny_net(), "gradient", torch.randn(2, 3, 16, 16), path=path, check="warn",
                                 dynamic_batch=False)
    assert program.fastsal_check.ran and program.fastsal_check.passed is False
    program = fastsal.export(_tiny_net(), "gradient", torch.randn(2, 3, 16, 16), dynamic_batch=False)
    assert not program.fastsal_check.ran and "no path" in program.fastsal_check.reason


class _ThresholdNet(nn.Module):
    def __init__(self, functional: bool):
        super().__init__()
        self.functional = functional
        self.conv = nn.Conv2d(3, 4, 3)
        self.act = nn.Threshold(0.5, 0.0)  # ReLU-like with no rule: left alone, or refused when strict
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = self.conv(x)
        x = F.threshold(x, 0.5, 0.0) if self.functional else self.act(x)
        return self.fc(x.mean((2, 3)))


@pytest.mark.filterwarnings("ignore:fastsal.rewrite")
def test_bad_inputs_get_clear_errors():
    model = _tiny_net()
    x = torch.randn(2, 3, 16, 16)
    with pytest.raises(ValueError, match="one image size"):
        fastsal.export(model, "guided", x, dynamic_size=True)
    with pytest.raises(ValueError, match="target must be 'predicted'"):
        fastsal.export(model, "guided", x, target="label")
    with pytest.raises(ValueError, match="unknown reduce"):
        fastsal.export(model, "guided", x, reduce="mean")
    with pytest.raises(ValueError, match="unknown saliency rule"):
        fastsal.export(model, "smoothgrad", x)
    with pytest.raises(ValueError, match=r"\(image, target\)"):
        fastsal.export(model, "guided", x, target="input")
    with pytest.raises(ValueError, match="4-D floating-point"):
        fastsal.export(model, "guided", x[0])
    with pytest.raises(ValueError, match="out of range"):
        fastsal.export(model, "guided", (x, torch.tensor([0, 6])), target="input")
    with pytest.raises(ValueError, match="opset"):
        fastsal.export(model, "guided", x, opset=11)
    with pytest.raises(ValueError, match="model.eval"):
        fastsal.export(_tiny_net().train(), "guided", x)
    for functional in (False, True):  # a module site is refused at rewrite, a functional one as the example runs
        with pytest.raises((ValueError, RuntimeError), match="strict"):
            fastsal.export(_ThresholdNet(functional).eval(), "guided", x, strict=True)
    gated = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Sigmoid(), nn.Flatten(), nn.Linear(4 * 14 * 14, 3)).eval()
    with pytest.raises(ValueError, match="reuses its own output"):  # torch.export's limit, said plainly
        fastsal.export(gated, "guided", x)
    assert model.training is False and all(not p.requires_grad or p.grad is None for p in model.parameters())


def _pbtxt_tensors(text: str, section: str):
    """(name, data_type, dims) of each tensor in the config's ``input`` or ``output`` list."""
    block = re.search(section + r"\s*\[(.*?)\n\]", text, re.S).group(1)
    return [
        (m.group(1), m.group(2), [int(d) for d in m.group(3).split(",")])
        for m in re.finditer(r'name:\s*"(\w+)"\s*data_type:\s*(\w+)\s*dims:\s*\[([^\]]*)\]', block)
    ]


def test_command_writes_a_file_the_triton_config_matches(tmp_path):
    from fastsal.cli import main

    out = str(tmp_path / "model.onnx")
    assert main(["export", "--out", out, "--method", "deconvnet", "--batch", "3"]) == 0  # the embedded model
    meta = json.load(open(out + ".json"))
    assert meta["check"]["passed"] is True and meta["method"] == "deconvnet"
    side = meta["preprocess"]["size"][0]
    x = torch.randn(4, 3, side, side)
    logits, maps = run_onnx(out, [x])
    assert maps.shape == (4, side, side) and logits.shape[0] == 4

    # docs/triton's config: the names, data types and ranks of the file's inputs and outputs
    text = open(os.path.join(REPO, "docs", "triton", "fastsal_guided", "config.pbtxt")).read()
    assert 'platform: "onnxruntime_onnx"' in text or 'backend: "onnxruntime"' in text
    assert int(re.search(r"max_batch_size:\s*(\d+)", text).group(1)) > 0  # the batch dimension is free
    to_triton = {"tensor(float)": "TYPE_FP32", "tensor(int64)": "TYPE_INT64"}
    session = ort.InferenceSession(out, providers=["CPUExecutionProvider"])
    for section, tensors in (("input", session.get_inputs()), ("output", session.get_outputs())):
        config = _pbtxt_tensors(text, section)
        assert [(n, t, len(d)) for n, t, d in config] == [
            (v.name, to_triton[v.type], len(v.shape) - 1) for v in tensors  # Triton's dims leave out the batch
        ], section
        assert all(isinstance(v.shape[0], str) for v in tensors)  # dynamic batch in the file


def test_command_refuses_bad_options(tmp_path, capsys):
    from fastsal.cli import main

    assert main(["export", "--out", str(tmp_path / "m.onnx"), "--reduce", "bogus"]) == 2
    assert "unknown reduce" in capsys.readouterr().err
    assert main(["export", "--out", str(tmp_path / "m.onnx"), "--model", "resnet18"]) == 2  # weights required
    assert "--weights" in capsys.readouterr().err
