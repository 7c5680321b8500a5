"""The shared table of test models, and an independent per-call reference for the three rules.

``SMALL_MODELS[name]()`` returns ``(model in eval mode, input shape)``; ``ZOO`` lists the
torchvision models with their constructor arguments and input size. ``reference_input_grad``
computes the saliency map with plain autograd, every ReLU call replaced by a per-call
``autograd.Function`` applying the rule (written here again, independent of fastsal); so are
the rest of the ReLU family (ReLU6, hardtanh(0, m), leaky_relu) and, with ``activations="all"``,
the smooth activations (SiLU, GELU, ..., whose local derivative comes from autograd itself).

Import as ``from models import ...`` (tests/ is on sys.path via conftest.py).
"""

from __future__ import annotations

import contextlib
import zlib
from typing import Callable, Dict, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

RULES = ("gradient", "deconvnet", "guided")

# ----- the reference --------------------------------------------------------------------------------


class RuleBox:
    """The rule the reference ReLUs apply, read at backward time: one forward serves all three rules."""

    def __init__(self, rule: str):
        self.rule = rule


class RuleReLUFunction(torch.autograd.Function):
    """relu(x) whose backward applies ``box.rule`` to the gradient reaching this call only."""

    @staticmethod
    def forward(ctx, x, box):
        positive = x > 0
        ctx.save_for_backward(positive)
        ctx.box = box
        return torch.where(positive, x, torch.zeros_like(x))

    @staticmethod
    def backward(ctx, grad):
        (positive,) = ctx.saved_tensors
        zero = torch.zeros_like(grad)
        rule = ctx.box.rule
        if rule == "gradient":
            keep = positive
        elif rule == "deconvnet":
            keep = grad > 0
        elif rule == "guided":
            keep = positive & (grad > 0)
        else:
            raise ValueError(rule)
        return torch.where(keep, grad, zero), None


def rule_relu(x: torch.Tensor, rule, inplace: bool = False) -> torch.Tensor:
    out = RuleReLUFunction.apply(x, rule if isinstance(rule, RuleBox) else RuleBox(rule))
    if inplace:  # keep in-place semantics: whoever holds x sees the ReLU'd values
        x.copy_(out)
        return x
    return out


