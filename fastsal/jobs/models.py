"""Which model a job explains: the embedded default, a torchvision or timm name, or the
user's own ``module:function`` factory; with weights from torchvision's registry or a
local state-dict file."""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import List, Optional

import torch

from fastsal.jobs.images import Preprocess

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class LoadedModel:
    model: torch.nn.Module
    preprocess: Preprocess
    class_names: Optional[List[str]]
    description: str  # what the manifest records


def _load_state_dict(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file {path!r} not found")
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise RuntimeError("reading .safetensors needs the safetensors package: pip install safetensors") from None
        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)  # no pickled code is run
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict (got {type(state).__name__})")
    # checkpoints saved from DataParallel/DistributedDataParallel
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _num_classes(state: dict) -> Optional[int]:
    last = [v for k, v in state.items() if k.endswith("weight") and getattr(v, "dim", lambda: 0)() == 2]
    return int(last[-1].shape[0]) if last else None


def _size_pair(size) -> tuple:
    if size is None:
        return None
    return (size, size) if isinstance(size, int) else tuple(size)


def load_model(name: Optional[str], weights: Optional[str] = None, size=None) -> LoadedModel:
    """Build the model a job explains, in eval mode on the CPU."""
    if name is None or name == "default":
        return _default(weights, size)
    if ":" in name:
        return _factory(name, weights, size)
    try:
        import torchvision
    except ImportError:
        torchvision = None
    if torchvision is not None and name in torchvision.models.list_models(module=torchvision.models):
        return _torchvision(name, weights, size)
    try:
        import timm
    except ImportError:
        timm = None
    if timm is not None and timm.is_model(name):
        return _timm(name, weights, size)
    hint = "" if timm is not None else " (timm is not installed)"
    raise ValueError(
        f"unknown model {name!r}{hint}: give a torchvision classification model name (e.g. resnet50), "
        "a timm name, 'module:function' returning an nn.Module, or omit --model for the embedded default"
    )


def _default(weights, size) -> LoadedModel:
    from fastsal.default_model import model as default

    net = default.build_default_model(pretrained=weights is None)
    if weights is not None:
        net.load_state_dict(_load_state_dict(weights))
    pre = default.DEFAULT_PREPROCESS
    s = _size_pair(size) or (pre.size, pre.size)
    return LoadedModel(net.eval(), Preprocess(s, pre.mean, pre.std), list(pre.class_names),
                       "fastsal default (synthetic shapes)")


def _torchvision(name, weights, size) -> LoadedModel:
    import torchvision

    tv_weights = None
    state = None
    if weights is not None and os.path.exists(weights):
        state = _load_state_dict(weights)
    elif weights is not None:
        try:
            if "." in weights:
                tv_weights = torchvision.models.get_weight(weights)
            else:
                tv_weights = torchvision.models.get_model_weights(name)[weights]
        except (KeyError, ValueError, AttributeError):
            choices = ", ".join(w.name for w in torchvision.models.get_model_weights(name))
            raise ValueError(f"--weights {weights!r} is neither a file nor a weights name of {name} ({choices}, DEFAULT)") from None
    kwargs = {}
    if state is not None:
        n = _num_classes(state)
        if n is not None:
            kwargs["num_classes"] = n
    if name in ("googlenet", "inception_v3") and tv_weights is None:
        # no auxiliary heads: their outputs are not logits, and a state dict rarely has them
        kwargs.update(aux_logits=False, init_weights=True)
    try:
        net = torchvision.models.get_model(name, weights=tv_weights, **kwargs)
    except (OSError, RuntimeError) as exc:  # URLError is an OSError
        if tv_weights is not None:
            raise RuntimeError(
                f"could not get the weights {tv_weights} for {name} ({exc}). They download on first use; "
                "offline, pass a local state-dict file with --weights PATH"
            ) from None
        raise
    if state is not None:
        missing, unexpected = net.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"{weights} does not fit {name}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if tv_weights is not None:
        t = tv_weights.transforms()
        crop = getattr(t, "crop_size", [224])
        s = _size_pair(size) or (crop[0], crop[-1])
        pre = Preprocess(s, tuple(t.mean), tuple(t.std))
        classes = list(tv_weights.meta.get("categories") or []) or None
        desc = f"torchvision {name} {tv_weights}"
    else:
        pre = Preprocess(_size_pair(size) or (224, 224), IMAGENET_MEAN, IMAGENET_STD)
        classes = None
        desc = f"torchvision {name} " + (f"weights from {os.path.abspath(weights)}" if state is not None else "random weights")
    return LoadedModel(net.eval(), pre, classes, desc)


def _timm(name, weights, size) -> LoadedModel:
    import timm

    state = _load_state_dict(weights) if weights and os.path.exists(weights) else None
    try:
        net = timm.create_model(name, pretrained=bool(weights) and state is None)
    except Exception as exc:
        raise RuntimeError(f"could not create timm model {name} ({exc}); offline, pass --weights PATH") from None
    if state is not None:
        net.load_state_dict(state)
    cfg = net.pretrained_cfg if hasattr(net, "pretrained_cfg") else {}
    inp = cfg.get("input_size", (3, 224, 224))
    pre = Preprocess(_size_pair(size) or (inp[1], inp[2]), tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD)))
    return LoadedModel(net.eval(), pre, None, f"timm {name}")


def _factory(spec, weights, size) -> LoadedModel:
    module_name, _, fn_name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), fn_name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"--model {spec!r}: cannot import {fn_name} from {module_name} ({exc})") from None
    net = fn()
    if not isinstance(net, torch.nn.Module):
        raise TypeError(f"{spec} returned {type(net).__name__}, not a torch.nn.Module")
    if weights is not None:
        net.load_state_dict(_load_state_dict(weights))
    pre = Preprocess(_size_pair(size) or (224, 224), IMAGENET_MEAN, IMAGENET_STD)
    return LoadedModel(net.eval(), pre, None, f"factory {spec}")
