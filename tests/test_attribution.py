"""The Captum-compatible classes: Captum's own test cases, Captum itself, and where Captum is wrong.

Captum's tiny models are re-created here from their definitions (fixed weights), and the
expected maps are the ones Captum's test-suite asserts.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastsal

# ----- Captum's test models, re-created -------------------------------------------------------------


class OneConv(nn.Module):
    """Captum's BasicModel_ConvNet_One_Conv: a 3x3 all-ones conv, ReLU, an 8->4 linear, ReLU."""

    def __init__(self, inplace: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 2, 3)
        self.relu1 = nn.ReLU(inplace=inplace)
        self.fc1 = nn.Linear(8, 4)
        self.relu2 = nn.ReLU(inplace=inplace)
        with torch.no_grad():
            self.conv1.weight.fill_(1.0)
            self.conv1.bias.copy_(torch.tensor([-50.0, -75.0]))
            self.fc1.weight.copy_(torch.cat([torch.ones(4, 5), -torch.ones(4, 3)], dim=1))
            self.fc1.bias.zero_()

    def forward(self, x, x2=None):
        if x2 is not None:
            x = x + x2
        x = self.relu1(self.conv1(x)).view(-1, 8)
        return self.relu2(self.fc1(x))


class MultiLayer(nn.Module):
    """Captum's BasicModel_MultiLayer (identity linear, 3->4 linear, ReLU, 4->2 linear)."""

    def __init__(self, inplace: bool = False):
        super().__init__()
        self.linear0 = nn.Linear(3, 3)
        self.linear1 = nn.Linear(3, 4)
        self.relu = nn.ReLU(inplace=inplace)
        self.linear2 = nn.Linear(4, 2)
        with torch.no_grad():
            self.linear0.weight.copy_(torch.eye(3))
            self.linear0.bias.zero_()
            self.linear1.weight.fill_(1.0)
            self.linear1.bias.copy_(torch.tensor([-10.0, 1.0, 1.0, 1.0]))
            self.linear2.weight.fill_(1.0)
            self.linear2.bias.copy_(torch.tensor([-1.0, 1.0]))

    def forward(self, x, add_input=None):
        x = x if add_input is None else x + add_input
        return self.linear2(self.relu(self.linear1(self.linear0(x))))


class MultiLayerMultiInput(nn.Module):
    """Captum's BasicModel_MultiLayer_MultiInput: MultiLayer(scale * (x1 + x2 + x3))."""

    def __init__(self):
        super().__init__()
        self.model = MultiLayer()

    def forward(self, x1, x2, x3, scale):
        return self.model(scale * (x1 + x2 + x3))


class ClampModel(nn.Module):
    """Captum's BasicModel: 1 - relu(1 - x) (a functional ReLU)."""

    def forward(self, x):
        return 1 - F.relu(1 - x)


class SoftmaxMLP(nn.Module):
    """Captum's SoftmaxModel(num_in, hidden, out): two Linear+ReLU, a Linear, softmax."""

    def __init__(self, num_in, hidden, out):
        super().__init__()
        self.lin1, self.lin2, self.lin3 = nn.Linear(num_in, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, out)
        self.relu1, self.relu2 = nn.ReLU(), nn.ReLU()
        self.softmax = nn.Softmax(dim=1)

    def forward(self, x):
        return self.softmax(self.lin3(self.relu2(self.lin2(self.relu1(self.lin1(x))))))


class SmallConvNet(nn.Module):
    """Captum's BasicModel_ConvNet: conv-relu-pool twice, fc-relu-fc, softmax."""

    def __init__(self):
        super().__init__()
        self.conv1, self.relu1, self.pool1 = nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(2)
        self.conv2, self.relu2, self.pool2 = nn.Conv2d(2, 4, 3), nn.ReLU(), nn.MaxPool2d(2)
        self.fc1, self.relu3, self.fc2 = nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 10)
        self.softmax = nn.Softmax(dim=1)
        with torch.no_grad():
            self.fc1.weight.fill_(1.0)
            self.fc2.weight.fill_(1.0)

    def forward(self, x):
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        x = self.relu3(self.fc1(x.view(-1, 4)))
        return self.softmax(self.fc2(x))