def _keep(grad: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    return torch.where(keep, grad, torch.zeros_like(grad))


class RuleClippedReLUFunction(torch.autograd.Function):
    """hardtanh(x, 0, m) (ReLU6 for m = 6): the local derivative is [0 < f < m]."""

    @staticmethod
    def forward(ctx, x, max_value, box):
        ctx.save_for_backward((x > 0) & (x < max_value))
        ctx.box = box
        return torch.clamp(x, 0, max_value)

    @staticmethod
    def backward(ctx, grad):
        (inside,) = ctx.saved_tensors
        rule = ctx.box.rule
        keep = {"gradient": inside, "deconvnet": grad > 0, "guided": inside & (grad > 0)}[rule]
        return _keep(grad, keep), None, None


class RuleLeakyReLUFunction(torch.autograd.Function):
    """leaky_relu(x, α): the local derivative is 1 where f > 0, α elsewhere."""

    @staticmethod
    def forward(ctx, x, slope, box):
        ctx.save_for_backward(x > 0)
        ctx.slope, ctx.box = slope, box
        return torch.where(x > 0, x, x * slope)

    @staticmethod
    def backward(ctx, grad):
        (positive,) = ctx.saved_tensors
        rule = ctx.box.rule
        if rule == "deconvnet":
            return _keep(grad, grad > 0), None, None
        if rule == "guided":
            grad = _keep(grad, grad > 0)
        return torch.where(positive, grad, grad * ctx.slope), None, None


class RuleSmoothFunction(torch.autograd.Function):
    """A smooth activation φ (a callable): gradient R·φ'(f), guided R·φ'(f)·[R>0], deconvnet relu(R),
    with R·φ'(f) taken from autograd through φ itself."""

    @staticmethod
    def forward(ctx, x, fn, box):
        ctx.f = x.detach().clone()  # a copy: an in-place call overwrites x
        ctx.fn, ctx.box = fn, box
        return fn(x)

    @staticmethod
    def backward(ctx, grad):
        x = ctx.f
        rule = ctx.box.rule
        if rule in ("deconvnet", "guided"):
            grad = _keep(grad, grad > 0)
        if rule == "deconvnet":
            return grad, None, None
        with torch.enable_grad(), torch._C.DisableTorchFunction():  # φ itself, whatever mode is active
            f = x.detach().requires_grad_(True)
            (local,) = torch.autograd.grad(ctx.fn(f), f, grad)
        return local, None, None


def _in_place(x: torch.Tensor, out: torch.Tensor, inplace: bool) -> torch.Tensor:
    if inplace:  # keep in-place semantics: whoever holds x sees the new values
        x.copy_(out)
        return x
    return out


def _arg(args, kwargs, i, name, default):
    return args[i] if len(args) > i else kwargs.get(name, default)


# smooth functional forms -> (out-of-place function, position of its inplace flag or None, always in place)
_SMOOTH_FORMS = {
    F.silu: (F.silu, 1, False), F.hardswish: (F.hardswish, 1, False), F.mish: (F.mish, 1, False),
    F.gelu: (F.gelu, None, False), F.softplus: (F.softplus, None, False),
    F.elu: (F.elu, 2, False), F.elu_: (F.elu, None, True), F.celu: (F.celu, 2, False),
    torch.celu: (torch.celu, None, False), torch.celu_: (torch.celu, None, True),
    F.selu: (F.selu, 1, False), torch.selu: (torch.selu, None, False), torch.selu_: (torch.selu, None, True),
}


def _smooth_call(func, args, kwargs, box):
    fn, flag_at, always = _SMOOTH_FORMS[func]
    x = args[0] if args else kwargs["input"]
    rest = list(args[1:])
    kw = {k: v for k, v in kwargs.items() if k not in ("input", "inplace")}
    inplace = always
    if flag_at is not None and len(args) > flag_at:
        inplace = bool(args[flag_at])
        rest = rest[: flag_at - 1]
    elif flag_at is not None:
        inplace = bool(kwargs.get("inplace", False))
    out = RuleSmoothFunction.apply(x, lambda t: fn(t, *rest, **kw), box)
    return _in_place(x, out, inplace)


class ReferenceReLU(nn.Module):
    def __init__(self, rule: str, inplace: bool = False):
        super().__init__()
        self.rule, self.inplace = rule, inplace

    def forward(self, x):
        return rule_relu(x, self.rule, self.inplace)


class _ReferenceMode(TorchFunctionMode):
    """Every ReLU-family call, whatever its form, becomes a per-call rule Function; with
    ``activations="all"`` the smooth activations too."""

    def __init__(self, rule, activations: str = "relu"):
        super().__init__()
        self.rule = rule if isinstance(rule, RuleBox) else RuleBox(rule)
        self.smooth = activations == "all"

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.relu:
            inplace = args[1] if len(args) > 1 else kwargs.get("inplace", False)
            return rule_relu(args[0] if args else kwargs["input"], self.rule, inplace)
        if func in (torch.relu, torch.Tensor.relu, torch.ops.aten.relu.default):
            return rule_relu(args[0], self.rule)
        if func in (torch.relu_, torch.Tensor.relu_, torch.ops.aten.relu_.default):
            return rule_relu(args[0], self.rule, inplace=True)
        x = args[0] if args else kwargs.get("input")
        if func is F.relu6:
            out = RuleClippedReLUFunction.apply(x, 6.0, self.rule)
            return _in_place(x, out, _arg(args, kwargs, 1, "inplace", False))
        if func in (F.hardtanh, F.hardtanh_) and _arg(args, kwargs, 1, "min_val", -1.0) == 0:
            out = RuleClippedReLUFunction.apply(x, _arg(args, kwargs, 2, "max_val", 1.0), self.rule)
            return _in_place(x, out, func is F.hardtanh_ or _arg(args, kwargs, 3, "inplace", False))
        if func in (F.leaky_relu, F.leaky_relu_):
            out = RuleLeakyReLUFunction.apply(x, _arg(args, kwargs, 1, "negative_slope", 0.01), self.rule)
            return _in_place(x, out, func is F.leaky_relu_ or _arg(args, kwargs, 2, "inplace", False))
        if self.smooth and func in _SMOOTH_FORMS:
            return _smooth_call(func, args, kwargs, self.rule)
        return func(*args, **kwargs)


@contextlib.contextmanager
def reference_rule(rule: str):
    """Run a model with every ReLU call following ``rule`` (plain autograd otherwise)."""
    with _ReferenceMode(rule):
        yield


def _seed(out: torch.Tensor, target) -> torch.Tensor:
    if target is None:
        return out.sum()
    return out[torch.arange(out.shape[0]), torch.as_tensor(target)].sum() if not isinstance(target, int) else out[:, target].sum()


def input_grad(model: nn.Module, x: torch.Tensor, target=0) -> torch.Tensor:
    """Gradient of the target logit(s) with respect to the input, by plain autograd on ``model``."""
    x = x.detach().clone().requires_grad_(True)
    out = model(x)
    (grad,) = torch.autograd.grad(_seed(out, target), x)
    return grad


def reference_input_grad(model: nn.Module, x: torch.Tensor, rule: str, target=0) -> torch.Tensor:
    with reference_rule(rule):
        return input_grad(model, x, target)


def reference_input_grads(model: nn.Module, x: torch.Tensor, rules=RULES, target=0, dtype=torch.float64,
                          activations: str = "relu"):
    """``{rule: input gradient}`` from one forward of a ``dtype`` copy of ``model`` (the original is untouched).

    float64 by default: fastsal's float32 maps are then measured against the exact answer, not
    against another float32 run whose rounding may flip a ReLU mask of its own.
    """
    import copy

    ref_model = copy.deepcopy(model).to(dtype)
    box = RuleBox(rules[0])
    xr = x.detach().to(dtype).requires_grad_(True)
    with _ReferenceMode(box, activations):
        seed = _seed(ref_model(xr), target)
    grads = {}
    for i, rule in enumerate(rules):
        box.rule = rule
        (grads[rule],) = torch.autograd.grad(seed, xr, retain_graph=i < len(rules) - 1)
    return grads


def rel_l2(actual: torch.Tensor, expected: torch.Tensor) -> float:
    a, e = actual.double(), expected.double()
    denom = float(e.norm())
    return float((a - e).norm()) / denom if denom > 0 else float((a - e).norm())


# ----- small models: one per ReLU form and pattern ------------------------------------------------------


def randomize_batch_norm(model: nn.Module, generator: torch.Generator | None = None) -> nn.Module:
    """Give every BatchNorm random statistics and affine parameters (fresh ones are the identity)."""
    g = generator or torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
                    m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(c, generator=g) * 1.0 + 0.5)
                    m.bias.copy_(torch.randn(c, generator=g) * 0.1)
    return model


