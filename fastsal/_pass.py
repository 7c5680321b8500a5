"""One saliency pass, shared by every public entry point.

* inputs: checked (floating point, finite), and turned into fresh leaves that require
  grad, so the caller's tensors (``.grad``, ``requires_grad``) are never touched; tensors
  made under ``torch.inference_mode()`` are cloned once, since autograd cannot record them;
* grad mode: the forward and backward run with grad enabled and inference mode off, so
  callers may be inside ``torch.no_grad()`` or ``torch.inference_mode()``;
* the saliency twin of a model (:func:`fastsal.rewrite.rewrite`) is made once per rule (and
  ``activations`` setting) and reused; it is made again only when the model changed (train/eval, or a parameter or
  buffer was replaced or modified in place), because folded BatchNorm copies weights.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from typing import Any, Optional, Tuple

import torch

from fastsal.rules import Rule, as_rule


def as_tuple(inputs) -> Tuple[Tuple[torch.Tensor, ...], bool]:
    """``(inputs as a tuple, whether they were given as a tuple)``."""
    if isinstance(inputs, torch.Tensor):
        return (inputs,), False
    if isinstance(inputs, (tuple, list)) and len(inputs) > 0 and all(isinstance(x, torch.Tensor) for x in inputs):
        return tuple(inputs), True
    raise TypeError(
        f"inputs must be a tensor or a non-empty tuple of tensors, got {type(inputs).__name__}"
        + (f" of {[type(x).__name__ for x in inputs]}" if isinstance(inputs, (tuple, list)) else "")
    )


def same_structure(values: Tuple[torch.Tensor, ...], was_tuple: bool):
    return tuple(values) if was_tuple else values[0]


def additional_args(extra) -> Tuple[Any, ...]:
    """Captum's ``additional_forward_args``: None -> (), a tuple as is, anything else -> (extra,)."""
    if extra is None:
        return ()
    return tuple(extra) if isinstance(extra, tuple) else (extra,)


def check_inputs(inputs: Tuple[torch.Tensor, ...], check_finite: bool = True) -> None:
    """Clear errors for integer images and for NaN/Inf values (one host sync per input)."""
    many = len(inputs) > 1
    for i, x in enumerate(inputs):
        name = f"inputs[{i}]" if many else "inputs"
        if not (x.dtype.is_floating_point):
            raise TypeError(
                f"{name} has dtype {x.dtype}; saliency needs floating-point inputs: convert images with "
                "x.float() / 255 (and the model's normalization) first"
            )
        if check_finite and x.numel():
            bad = int((~torch.isfinite(x)).sum())
            if bad:
                raise ValueError(
                    f"{name} holds {bad} NaN or Inf value(s) out of {x.numel()}; their gradients would be "
                    "meaningless. Clean the input, or pass check_finite=False to compute anyway"
                )


def leaf(x: torch.Tensor) -> torch.Tensor:
    """A new leaf tensor that requires grad and shares x's memory (cloned if x is an inference tensor)."""
    if x.is_inference():
        x = x.clone()
    return x.detach().requires_grad_(True)


def plain(value):
    """An additional forward argument made usable by autograd (inference tensors are cloned)."""
    if isinstance(value, torch.Tensor) and value.is_inference():
        return value.clone()
    return value


