"""No graph break when ``torch.compile`` meets fastsal on CUDA tensors, checked without a GPU.

How: ``torch._dynamo.explain`` runs inside a ``FakeTensorMode`` in which the model is moved to
``"cuda"`` and the input is a fake CUDA tensor. Dynamo propagates fake tensors through every op
(a ``triton_op``'s Python body runs on them), so nothing touches a device. Checked for a
rewritten torchvision ResNet-18 (weights=None), the VGG-like ReLU -> MaxPool net of
``models.SMALL_MODELS`` (the fused op appears), and all the ops of :mod:`fastsal.ops` (relu,
in-place relu, max_pool2d, relu_max_pool2d, conv2d, linear), for the three rules.

What exactly is verified, on two paths:

* **reference** (this process): conftest.py sets ``TRITON_INTERPRET=1``, so the kernels were
  decorated as interpreter functions, which read data pointers and fail on fake tensors.
  ``FASTSAL_BACKEND=torch`` is set: each op is one ``fastsal.*`` node of the graph, and its
  body runs the plain-torch reference on the fake CUDA tensors.
* **triton** (a subprocess without ``TRITON_INTERPRET``, ``FASTSAL_BACKEND=auto``): what a GPU
  machine runs. ``kernels_for`` picks the Triton launchers for the fake CUDA tensors, and every
  launch goes through ``wrap_triton`` (Dynamo records the ``triton_op`` node; no kernel runs).

Each case must give 1 graph and 0 graph breaks, and the graph must hold the expected
``fastsal.*`` ops. The inputs require grad, as ``Explainer`` and ``saliency`` give them: Dynamo
then traces each ``autograd.Function`` as a higher-order op, speculating its forward *and* its
backward, so the backward ops' bodies (ReLU backward, unpool) also run on fake CUDA tensors and,
on the triton path, reach ``wrap_triton``. What is not checked: AOTAutograd's joint graph and
Inductor, which need a device (they stop at ``hasPrimaryContext``), and the kernels' numerics.

Found on torch 2.14: a forward on inputs that do *not* require grad breaks the graph at each
in-place ReLU (``ctx.mark_dirty`` in an inlined ``autograd.Function.forward``; ResNet-18: 17
breaks): recorded below as a strict expected failure, to be fixed in :mod:`fastsal.ops`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from models import SMALL_MODELS

import fastsal
from fastsal import ops

pytest.importorskip("torchvision")

RULES = ("gradient", "deconvnet", "guided")
TESTS = os.path.dirname(os.path.abspath(__file__))


class FusedOps(nn.Module):
    """Every op of fastsal.ops, the rule fixed."""

    def __init__(self, rule: str):
        super().__init__()
        self.rule = rule
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        y = ops.conv2d(x, self.conv.weight, self.conv.bias, padding=1)
        y = ops.relu_max_pool2d(y, self.rule, 2)  # 16 -> 8
        y = ops.relu(ops.max_pool2d(y, 3, 2, 1), self.rule)  # 8 -> 4, overlapping windows
        y = ops.relu(y * 2.0, self.rule, inplace=True)
        return ops.linear(y.flatten(1), self.fc.weight, self.fc.bias)


def _case(name: str, rule: str):
    """``(module to trace, input shape)``: the rewritten models, or the ops called directly."""
    if name == "ops":
        torch.manual_seed(0)
        return FusedOps(rule).eval(), (2, 3, 16, 16)
    if name == "resnet18":
        import torchvision

        torch.manual_seed(0)
        return fastsal.rewrite(torchvision.models.resnet18(weights=None).eval(), rule), (2, 3, 64, 64)
    model, shape = SMALL_MODELS[name]()
    return fastsal.rewrite(model, rule), shape


def _fastsal_nodes(graph_module) -> list:
    """The fastsal ops in a traced graph and its subgraphs (an autograd.Function is one)."""
    return sorted(
        {str(n.target) for m in graph_module.modules() if isinstance(m, torch.fx.GraphModule)
         for n in m.graph.nodes if str(n.target).startswith("fastsal.")}
    )


def explain_on_fake_cuda(name: str, rule: str, requires_grad: bool = True) -> dict:
    """Trace one case with Dynamo on fake CUDA tensors; what it found, and which kernels ran."""
    import fastsal._library as library
    from fastsal._kernels import maxpool, relu

    chosen, launched = set(), set()
    pick = library.kernels_for

    def spy_pick(t):
        module = pick(t)
        chosen.add((type(t).__name__, str(t.device), module.__name__))
        return module

    def spy_launchable(original):
        def launchable(kernel):
            wrapped = original(kernel)
            launched.add((type(wrapped).__name__, getattr(getattr(kernel, "fn", kernel), "__name__", "?")))
            return wrapped

        return launchable

    saved = library.kernels_for, relu.launchable, maxpool.launchable
    library.kernels_for = spy_pick
    relu.launchable, maxpool.launchable = spy_launchable(relu.launchable), spy_launchable(maxpool.launchable)
    try:
        module, shape = _case(name, rule)
        torch._dynamo.reset()
        from torch._subclasses.fake_tensor import FakeTensorMode

        with FakeTensorMode(allow_non_fake_inputs=True):
            module = module.to("cuda")  # parameters and buffers become fake CUDA tensors
            x = torch.randn(shape, device="cuda", requires_grad=requires_grad)
            assert all(p.is_cuda for p in module.parameters()) and x.is_cuda
            found = torch._dynamo.explain(module)(x)
    finally:
        library.kernels_for, relu.launchable, maxpool.launchable = saved
        torch._dynamo.reset()
    return {
        "graphs": found.graph_count,
        "breaks": found.graph_break_count,
        "reasons": [r.reason.splitlines()[0] for r in found.break_reasons],
        "ops": sorted({op for g in found.graphs for op in _fastsal_nodes(g)}),
        "chosen": sorted(map(list, chosen)),
        "launched": sorted(map(list, launched)),
    }


VGG_LIKE = "relu->maxpool sequential (vgg-like)"
# every rule on the ops and the VGG-like net; ResNet-18 (~5 s of CPU a trace) once, on the GPU's path
REFERENCE_CASES = [(VGG_LIKE, rule) for rule in RULES] + [("ops", rule) for rule in RULES]
TRITON_CASES = [("ops", rule) for rule in RULES] + [(VGG_LIKE, "deconvnet"), ("resnet18", "guided")]
EXPECTED_OPS = {
    VGG_LIKE: {"fastsal.max_pool2d_forward", "fastsal.relu_forward"},
    "ops": {"fastsal.max_pool2d_forward", "fastsal.relu_forward", "fastsal.relu_forward_"},
    "resnet18": {"fastsal.max_pool2d_forward", "fastsal.relu_forward_"},
}


def _check(name: str, found: dict, backend_module: str) -> None:
    assert (found["graphs"], found["breaks"]) == (1, 0), found["reasons"]
    assert EXPECTED_OPS[name] <= set(found["ops"]), found["ops"]
    # every fastsal op ran on fake CUDA tensors, and took the path this test means to check
    assert found["chosen"] and all(t == "FakeTensor" and d.startswith("cuda") for t, d, _ in found["chosen"])
    assert {m for _, _, m in found["chosen"]} == {backend_module}, found["chosen"]


@pytest.mark.parametrize("name, rule", REFERENCE_CASES, ids=[f"{n.split(' ')[0]}-{r}" for n, r in REFERENCE_CASES])
def test_reference_path_on_fake_cuda_one_graph_no_break(monkeypatch, name, rule):
    monkeypatch.setenv("FASTSAL_BACKEND", "torch")
    found = explain_on_fake_cuda(name, rule)
    _check(name, found, "fastsal._kernels.reference")
    assert not found["launched"]


def test_triton_path_on_fake_cuda_one_graph_no_break():
    """The GPU path: no interpreter, so the launchers hand Dynamo ``wrap_triton`` kernels."""
    pytest.importorskip("triton")
    env = dict(os.environ, FASTSAL_BACKEND="auto", PYTHONPATH=TESTS + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_INTERPRET", None)
    code = (
        "import json, test_compile_fake_cuda as t\n"
        "print(json.dumps([t.explain_on_fake_cuda(n, r) for n, r in t.TRITON_CASES]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) == len(TRITON_CASES)
    for (name, rule), found in zip(TRITON_CASES, results):
        _check(name, found, "fastsal._kernels.triton")
        kinds = {kind for kind, _ in found["launched"]}
        assert kinds == {"TraceableTritonKernelWrapper"}, (name, rule, found["launched"])
        if name == "ops":
            # Dynamo traces each autograd.Function's backward too: the backward kernels are launched
            kernels = {kernel for _, kernel in found["launched"]}
            assert kernels == {"_relu_forward_kernel", "_relu_backward_kernel", "_max_pool2d_forward_kernel",
                               "_unpool_backward_kernel"}, kernels


def test_forward_without_grad_in_place_relu_one_graph(monkeypatch):
    # without grad, fastsal.ops.relu skips its autograd.Function (Dynamo cannot trace the
    # in-place ctx.mark_dirty of an inlined one) and runs the forward op alone
    monkeypatch.setenv("FASTSAL_BACKEND", "torch")
    found = explain_on_fake_cuda("nn.ReLU(inplace=True)", "guided", requires_grad=False)
    assert (found["graphs"], found["breaks"]) == (1, 0), found["reasons"]
