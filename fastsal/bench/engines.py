"""The engines compared: what each one runs for one batch.

* ``inference``: the forward under ``torch.inference_mode()`` (the reference cost);
* ``autograd``: the plain input gradient of the target logits;
* ``captum``: Captum's Saliency, Deconvolution and GuidedBackprop;
* ``fastsal``: the Captum-compatible classes (eager), and on CUDA the Explainer with
  ``torch.compile`` and with a captured CUDA graph.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch

METHODS = ("gradient", "deconvnet", "guided")
CAPTUM_CLASSES = {"gradient": "Saliency", "deconvnet": "Deconvolution", "guided": "GuidedBackprop"}


@dataclass
class Engine:
    engine: str  # inference | autograd | captum | fastsal | fastsal-compile | fastsal-graph
    method: str  # the saliency method, "-" for inference
    make_step: Callable[[torch.Tensor, torch.Tensor], Callable[[], object]]
    # how its peak memory is read: "step" (one call once warm) or "capture" (the first call
    # of a fresh step, where a CUDA graph is captured: replays allocate nothing)
    memory: str = "step"


def _autocast(device: torch.device, dtype: Optional[torch.dtype]):
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def build_engines(model: torch.nn.Module, device: torch.device, dtype: Optional[torch.dtype],
                  engines: List[str], methods: List[str]) -> List[Engine]:
    import fastsal

    out: List[Engine] = []
    if "inference" in engines:
        def inference(x, target):
            def step():
                with torch.inference_mode(), _autocast(device, dtype):
                    return model(x)
            return step
        out.append(Engine("inference", "-", inference))
    if "autograd" in engines:
        def autograd(x, target):
            def step():
                xi = x.detach().requires_grad_(True)
                with _autocast(device, dtype):
                    logits = model(xi)
                score = logits.gather(1, target[:, None]).sum()
                return torch.autograd.grad(score, xi)[0]
            return step
        out.append(Engine("autograd", "gradient", autograd))
    def attribution_step(cls):
        """A step of a Captum-style class: ``cls(model).attribute(x, target=target)``."""
        def make(x, target):
            explainer = cls(model)

            def step():
                with _autocast(device, dtype):
                    return explainer.attribute(x, target=target)
            return step
        return make

    if "captum" in engines:
        try:
            import captum.attr as cattr
        except ImportError as exc:  # a row that says so, not a silently missing engine
            def missing(x, target, exc=exc):
                raise exc
            for method in methods:
                out.append(Engine("captum", method, missing))
        else:
            for method in methods:
                out.append(Engine("captum", method, attribution_step(getattr(cattr, CAPTUM_CLASSES[method]))))
    if "fastsal" in engines:
        classes = {"gradient": fastsal.Saliency, "deconvnet": fastsal.Deconvolution, "guided": fastsal.GuidedBackprop}
        for method in methods:
            out.append(Engine("fastsal", method, attribution_step(classes[method])))
    if device.type == "cuda":
        for kind, flags in (("fastsal-compile", {"compile": True}), ("fastsal-graph", {"cuda_graph": True})):
            if kind not in engines:
                continue
            for method in methods:
                def explainer_step(x, target, method=method, flags=flags):
                    explainer = fastsal.Explainer(model, method=method, dtype=dtype, check_finite=False, **flags)

                    def step():
                        return explainer.explain(x, target=target)
                    return step
                out.append(Engine(kind, method, explainer_step,
                                  memory="capture" if kind == "fastsal-graph" else "step"))
    return out