@contextlib.contextmanager
def grad_mode():
    """Grad on, inference mode off, whatever the caller had."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


def check_dtype(dtype) -> None:
    if dtype not in (None, torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be None, torch.float32, torch.float16 or torch.bfloat16, got {dtype}")


def run(fn, args: tuple, dtype: Optional[torch.dtype] = None):
    """``fn(*args)``; with a half-precision ``dtype``, under ``torch.autocast`` with half weights.

    fastsal's linear op saves the weight its backward needs as it got it, so under plain
    autocast a float32 weight would meet a half gradient in the backward (the backward
    runs outside the autocast region). The twin's floating-point parameters are therefore
    cast to ``dtype`` for this call (as autocast would cast them anyway) and passed with
    ``torch.func.functional_call``; autocast still keeps its float32 ops (softmax, norms,
    ...) in float32. Its weight cache is off: the weights are cast already, a CUDA graph
    capture needs it off, and in-place weight updates are seen on every call.
    """
    check_dtype(dtype)
    if dtype is None or dtype == torch.float32:
        return fn(*args)
    device_type = next((a.device.type for a in args if isinstance(a, torch.Tensor)), "cpu")
    with torch.autocast(device_type=device_type, dtype=dtype, cache_enabled=False):
        # a TorchScript module (plain autograd, no fastsal ops) needs no cast weights, and
        # functional_call refuses jitted modules
        if not isinstance(fn, torch.nn.Module) or isinstance(fn, torch.jit.ScriptModule):
            return fn(*args)
        params = {
            name: (p.to(dtype) if p.is_floating_point() else p)
            for name, p in fn.named_parameters(remove_duplicate=False)
        }
        return torch.func.functional_call(fn, params, args, tie_weights=True, strict=False)


def _state(t: torch.Tensor):
    # the storage address catches ``param.data = ...`` (``model.cuda()``, ``.half()``), which
    # keeps the Parameter object; the version counter catches in-place updates (optimizers)
    return (id(t), t._version, t.data_ptr(), t.dtype)


def _fingerprint(model: torch.nn.Module):
    """Changes when the model's mode changes or a tensor of it is replaced, moved or modified in place."""
    tensors = [_state(t) for t in model.parameters()]
    if not model.training:
        # in train mode BN running statistics move on every forward; nothing is folded then
        tensors += [_state(t) for t in model.buffers()]
    return (model.training, hash(tuple(tensors)))


class TwinCache:
    """The saliency twins of one model, one per rule and ``activations``, remade only when the model changed.

    ``rewrite_kwargs`` go to :func:`fastsal.rewrite` (``activations=...``, ``filter_fn=...``);
    ``get(rule, activations=...)`` overrides the ``activations`` given here for one call.
    Thread safe: concurrent callers get the same twin; making one is serialized.
    """

    def __init__(self, model: torch.nn.Module, **rewrite_kwargs):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
        if "activations" in rewrite_kwargs:  # a bad value fails here, not at the first call
            from fastsal.rewrite import check_activations

            rewrite_kwargs["activations"] = check_activations(rewrite_kwargs["activations"])
        self._model_ref = weakref.ref(model)
        self._kwargs = rewrite_kwargs
        self._lock = threading.Lock()
        self._twins = {}

    @property
    def model(self) -> torch.nn.Module:
        model = self._model_ref()
        if model is None:
            raise RuntimeError("the model this explainer was made for no longer exists")
        return model

    def get(self, rule, activations: Optional[str] = None) -> torch.nn.Module:
        rule = as_rule(rule)
        kwargs = self._kwargs if activations is None else {**self._kwargs, "activations": activations}
        which = (rule, kwargs.get("activations", "relu"))
        model = self.model
        key = _fingerprint(model)
        entry = self._twins.get(which)
        if entry is not None and entry[0] == key:
            return entry[1]
        with self._lock:
            entry = self._twins.get(which)
            if entry is not None and entry[0] == key:
                return entry[1]
            from fastsal.rewrite import rewrite  # the rewriting pass (fastsal.rewrite)

            # never under the caller's inference mode: folded weights made there would be
            # inference tensors, which autograd refuses to save for the backward
            with torch.inference_mode(False), torch.no_grad():
                twin = rewrite(model, rule, **kwargs)
            self._twins[which] = (key, twin)
            return twin


_shared_lock = threading.Lock()
_shared: "weakref.WeakKeyDictionary[torch.nn.Module, TwinCache]" = weakref.WeakKeyDictionary()


def shared_twins(model: torch.nn.Module) -> TwinCache:
    """The process-wide twin cache of ``model`` (used by the one-call functions)."""
    with _shared_lock:
        cache = _shared.get(model)
        if cache is None:
            cache = TwinCache(model)
            _shared[model] = cache
        return cache


def twin_for(model, rule: Rule, activations: str = "relu"):
    """The twin of a module, or the callable itself for the plain gradient of a non-module."""
    if isinstance(model, torch.nn.Module):
        return shared_twins(model).get(rule, activations)
    if as_rule(rule) is Rule.GRADIENT and callable(model):
        return model
    raise TypeError(
        f"{as_rule(rule)} needs a torch.nn.Module to rewrite its ReLUs, got {type(model).__name__}"
    )