ARANGE = torch.arange(16, dtype=torch.float32).view(1, 1, 4, 4)
GB_ONE = [[0.0, 1.0, 1.0, 1.0], [1.0, 3.0, 3.0, 2.0], [1.0, 3.0, 3.0, 2.0], [1.0, 2.0, 2.0, 1.0]]
GB_TWO = [[1.0, 2.0, 2.0, 1.0], [2.0, 4.0, 4.0, 2.0], [2.0, 4.0, 4.0, 2.0], [1.0, 2.0, 2.0, 1.0]]
DECONV = [[2.0, 3.0, 3.0, 1.0], [3.0, 5.0, 5.0, 2.0], [3.0, 5.0, 5.0, 2.0], [1.0, 2.0, 2.0, 1.0]]


def _close(actual, expected, atol=0.01):
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    assert torch.allclose(actual, expected.view_as(actual), atol=atol, rtol=0), f"\n{actual}\n!=\n{expected}"


# ----- Captum's expected values --------------------------------------------------------------------


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("cls,expected", [(fastsal.GuidedBackprop, GB_ONE), (fastsal.Deconvolution, DECONV)])
def test_captum_one_conv_single_input(cls, expected, inplace):
    out = cls(OneConv(inplace)).attribute(ARANGE, target=0)
    assert isinstance(out, torch.Tensor) and out.shape == ARANGE.shape
    _close(out, expected)


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("cls,expected", [(fastsal.GuidedBackprop, GB_TWO), (fastsal.Deconvolution, DECONV)])
def test_captum_one_conv_two_inputs(cls, expected, inplace):
    out = cls(OneConv(inplace)).attribute((ARANGE, torch.ones(1, 1, 4, 4)), target=0)
    assert isinstance(out, tuple) and len(out) == 2
    for o in out:
        _close(o, expected)


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize(
    "cls,selector,two_inputs,expected",
    [
        (fastsal.NeuronGuidedBackprop, (0,), False, GB_ONE),
        (fastsal.NeuronGuidedBackprop, (slice(0, 1, 1),), False, GB_ONE),
        (fastsal.NeuronGuidedBackprop, (3,), True, GB_TWO),
        (fastsal.NeuronDeconvolution, (0,), False, DECONV),
        (fastsal.NeuronDeconvolution, (3,), True, DECONV),
    ],
)
def test_captum_one_conv_neuron(cls, selector, two_inputs, expected, inplace):
    net = OneConv(inplace)
    inputs = (ARANGE, torch.ones(1, 1, 4, 4)) if two_inputs else (ARANGE,)
    out = cls(net, net.fc1).attribute(inputs, neuron_selector=selector)
    for o in out:
        _close(o, expected)


@pytest.mark.parametrize(
    "gb,neuron", [(fastsal.GuidedBackprop, fastsal.NeuronGuidedBackprop), (fastsal.Deconvolution, fastsal.NeuronDeconvolution)]
)
def test_captum_matching_target_and_output_neuron(gb, neuron):
    torch.manual_seed(0)
    net = OneConv()
    inp = 100.0 * torch.randn(1, 1, 4, 4)
    whole, per_neuron = gb(net), neuron(net, net.relu2)
    for i in range(net(inp).shape[1]):
        _close(whole.attribute(inp, target=i), per_neuron.attribute(inp, (i,)))


def test_captum_saliency_basic_function_and_module():
    x = torch.tensor([1.0, 2.0, 3.0, 0.0, -1.0, 7.0], requires_grad=True)
    expected = [0.0, 0.0, 0.0, 1.0, 1.0, 0.0]
    model = ClampModel()
    assert fastsal.Saliency(model.forward).attribute(x).tolist() == expected  # a plain function
    assert fastsal.Saliency(model).attribute(x).tolist() == expected  # a module (rewritten)
    assert x.grad is None


def test_captum_saliency_classification_equals_autograd():
    torch.manual_seed(0)
    model = SoftmaxMLP(5, 20, 10)
    x = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0]], requires_grad=True)
    target = torch.tensor(5)
    out = fastsal.Saliency(model).attribute(x, target)
    model(x)[:, target].backward()
    assert torch.allclose(out, x.grad.abs(), rtol=1e-6, atol=0)
    signed = fastsal.Saliency(model).attribute(x.detach(), target, abs=False)
    assert torch.allclose(signed, x.grad, rtol=1e-6, atol=0)


