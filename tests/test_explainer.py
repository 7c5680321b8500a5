"""fastsal.Explainer: one forward and one backward, the model's own logits, any grad mode, threads."""

from __future__ import annotations

import contextlib
import threading
import weakref

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


class FakeCuda:
    """Stand-ins for the ``torch.cuda`` calls of the CUDA-graph path, recording them in ``log``,
    so its logic runs on CPU tensors: the "capture" runs the step eagerly, a "replay" does
    nothing (the static outputs keep the captured values)."""

    def __init__(self, monkeypatch):
        self.log = []
        log = self.log

        class Stream:
            def __init__(self, device=None):
                self.device = device
                log.append(("stream", device))

            def wait_stream(self, other):
                pass

            def wait_event(self, event):
                log.append(("wait_event", event))

        class Event:
            def record(self, stream):
                log.append(("record", self))

            def synchronize(self):
                log.append(("synchronize", self))

        class CUDAGraph:
            def __init__(self):
                weakref.finalize(self, log.append, ("graph released", id(self)))

            def replay(self):
                log.append(("replay", id(self)))

        @contextlib.contextmanager
        def device(d):
            log.append(("enter device", d))
            yield
            log.append(("exit device", d))

        @contextlib.contextmanager
        def graph(cuda_graph, **kwargs):
            log.append(("capture", id(cuda_graph), kwargs))
            yield

        for name, value in (("Stream", Stream), ("Event", Event), ("CUDAGraph", CUDAGraph), ("device", device),
                            ("graph", graph), ("stream", lambda s: contextlib.nullcontext()),
                            ("current_stream", lambda device=None: Stream(device))):
            monkeypatch.setattr(torch.cuda, name, value)

    def of(self, kind):
        return [entry for entry in self.log if entry[0] == kind]


def test_cuda_graph_capture_runs_on_the_input_device_in_thread_local_mode(net, monkeypatch):
    fake = FakeCuda(monkeypatch)
    explainer = fastsal.Explainer(net, cuda_graph=True)
    x = _x()
    result = explainer._explain_graph(explainer._function(), x, None, 4, False)
    assert torch.equal(result.maps, fastsal.Explainer(net).explain(x).maps)
    (capture,) = fake.of("capture")
    side = capture[2].get("stream")
    # captured on the side stream made on the input's device (not torch's default capture
    # stream, made on whichever device was current), with other threads' CUDA calls allowed
    assert capture[2] == {"stream": side, "capture_error_mode": "thread_local"}
    assert side is not None and side.device == x.device
    kinds = [e[0] for e in fake.log]
    first, last = kinds.index("enter device"), kinds.index("exit device")
    assert fake.log[first][1] == x.device and first < kinds.index("capture") < last
    assert all(s[1] == x.device for s in fake.of("stream"))


def test_evicted_cuda_graph_waits_for_its_last_replay(net, monkeypatch):
    fake = FakeCuda(monkeypatch)
    explainer = fastsal.Explainer(net, cuda_graph=True, max_graphs=1)
    fn = explainer._function()
    explainer._explain_graph(fn, _x(n=2), None, 2, False)
    explainer._explain_graph(fn, _x(n=2), None, 2, False)  # replayed: one graph so far
    first_graph = fake.of("capture")[0][1]
    last_replay = fake.of("record")[-1][1]
    assert not fake.of("graph released")
    explainer._explain_graph(fn, _x(n=3), None, 3, False)  # another shape: the first graph is evicted
    # the event of its last replay was waited on before the graph (and its pool) went away
    assert ("graph released", first_graph) in fake.log
    assert fake.log.index(("synchronize", last_replay)) < fake.log.index(("graph released", first_graph))
    assert len(explainer._graphs) == 1
    # a changed model: every graph is dropped, again after its last replay
    explainer._explain_graph(fn, _x(n=3), None, 3, False)
    second_graph, last_replay = fake.of("capture")[1][1], fake.of("record")[-1][1]
    net.train()
    explainer._function()
    assert not explainer._graphs
    assert fake.log.index(("synchronize", last_replay)) < fake.log.index(("graph released", second_graph))


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


@pytest.mark.gpu
def test_cuda_graph_on_the_second_gpu_while_the_first_is_current(net):
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 CUDA devices, {torch.cuda.device_count()} visible")
    torch.cuda.set_device(0)
    model = net.to("cuda:1")
    graphed = fastsal.Explainer(model, cuda_graph=True)
    eager = fastsal.Explainer(model)
    for seed in range(3):  # capture, then replays
        x = _x(n=8, seed=seed).to("cuda:1")
        got, want = graphed.explain(x), eager.explain(x)
        assert got.maps.device == x.device and torch.equal(got.targets, want.targets)
        assert rel_l2(got.maps, want.maps) <= 1e-5
    assert torch.cuda.current_device() == 0


@pytest.mark.gpu
def test_cuda_graph_capture_while_other_threads_use_the_gpu(net):
    # captures (3 shapes, max_graphs=2: evictions too) while other threads run eager explains,
    # whose check_inputs does isfinite and a host sync
    model = net.cuda()
    graphed = fastsal.Explainer(model, cuda_graph=True, max_graphs=2)
    eager = fastsal.Explainer(model, check_finite=True)
    inputs = [_x(n=n, seed=n).cuda() for n in (2, 4, 8)]
    expected = [eager.explain(x).maps for x in inputs]
    errors = []

    def work(explainer, order):
        try:
            for _ in range(4):
                for i in order:
                    got = explainer.explain(inputs[i]).maps
                    if rel_l2(got, expected[i]) > 1e-5:
                        raise AssertionError(f"input {i}: rel_l2 {rel_l2(got, expected[i])}")
        except Exception as err:  # surfaced below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(graphed, order)) for order in ([0, 1, 2], [2, 1, 0])]
    threads += [threading.Thread(target=work, args=(eager, [0, 1, 2])) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    torch.cuda.synchronize()
    assert not errors, errors
    assert len(graphed._graphs) <= 2


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