_RELU_FORMS: Dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "F.relu": lambda x: F.relu(x),
    "F.relu_": lambda x: F.relu_(x),
    "F.relu(inplace=True)": lambda x: F.relu(x, inplace=True),
    "torch.relu": lambda x: torch.relu(x),
    "torch.relu_": lambda x: torch.relu_(x),
    "Tensor.relu": lambda x: x.relu(),
    "Tensor.relu_": lambda x: x.relu_(),
    "aten.relu": lambda x: torch.ops.aten.relu.default(x),
}


class FunctionalReLUNet(nn.Module):
    """conv → relu → conv → relu → pool → linear, the ReLUs written as ``form``."""

    def __init__(self, form: str):
        super().__init__()
        self.form = form
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        relu = _RELU_FORMS[self.form]
        x = relu(self.conv1(x))
        x = relu(self.conv2(x))
        x = F.max_pool2d(x, 2)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 4), 1))


class ReusedReLUNet(nn.Module):
    """One nn.ReLU module called three times (as torchvision's ResNet blocks do)."""

    def __init__(self, inplace: bool):
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3)])
        self.relu = nn.ReLU(inplace=inplace)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        for conv in self.convs:
            x = self.relu(conv(x))
        return self.fc(x.mean((2, 3)))


class SharedInputSkipNet(nn.Module):
    """``conv(relu(a)) + a``: the ReLU's input also feeds the skip connection (Captum gets this wrong)."""

    def __init__(self):
        super().__init__()
        self.conv0 = nn.Conv2d(3, 8, 3, padding=1)
        self.relu = nn.ReLU()
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        a = self.conv0(x)
        b = self.conv1(self.relu(a)) + a
        return self.fc(F.relu(b).mean((2, 3)))