@pytest.mark.parametrize(
    "layer,selector,inp,expected,to_input,inplace",
    [
        ("linear2", (0,), [[0.0, 100.0, 0.0]], [4.0, 4.0, 4.0], False, False),
        ("linear1", (0,), [[0.0, 100.0, 0.0]], [1.0, 1.0, 1.0], False, False),
        ("relu", (0,), [[0.0, 5.0, 4.0]], [1.0, 1.0, 1.0], True, True),
        ("linear1", (0,), [[0.0, 5.0, 4.0]], [1.0, 1.0, 1.0], False, True),
        ("relu", 0, [[0.0, 5.0, 4.0]], [0.0, 0.0, 0.0], False, False),
        ("relu", 1, [[0.0, 5.0, 4.0]], [1.0, 1.0, 1.0], False, False),
    ],
)
def test_captum_neuron_gradient_multilayer(layer, selector, inp, expected, to_input, inplace):
    net = MultiLayer(inplace=inplace)
    out = fastsal.NeuronGradient(net, getattr(net, layer)).attribute(
        torch.tensor(inp), selector, attribute_to_neuron_input=to_input
    )
    _close(out, [expected])


def test_captum_neuron_gradient_multi_input_with_additional_args():
    net = MultiLayerMultiInput()
    x = torch.tensor([[0.0, 100.0, 0.0]])
    out = fastsal.NeuronGradient(net, net.model.linear2).attribute((x, x, x), (0,), additional_forward_args=(3,))
    assert len(out) == 3
    for o in out:
        _close(o, [[12.0, 12.0, 12.0]])
    out = fastsal.NeuronGradient(net, net.model.linear1).attribute((x, x), (0,), additional_forward_args=(x, 5))
    assert len(out) == 2
    for o in out:
        _close(o, [[5.0, 5.0, 5.0]])


@pytest.mark.parametrize("layer", ["softmax", "relu2"])
def test_captum_neuron_gradient_matches_autograd(layer):
    torch.manual_seed(1)
    net = SmallConvNet()
    inp = torch.randn(2, 1, 10, 10)
    module = getattr(net, layer)
    captured = {}
    handle = module.register_forward_hook(lambda m, a, o: captured.__setitem__("out", o))
    attrib = fastsal.NeuronGradient(net, module)
    try:
        for i in range(4):
            x = inp.clone().requires_grad_()
            net(x)
            neuron = (i,) + (0,) * (captured["out"].dim() - 2)
            (expected,) = torch.autograd.grad(captured["out"][(slice(None), *neuron)].sum(), x)
            got = attrib.attribute(inp, neuron)
            assert got.shape == inp.shape
            assert torch.allclose(got, expected, atol=1e-6, rtol=1e-5)
    finally:
        handle.remove()


def test_saliency_additional_forward_args_and_signed():
    net = MultiLayer()
    x = torch.tensor([[1.0, 2.0, 3.0], [-4.0, 0.5, 9.0]])
    add = torch.tensor([[0.5, 0.5, 0.5], [1.0, -1.0, 0.0]])
    out = fastsal.Saliency(net).attribute(x, target=1, additional_forward_args=(add,))
    xr = x.clone().requires_grad_()
    net(xr, add)[:, 1].sum().backward()
    assert torch.allclose(out, xr.grad.abs())
    # a non-tuple additional argument is passed as one argument, as Captum does
    out2 = fastsal.Saliency(net).attribute(x, target=1, additional_forward_args=add, abs=False)
    assert torch.allclose(out2, xr.grad)


# ----- against the installed Captum, where Captum is right ------------------------------------------

captum_attr = pytest.importorskip("captum.attr")
# Captum warns on every call (inputs made to require grad, hooks set); that is Captum's noise, not ours
quiet_captum = pytest.mark.filterwarnings("ignore::UserWarning:captum")


class PoolNet(nn.Module):
    """Module ReLUs only (what Captum handles): conv-relu-pool, conv-relu, linear; 3x16x16 input."""

    def __init__(self):
        super().__init__()
        self.conv1, self.relu1, self.pool = nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)
        self.conv2, self.relu2 = nn.Conv2d(4, 6, 3, stride=2), nn.ReLU()
        self.fc = nn.Linear(6 * 3 * 3, 5)

    def forward(self, x):
        x = self.relu2(self.conv2(self.pool(self.relu1(self.conv1(x)))))
        return self.fc(x.flatten(1))


CLASS_PAIRS = [
    ("Saliency", fastsal.Saliency),
    ("Deconvolution", fastsal.Deconvolution),
    ("GuidedBackprop", fastsal.GuidedBackprop),
]
NEURON_PAIRS = [
    ("NeuronGradient", fastsal.NeuronGradient),
    ("NeuronDeconvolution", fastsal.NeuronDeconvolution),
    ("NeuronGuidedBackprop", fastsal.NeuronGuidedBackprop),
]


