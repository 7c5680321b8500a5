"""The functional call sites: a ``TorchFunctionMode`` active while a rewritten model runs.

Module swaps cannot reach ``F.relu(x)`` written inside a ``forward`` (torchvision's GoogLeNet,
Inception and DenseNet do this), so the rewritten model runs its forward inside
:class:`SaliencyMode`, which sees every torch function call and sends the ReLU-family
(relu, relu6, hardtanh with min_val 0, leaky_relu, in place or not), max-pool, conv, linear and
eval batch-norm calls to fastsal's ops, and with ``activations="all"`` the smooth activations
(silu, gelu, ...) to :mod:`fastsal.smooth`.

Why a mode and not patching ``torch.nn.functional``: modes are thread-local, so two threads
running two rewritten models (two rules) never see each other's rule, and nothing outside
the rewritten model's forward changes. ``torch.compile`` traces through the mode.

Calls made while autograd is not recording pass through untouched: the rule cannot matter
then, and this is also what keeps the mode out of fastsal's own autograd functions (their
``forward`` runs with grad disabled and calls ``F.conv2d`` and friends itself).
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from fastsal import ops, smooth
from fastsal.bn import eval_batch_norm
from fastsal.report import KEPT, NO_RULE, RELU_LIKE, RewriteReport
from fastsal.rules import Rule

Tensor = torch._C.TensorBase  # where Tensor.relu and friends live: the objects the mode is handed


def _arg(args: tuple, kwargs: dict, index: int, name: str, default: Any) -> Any:
    """Positional-or-keyword argument ``name`` of a call."""
    if len(args) > index:
        return args[index]
    return kwargs.get(name, default)


def _float_tensor(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and x.is_floating_point()


def _needs_grad(*tensors: Any) -> bool:
    return any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


# ----- handlers: (rule, args, kwargs) -> result, or None to run the original call -----------------
# A handler returns None when fastsal cannot take the call; the mode then records why.


def _relu(rule: Rule, args: tuple, kwargs: dict, inplace: bool):
    x = args[0] if args else kwargs.get("input")
    if not _float_tensor(x):
        return None
    return ops.relu(x, rule, inplace=inplace)


def _f_relu(rule, args, kwargs):
    return _relu(rule, args, kwargs, bool(_arg(args, kwargs, 1, "inplace", False)))


def _relu_out_of_place(rule, args, kwargs):
    return _relu(rule, args, kwargs, False)


def _relu_in_place(rule, args, kwargs):
    return _relu(rule, args, kwargs, True)


def _max_pool2d(rule, args, kwargs):
    x = _arg(args, kwargs, 0, "input", None)
    kernel = _arg(args, kwargs, 1, "kernel_size", None)
    if not _float_tensor(x) or x.dim() not in (3, 4) or _arg(args, kwargs, 6, "return_indices", False):
        return None
    k = tuple(kernel) if isinstance(kernel, (tuple, list)) else (kernel, kernel)
    if len(k) == 1:
        k = (k[0], k[0])
    if k[0] * k[1] > ops.MAX_WINDOW:
        return None
    stride = _arg(args, kwargs, 2, "stride", None)
    return ops.max_pool2d(
        x,
        kernel,
        stride if stride is not None and stride != [] and stride != () else None,
        _arg(args, kwargs, 3, "padding", 0),
        _arg(args, kwargs, 4, "dilation", 1),
        bool(_arg(args, kwargs, 5, "ceil_mode", False)),
    )


def _conv2d(rule, args, kwargs):
    x, weight = _arg(args, kwargs, 0, "input", None), _arg(args, kwargs, 1, "weight", None)
    bias = _arg(args, kwargs, 2, "bias", None)
    # a weight computed from something that needs grad (dynamic convolution) must keep its gradient path
    if not _float_tensor(x) or x.dim() not in (3, 4) or _needs_grad(weight, bias):
        return None
    return ops.conv2d(
        x,
        weight,
        bias,
        _arg(args, kwargs, 3, "stride", 1),
        _arg(args, kwargs, 4, "padding", 0),
        _arg(args, kwargs, 5, "dilation", 1),
        _arg(args, kwargs, 6, "groups", 1),
    )


def _linear(rule, args, kwargs):
    x, weight = _arg(args, kwargs, 0, "input", None), _arg(args, kwargs, 1, "weight", None)
    bias = _arg(args, kwargs, 2, "bias", None)
    if not _float_tensor(x) or x.dim() == 0 or _needs_grad(weight, bias):
        return None
    return ops.linear(x, weight, bias)


def _batch_norm(rule, args, kwargs):
    x = _arg(args, kwargs, 0, "input", None)
    mean, var = _arg(args, kwargs, 1, "running_mean", None), _arg(args, kwargs, 2, "running_var", None)
    weight, bias = _arg(args, kwargs, 3, "weight", None), _arg(args, kwargs, 4, "bias", None)
    training = _arg(args, kwargs, 5, "training", False)
    if training or mean is None or var is None or not _float_tensor(x) or _needs_grad(mean, var, weight, bias):
        return None
    return eval_batch_norm(x, mean, var, weight, bias, _arg(args, kwargs, 7, "eps", 1e-5))


class _Declined:
    """A handler's answer for a call it recognises but must leave alone: the report's category and why."""

    def __init__(self, category: str, why: str):
        self.category, self.why = category, why


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _clipped(rule, x, max_value, inplace):
    if not _float_tensor(x):
        return None
    return ops.clipped_relu(x, rule, float(max_value), inplace=bool(inplace))


def _f_relu6(rule, args, kwargs):
    return _clipped(rule, _arg(args, kwargs, 0, "input", None), 6.0, _arg(args, kwargs, 1, "inplace", False))


def _hardtanh_call(rule, args, kwargs, inplace):
    low, high = _arg(args, kwargs, 1, "min_val", -1.0), _arg(args, kwargs, 2, "max_val", 1.0)
    if not (_number(low) and _number(high)):
        return None
    if low != 0:
        return _Declined(NO_RULE, f"hardtanh with min_val={low:g} is not ReLU-like (a clipped ReLU has min_val 0): "
                                  "ordinary gradient")
    if not high > 0:
        return None
    return _clipped(rule, _arg(args, kwargs, 0, "input", None), high, inplace)


def _f_hardtanh(rule, args, kwargs):
    return _hardtanh_call(rule, args, kwargs, _arg(args, kwargs, 3, "inplace", False))


def _hardtanh_in_place(rule, args, kwargs):
    return _hardtanh_call(rule, args, kwargs, True)


def _leaky(rule, args, kwargs, inplace):
    x, slope = _arg(args, kwargs, 0, "input", None), _arg(args, kwargs, 1, "negative_slope", 0.01)
    if not _float_tensor(x) or not _number(slope):
        return None
    return ops.leaky_relu(x, rule, float(slope), inplace=bool(inplace))


def _f_leaky_relu(rule, args, kwargs):
    return _leaky(rule, args, kwargs, _arg(args, kwargs, 2, "inplace", False))


def _leaky_relu_in_place(rule, args, kwargs):
    return _leaky(rule, args, kwargs, True)


def _smooth(name: str, params: Callable[[tuple, dict], tuple], inplace: Callable[[tuple, dict], bool]):
    """A handler for a smooth activation: ``params``/``inplace`` read the call's own arguments."""

    def handler(rule, args, kwargs):
        x = _arg(args, kwargs, 0, "input", None)
        p = params(args, kwargs)
        if not _float_tensor(x) or not all(_number(v) or isinstance(v, str) for v in p):
            return None
        return smooth.activation(x, rule, name, p, bool(inplace(args, kwargs)))

    return handler