class ResidualBlockNet(nn.Module):
    """A ResNet-style block written out: conv1/bn1 pairs found by tracing, not by a Sequential."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True))
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.stem(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = self.relu(out + x)
        return self.fc(out.mean((2, 3)))


class PreActNet(nn.Module):
    """DenseNet-style BN → ReLU → conv: no conv feeds the BatchNorm, so it cannot be folded."""

    def __init__(self):
        super().__init__()
        self.conv0 = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.BatchNorm2d(8)
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
        self.norm_f = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.conv0(x)  # also read by the concatenation, so conv0 does not feed the BatchNorm alone
        x = torch.cat([self.conv1(F.relu(self.norm(x))), x], 1)[:, 4:12]
        return self.fc(F.relu(self.norm_f(x), inplace=True).mean((2, 3)))


def _head(channels: int, classes: int = 10) -> nn.Sequential:
    return nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(channels * 4, classes))


def _vgg_like() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 6 * 6, 32), nn.ReLU(), nn.Linear(32, 10),
    )


SMALL_MODELS: Dict[str, Callable[[], Tuple[nn.Module, Tuple[int, ...]]]] = {}


def _register(name: str, shape=(2, 3, 24, 24)):
    def wrap(factory):
        def build():
            torch.manual_seed(zlib.crc32(name.encode()))
            return randomize_batch_norm(factory()).eval(), shape

        SMALL_MODELS[name] = build
        return factory

    return wrap


for _form in _RELU_FORMS:
    _register(f"functional[{_form}]")(lambda form=_form: FunctionalReLUNet(form))

_register("nn.ReLU")(lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), _head(8)))
_register("nn.ReLU(inplace=True)")(
    lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(inplace=True), nn.Conv2d(8, 8, 3), nn.ReLU(inplace=True), _head(8))
)
_register("reused nn.ReLU")(lambda: ReusedReLUNet(inplace=False))
_register("reused nn.ReLU(inplace=True)")(lambda: ReusedReLUNet(inplace=True))
_register("shared-input skip")(SharedInputSkipNet)
_register("overlapping pools", shape=(2, 3, 25, 25))(
    lambda: nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.ReLU(), nn.MaxPool2d(3, stride=2, padding=1),  # fused, overlapping
        nn.Conv2d(8, 8, 3), nn.MaxPool2d(3, stride=2), nn.ReLU(),  # pool then relu
        _head(8),
    )
)
_register("ceil-mode pools", shape=(2, 3, 23, 23))(
    lambda: nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.ReLU(), nn.MaxPool2d(2, stride=2, ceil_mode=True),
        nn.Conv2d(8, 8, 3), nn.ReLU(), nn.MaxPool2d(3, stride=2, ceil_mode=True),
        _head(8),
    )
)
_register("pool then relu")(
    lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.MaxPool2d(2), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.MaxPool2d(2), nn.ReLU(), _head(8))
)
_register("relu->maxpool sequential (vgg-like)")(_vgg_like)
_register("conv+bn eval (sequential)")(
    lambda: nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(), _head(8)
    )
)
_register("conv+bn eval (resnet-style block)")(ResidualBlockNet)
_register("bn before relu (densenet-style)")(PreActNet)
_register("SiLU/GELU/ReLU6 and a ReLU")(
    lambda: nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.SiLU(), nn.Conv2d(8, 8, 3), nn.GELU(), nn.Conv2d(8, 8, 3), nn.ReLU6(),
        nn.Conv2d(8, 8, 3), nn.ReLU(), _head(8),
    )
)
_register("no relu")(lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.Tanh(), nn.MaxPool2d(2), nn.Conv2d(8, 8, 3), _head(8)))

# models in which Captum's GuidedBackprop/Deconvolution are right: module ReLUs, not in place, no shared input
CAPTUM_SAFE = ("nn.ReLU", "relu->maxpool sequential (vgg-like)", "conv+bn eval (sequential)", "pool then relu")


# ----- the torchvision zoo -------------------------------------------------------------------------------

# name -> (constructor kwargs, input side); weights=None everywhere: nothing is downloaded
ZOO: Dict[str, Tuple[dict, int]] = {
    "alexnet": ({}, 64),
    "vgg11_bn": ({}, 64),
    "vgg16": ({}, 64),
    "resnet18": ({}, 64),
    "resnet50": ({}, 64),
    "resnext50_32x4d": ({}, 64),
    "densenet121": ({}, 64),
    "googlenet": ({"aux_logits": False, "init_weights": True}, 64),
    "inception_v3": ({"aux_logits": False, "init_weights": True}, 75),
    "squeezenet1_1": ({}, 64),
    "shufflenet_v2_x0_5": ({}, 64),
    "mnasnet0_5": ({}, 64),
    "regnet_x_400mf": ({}, 64),
    "mobilenet_v2": ({}, 64),  # ReLU6
    "mobilenet_v3_small": ({}, 64),  # Hardswish (left alone: activations="relu") beside ReLU, Hardsigmoid gates
}


def calibrate_batch_norm(model: nn.Module, x: torch.Tensor, generator: torch.Generator) -> nn.Module:
    """Random BatchNorm statistics on the scale of the model's own activations.

    Purely random statistics on a randomly initialised deep net leave most pre-ReLU values as
    tiny differences of large constants: float32 rounding then flips ReLU masks, and even two
    plain-autograd float32 runs that sum in another order disagree by several percent (GoogLeNet).
    So the statistics are first measured on ``x`` (one training-mode pass), then perturbed.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return model
    saved = [(m, m.momentum) for m in norms]
    for m in norms:
        m.momentum = 1.0  # running stats := this batch's
    model.train()
    with torch.no_grad():
        model(x)
    with torch.no_grad():
        for m, momentum in saved:
            m.momentum = momentum
            c = m.num_features
            std = m.running_var.sqrt()
            m.running_mean.add_(torch.randn(c, generator=generator) * 0.2 * std)
            m.running_var.mul_(torch.rand(c, generator=generator) * 1.5 + 0.5)
            if m.affine:
                m.weight.copy_(torch.rand(c, generator=generator) + 0.5)
                m.bias.copy_(torch.randn(c, generator=generator) * 0.2)
    return model.eval()


def zoo_model(name: str, seed: int = 0) -> Tuple[nn.Module, Tuple[int, ...]]:
    """A torchvision model with random weights and randomized BatchNorm statistics, in eval mode."""
    import torchvision

    kwargs, side = ZOO[name]
    torch.manual_seed(seed)
    model = getattr(torchvision.models, name)(weights=None, **kwargs)
    g = torch.Generator().manual_seed(seed)
    calibrate_batch_norm(model, torch.randn(4, 3, side, side, generator=g), g)
    return model.eval(), (1, 3, side, side)