def _rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@quiet_captum
@pytest.mark.parametrize("name,ours", CLASS_PAIRS)
@pytest.mark.parametrize("target", [3, [0, 4, 2], torch.tensor([1, 1, 0])])
def test_same_as_captum_on_module_relus(name, ours, target):
    torch.manual_seed(2)
    net = PoolNet().eval()
    x = torch.randn(3, 3, 16, 16)
    theirs = getattr(captum_attr, name)(net).attribute(x, target=target)
    got = ours(net).attribute(x, target=target)
    assert _rel(got, theirs) <= 1e-5


@quiet_captum
@pytest.mark.parametrize("name,ours", NEURON_PAIRS)
@pytest.mark.parametrize("layer,selector,to_input", [("relu2", (1, 0, 2), False), ("conv2", (slice(0, 3), 1, 1), False),
                                                     ("pool", (2, 3, 3), True), ("fc", lambda out: out[:, 1] - out[:, 2], False)])
def test_same_as_captum_neuron(name, ours, layer, selector, to_input):
    torch.manual_seed(3)
    net = PoolNet().eval()
    x = torch.randn(2, 3, 16, 16)
    module = getattr(net, layer)
    theirs = getattr(captum_attr, name)(net, module).attribute(x, selector, attribute_to_neuron_input=to_input)
    got = ours(net, module).attribute(x, selector, attribute_to_neuron_input=to_input)
    assert got.shape == x.shape
    assert _rel(got, theirs) <= 1e-5


class BNNet(nn.Module):
    """conv-BN-relu-pool, conv-BN-relu, linear: in eval mode the rewrite folds each BN into its conv
    and fuses the first ReLU into the pool, so these layers' tensors must be recomputed."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1, self.relu1, self.pool = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2)
        self.conv2, self.bn2, self.relu2 = nn.Conv2d(4, 5, 3), nn.BatchNorm2d(5), nn.ReLU()
        self.fc = nn.Linear(5 * 2 * 2, 3)
        with torch.no_grad():
            for bn in (self.bn1, self.bn2):
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.5, 2.0)
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.3, 0.3)

    def forward(self, x):
        x = self.pool(self.relu1(self.bn1(self.conv1(x))))
        return self.fc(self.relu2(self.bn2(self.conv2(x))).flatten(1))


@quiet_captum
@pytest.mark.parametrize("name,ours", NEURON_PAIRS)
@pytest.mark.parametrize(
    "layer,to_input",
    [("conv1", False), ("bn1", True), ("bn1", False), ("relu1", False), ("relu1", True), ("pool", True), ("conv2", False)],
)
def test_same_as_captum_on_folded_and_fused_layers(name, ours, layer, to_input):
    torch.manual_seed(4)
    net = BNNet().eval()
    x = torch.randn(2, 3, 8, 8)
    module = getattr(net, layer)
    selector = (1, 1, 1) if layer != "conv2" else (slice(None), 0, 1)
    theirs = getattr(captum_attr, name)(net, module).attribute(x, selector, attribute_to_neuron_input=to_input)
    got = ours(net, module).attribute(x, selector, attribute_to_neuron_input=to_input)
    assert _rel(got, theirs) <= 1e-4


# ----- where Captum is wrong -------------------------------------------------------------------------


class FunctionalReLU(nn.Module):
    """x -> identity linear -> F.relu -> v . h, with v = (-1, 3): guided and deconv keep only +3."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.out = nn.Linear(2, 1, bias=False)
        with torch.no_grad():
            self.lin.weight.copy_(torch.eye(2))
            self.lin.bias.zero_()
            self.out.weight.copy_(torch.tensor([[-1.0, 3.0]]))

    def forward(self, x):
        return self.out(F.relu(self.lin(x)))


@quiet_captum
def test_functional_relu_gets_the_rule_captum_misses_it():
    net = FunctionalReLU()
    x = torch.tensor([[1.0, 2.0]])  # both hidden units active
    assert fastsal.GuidedBackprop(net).attribute(x, target=0).tolist() == [[0.0, 3.0]]
    assert fastsal.Deconvolution(net).attribute(x, target=0).tolist() == [[0.0, 3.0]]
    assert fastsal.Saliency(net).attribute(x, target=0, abs=False).tolist() == [[-1.0, 3.0]]
    # Captum's hooks only see nn.ReLU modules: the functional ReLU keeps its plain gradient
    assert captum_attr.GuidedBackprop(net).attribute(x, target=0).tolist() == [[-1.0, 3.0]]