def _no_params(args, kwargs):
    return ()


def _alpha(args, kwargs):
    return (_arg(args, kwargs, 1, "alpha", 1.0),)


def _inplace_at(index: int):
    return lambda args, kwargs: _arg(args, kwargs, index, "inplace", False)


def _always(args, kwargs):
    return True


def _clamp_is_relu_like(args, kwargs) -> bool:
    low = _arg(args, kwargs, 1, "min", None)
    return isinstance(low, (int, float)) and low == 0


Handler = Callable[[Rule, tuple, dict], Optional[torch.Tensor]]

# func object the mode is handed -> (name in the report, handler, why a None from the handler is fine)
_REWRITTEN: Dict[Any, Tuple[str, Handler, str]] = {
    F.relu: ("F.relu", _f_relu, "not a floating-point tensor"),
    torch.relu: ("torch.relu", _relu_out_of_place, "not a floating-point tensor"),
    torch.relu_: ("torch.relu_", _relu_in_place, "not a floating-point tensor"),  # F.relu_ is torch.relu_
    Tensor.relu: ("Tensor.relu", _relu_out_of_place, "not a floating-point tensor"),
    Tensor.relu_: ("Tensor.relu_", _relu_in_place, "not a floating-point tensor"),
    torch.ops.aten.relu.default: ("aten.relu", _relu_out_of_place, "not a floating-point tensor"),
    torch.ops.aten.relu_.default: ("aten.relu_", _relu_in_place, "not a floating-point tensor"),
    F.max_pool2d: ("F.max_pool2d", _max_pool2d, "returns indices, window over 127 positions, or not 3-D/4-D"),
    torch.max_pool2d: ("torch.max_pool2d", _max_pool2d, "window over 127 positions, or not 3-D/4-D"),
    torch.conv2d: ("F.conv2d", _conv2d, "its weight needs grad (computed from the input?), or not 3-D/4-D"),
    F.linear: ("F.linear", _linear, "its weight needs grad (computed from the input?)"),
    F.batch_norm: ("F.batch_norm", _batch_norm, "training mode (batch statistics)"),
    # the rest of the ReLU family: one mask bit per element, as ReLU
    F.relu6: ("F.relu6", _f_relu6, "not a floating-point tensor"),
    F.hardtanh: ("F.hardtanh", _f_hardtanh, "bounds not numbers, or not a floating-point tensor"),
    F.hardtanh_: ("F.hardtanh_", _hardtanh_in_place, "bounds not numbers, or not a floating-point tensor"),
    F.leaky_relu: ("F.leaky_relu", _f_leaky_relu, "slope not a number, or not a floating-point tensor"),
    F.leaky_relu_: ("F.leaky_relu_", _leaky_relu_in_place, "slope not a number, or not a floating-point tensor"),
}
# what a rewritten call becomes, in the report (default: "fastsal <name>"), and the calls that apply the rule
_ACTION = {F.relu6: "fastsal clipped_relu", F.hardtanh: "fastsal clipped_relu", F.hardtanh_: "fastsal clipped_relu",
           F.leaky_relu: "fastsal leaky_relu", F.leaky_relu_: "fastsal leaky_relu"}
_RULE_SITES = {F.relu, torch.relu, torch.relu_, Tensor.relu, Tensor.relu_, torch.ops.aten.relu.default,
               torch.ops.aten.relu_.default, *_ACTION}

# smooth activations: rewritten only with activations="all" (fastsal.smooth); reported otherwise
_SMOOTH: Dict[Any, Tuple[str, Handler]] = {
    F.silu: ("F.silu", _smooth("silu", _no_params, _inplace_at(1))),
    F.gelu: ("F.gelu", _smooth("gelu", lambda a, k: (_arg(a, k, 1, "approximate", "none"),), lambda a, k: False)),
    F.hardswish: ("F.hardswish", _smooth("hardswish", _no_params, _inplace_at(1))),
    F.mish: ("F.mish", _smooth("mish", _no_params, _inplace_at(1))),
    F.elu: ("F.elu", _smooth("elu", _alpha, _inplace_at(2))),
    F.elu_: ("F.elu_", _smooth("elu", _alpha, _always)),
    F.celu: ("F.celu", _smooth("celu", _alpha, _inplace_at(2))),
    torch.celu: ("torch.celu", _smooth("celu", _alpha, lambda a, k: False)),
    torch.celu_: ("torch.celu_", _smooth("celu", _alpha, _always)),
    F.selu: ("F.selu", _smooth("selu", _no_params, _inplace_at(1))),
    torch.selu: ("torch.selu", _smooth("selu", _no_params, lambda a, k: False)),
    torch.selu_: ("torch.selu_", _smooth("selu", _no_params, _always)),
    F.softplus: ("F.softplus", _smooth("softplus", lambda a, k: (_arg(a, k, 1, "beta", 1.0), _arg(a, k, 2, "threshold", 20.0)),
                                       lambda a, k: False)),
}
_REWRITTEN_CATEGORY = {F.max_pool2d: KEPT, torch.max_pool2d: KEPT, torch.conv2d: KEPT, F.linear: KEPT, F.batch_norm: KEPT}

# calls fastsal leaves alone but reports: func -> (name, category, why)
_REPORTED: Dict[Any, Tuple[str, str, str]] = {
    F.threshold: ("F.threshold", RELU_LIKE, "ReLU-like with no saliency rule: ordinary gradient"),
    F.max_pool2d_with_indices: ("F.max_pool2d_with_indices", KEPT, "returns indices: plain autograd pool"),
}
SMOOTH_LEFT = "smooth activation, given the rule only with activations='all': ordinary gradient"
GATE_LEFT = "saturating gate (squeeze-excitation, attention) with no saliency rule: ordinary gradient"
for _func, (_name, _handler) in _SMOOTH.items():
    _REPORTED[_func] = (_name, NO_RULE, SMOOTH_LEFT)