class SkipNet(nn.Module):
    """a = conv0(x) (1x1, weight 1); out = sum(conv1(relu(a)) + a), conv1 a 1x1 conv of weight -2.

    Through the ReLU the gradient is -2 (dropped by guided and deconv); through the skip it is 1.
    Right: guided = deconv = 1 everywhere; gradient = -1 where a > 0, else 1.
    """

    def __init__(self):
        super().__init__()
        self.conv0 = nn.Conv2d(1, 1, 1, bias=False)
        self.relu = nn.ReLU()
        self.conv1 = nn.Conv2d(1, 1, 1, bias=False)
        with torch.no_grad():
            self.conv0.weight.fill_(1.0)
            self.conv1.weight.fill_(-2.0)

    def forward(self, x):
        a = self.conv0(x)
        return (self.conv1(self.relu(a)) + a).flatten(1).sum(1, keepdim=True)


@quiet_captum
def test_relu_whose_input_feeds_a_skip_connection():
    net = SkipNet()
    x = torch.tensor([[[[1.0, -1.0], [2.0, -3.0]]]])
    ones = torch.ones_like(x)
    assert torch.equal(fastsal.GuidedBackprop(net).attribute(x, target=0), ones)
    assert torch.equal(fastsal.Deconvolution(net).attribute(x, target=0), ones)
    plain = torch.where(x > 0, -ones, ones)
    assert torch.equal(fastsal.Saliency(net).attribute(x, target=0, abs=False), plain)
    # Captum hooks the ReLU's input tensor, whose gradient already includes the skip path
    assert not torch.equal(captum_attr.GuidedBackprop(net).attribute(x, target=0), ones)
    assert not torch.equal(captum_attr.Deconvolution(net).attribute(x, target=0), ones)


# ----- bad input ---------------------------------------------------------------------------------------


def test_clear_errors():
    net = PoolNet()
    x = torch.randn(2, 3, 16, 16)
    gb = fastsal.GuidedBackprop(net)
    with pytest.raises(IndexError, match="target 7 is out of range .* 5 classes"):
        gb.attribute(x, target=7)
    with pytest.raises(IndexError, match="target 9 is out of range"):
        gb.attribute(x, target=[0, 9])
    with pytest.raises(ValueError, match="3 entries but the batch has 2 samples"):
        gb.attribute(x, target=[0, 1, 2])
    with pytest.raises(ValueError, match="3 entries but the batch has 2 samples"):
        gb.attribute(x, target=torch.tensor([0, 1, 2]))
    with pytest.raises(TypeError, match="integer class indices"):
        gb.attribute(x, target=torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="more than one number per sample"):
        gb.attribute(x)
    with pytest.raises(TypeError, match="floating-point"):
        gb.attribute((x * 255).to(torch.uint8), target=0)
    bad = x.clone()
    bad[1, 0, 3, 3] = float("nan")
    bad[0, 2, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="2 NaN or Inf"):
        gb.attribute(bad, target=0)
    with pytest.raises(TypeError, match="needs a torch.nn.Module"):
        fastsal.Deconvolution(lambda t: net(t))
    with pytest.raises(TypeError, match="tensor or a non-empty tuple"):
        gb.attribute([x.tolist()], target=0)


def test_neuron_errors():
    net = PoolNet()
    x = torch.randn(1, 3, 16, 16)
    with pytest.raises(ValueError, match="not a submodule"):
        fastsal.NeuronGuidedBackprop(net, nn.ReLU())
    with pytest.raises(ValueError, match="device_ids"):
        fastsal.NeuronGradient(net, net.relu2, device_ids=[0, 1])
    attrib = fastsal.NeuronGuidedBackprop(net, net.relu2)
    with pytest.raises(IndexError, match="index 6 is out of range for dimension 1"):
        attrib.attribute(x, (6, 0, 0))
    with pytest.raises(ValueError, match="4 indices"):
        attrib.attribute(x, (0, 0, 0, 0))
    with pytest.raises(TypeError, match="neuron_selector"):
        attrib.attribute(x, "channel 0")
    unused = nn.Linear(2, 2)
    net.spare = unused  # a registered module the forward never calls
    with pytest.raises(ValueError, match="not called"):
        fastsal.NeuronGuidedBackprop(net, unused).attribute(x, 0)