for _func, _name, _why in (
    (F.prelu, "F.prelu", "activation with no saliency rule: ordinary gradient"),
    (F.rrelu, "F.rrelu", "activation with no saliency rule: ordinary gradient"),
    (F.hardsigmoid, "F.hardsigmoid", GATE_LEFT), (torch.sigmoid, "torch.sigmoid", GATE_LEFT),
    (Tensor.sigmoid, "Tensor.sigmoid", GATE_LEFT), (torch.tanh, "torch.tanh", GATE_LEFT), (Tensor.tanh, "Tensor.tanh", GATE_LEFT),
):
    _REPORTED[_func] = (_name, NO_RULE, _why)
_CLAMPS = {torch.clamp: "torch.clamp", Tensor.clamp: "Tensor.clamp", torch.clamp_min: "torch.clamp_min",
           Tensor.clamp_min: "Tensor.clamp_min"}

_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_TORCH_MODULES_DIR = os.path.join(_TORCH_DIR, "nn", "modules") + os.sep
_FASTSAL_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _call_site() -> Optional[str]:
    """``file.py:line`` of the user code making the current call, or None when an ``nn`` module
    of torch's own makes it (those are reported as modules when the model is rewritten)."""
    frame = sys._getframe(2)
    while frame is not None:
        filename = frame.f_code.co_filename
        if filename.startswith(_TORCH_MODULES_DIR):
            return None
        if not (filename.startswith(_TORCH_DIR) or filename.startswith(_FASTSAL_DIR)):
            return f"{os.path.basename(filename)}:{frame.f_lineno} in {frame.f_code.co_name}"
        frame = frame.f_back
    return None


class SaliencyMode(TorchFunctionMode):
    """Sends functional ReLU / max-pool / conv / linear / eval batch-norm calls to fastsal's ops.

    ``rule=None`` makes a region where nothing is rewritten (a module ``filter_fn`` excluded):
    calls run as they are, hidden from any SaliencyMode further down the stack.
    """

    def __init__(self, rule: Optional[Rule], report: Optional[RewriteReport] = None, strict: bool = False,
                 activations: str = "relu"):
        super().__init__()
        self.rule = rule
        self.report = report
        self.strict = strict
        self.smooth = activations == "all"  # smooth activations get the rule too

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.rule is None:
            with torch._C.DisableTorchFunction():
                return func(*args, **kwargs)
        if not torch.is_grad_enabled():
            return func(*args, **kwargs)
        rewritten = _REWRITTEN.get(func)
        if rewritten is None and self.smooth and func in _SMOOTH:
            rewritten = (*_SMOOTH[func], "not a floating-point tensor, or parameters not numbers")
        if rewritten is not None:
            name, handler, why_not = rewritten
            out = handler(self.rule, args, kwargs)
            if isinstance(out, torch.Tensor):
                rule_site = func in _RULE_SITES or func in _SMOOTH
                action = _ACTION.get(func, f"fastsal {name.split('.')[-1].rstrip('_')}")
                self._record(name, action + (f" ({self.rule})" if rule_site else ""), None, rule_site)
                return out
            if isinstance(out, _Declined):
                self._record(name, out.why, out.category)
            else:
                self._record(name, why_not, _REWRITTEN_CATEGORY.get(func, NO_RULE if func in _SMOOTH else KEPT))
            return func(*args, **kwargs)
        reported = _REPORTED.get(func)
        if reported is not None:
            self._record(reported[0], reported[2], reported[1])
        elif func in _CLAMPS and _clamp_is_relu_like(args, kwargs):
            self._record(_CLAMPS[func], "clamp at 0 (ReLU-like) with no saliency rule: ordinary gradient", RELU_LIKE)
        return func(*args, **kwargs)

    def _record(self, kind: str, action: str, category: Optional[str], rule_site: bool = False) -> None:
        if self.report is None or torch.compiler.is_compiling():
            return
        where = _call_site()
        if where is None:
            return
        if category == RELU_LIKE and self.strict:
            raise RuntimeError(
                f"strict rewrite: {kind} at {where} is ReLU-like but has no saliency rule, so it would keep its "
                "ordinary gradient; replace it with a ReLU, or rewrite with strict=False to accept that"
            )
        self.report.add_call(where, kind, action, category, rule_site)