# ----- the caller's tensors and model are left alone; the rewrite is made once --------------------------


def test_caller_tensors_and_model_untouched_under_no_grad_and_inference_mode():
    torch.manual_seed(5)
    net = BNNet().eval()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    expected = fastsal.GuidedBackprop(net).attribute(x.detach(), target=1)
    with torch.no_grad():
        got = fastsal.GuidedBackprop(net).attribute(x, target=1)
    assert torch.equal(got, expected)
    assert x.grad is None and x.requires_grad and not got.requires_grad
    with torch.inference_mode():
        xi = x.detach().clone()
        got_inf = fastsal.NeuronGuidedBackprop(net, net.relu2).attribute(xi, (0, 0, 0))
    ref = fastsal.NeuronGuidedBackprop(net, net.relu2).attribute(x.detach(), (0, 0, 0))
    assert torch.equal(got_inf, ref)
    assert all(p.grad is None for p in net.parameters())
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())
    assert not net.training
    assert all(not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks for m in net.modules())


def test_rewrite_once_and_again_when_the_model_changes(monkeypatch):
    import sys

    rw = sys.modules["fastsal.rewrite"]  # the module (fastsal.rewrite is also the function's name)
    calls = []
    real = rw.rewrite
    monkeypatch.setattr(rw, "rewrite", lambda model, rule, **kw: calls.append(rule) or real(model, rule, **kw))
    torch.manual_seed(6)
    net = PoolNet().eval()
    x = torch.randn(2, 3, 16, 16)
    gb = fastsal.GuidedBackprop(net)
    first = gb.attribute(x, target=0)
    assert torch.equal(gb.attribute(x, target=0), first)
    assert len(calls) == 1
    with torch.no_grad():
        net.fc.weight.mul_(-1.0)  # in place: the rewrite shares this storage, but a cache key must change
    changed = gb.attribute(x, target=0)
    assert len(calls) == 2
    fresh = fastsal.GuidedBackprop(net).attribute(x, target=0)
    assert torch.equal(changed, fresh) and not torch.equal(changed, first)


@quiet_captum
@pytest.mark.parametrize("name,ours", CLASS_PAIRS)
@pytest.mark.parametrize("nt_type", ["smoothgrad", "vargrad"])
def test_captum_noise_tunnel_wraps_fastsal_classes(name, ours, nt_type):
    torch.manual_seed(7)
    net = PoolNet().eval()
    x = torch.randn(2, 3, 16, 16)
    torch.manual_seed(8)
    got = captum_attr.NoiseTunnel(ours(net)).attribute(x, nt_type=nt_type, nt_samples=3, stdevs=0.1, target=[1, 2])
    torch.manual_seed(8)
    theirs = getattr(captum_attr, name)(net)
    want = captum_attr.NoiseTunnel(theirs).attribute(x, nt_type=nt_type, nt_samples=3, stdevs=0.1, target=[1, 2])
    assert _rel(got, want) <= 1e-5


class GridOutput(nn.Module):
    """A model with a (N, 2, 3) output, for Captum's tuple and list-of-tuple targets."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 6)

    def forward(self, x):
        return torch.relu(self.lin(x)).view(-1, 2, 3)


@pytest.mark.parametrize(
    "target,pick",
    [
        ((1, 2), lambda out: out[:, 1, 2]),
        ((-1, 0), lambda out: out[:, 1, 0]),
        ([(0, 1), (1, 2), (0, 0)], lambda out: torch.stack([out[0, 0, 1], out[1, 1, 2], out[2, 0, 0]])),
        (torch.tensor(1), None),  # one class for all samples selects a (2,)-row per sample: an error
    ],
)
def test_captum_target_forms_on_a_3d_output(target, pick):
    torch.manual_seed(9)
    net = GridOutput()
    x = torch.randn(3, 4)
    if pick is None:
        with pytest.raises(ValueError, match="one number per sample"):
            fastsal.Saliency(net).attribute(x, target=target)
        return
    xr = x.clone().requires_grad_()
    pick(net(xr)).sum().backward()
    got = fastsal.GuidedBackprop(net).attribute(x, target=target)
    with pytest.raises(IndexError, match="dimension 2 .* of the model output"):
        fastsal.Saliency(net).attribute(x, target=(0, 3))
    ref = fastsal.Saliency(net).attribute(x, target=target, abs=False)
    assert torch.allclose(ref, xr.grad, atol=1e-6)
    assert got.shape == x.shape
