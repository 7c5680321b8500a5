"""Which model a job explains: the embedded default, a torchvision or timm name, or the
user's own ``module:function`` factory; with weights from torchvision's registry, timm's
pretrained weights, a local state-dict file, or ``random`` on purpose.

Loading is explicit: a torchvision or timm model without weights is refused, because the
maps of a randomly initialised network mean nothing and nothing else would say so. Weights
that must be downloaded are announced (with where the file goes) before the download.
This module imports neither the job runner nor anything that needs a data set, so a model
server can use it too.
"""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch

from fastsal.jobs.images import Preprocess

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RANDOM = "random"  # --weights random: a randomly initialised network, on purpose (sanity checks)
TIMM_PRETRAINED = ("pretrained", "DEFAULT")  # --weights for timm's own pretrained weights

Notify = Callable[[str], None]


def _stderr(message: str) -> None:
    print(f"fastsal: {message}", file=sys.stderr, flush=True)


def _weights_required(kind: str, name: str, choices: str) -> ValueError:
    return ValueError(
        f"--model {name} needs --weights: {choices}, a local .pth/.pt/.safetensors state dict, or "
        f"--weights {RANDOM} for a randomly initialised {kind} network (on purpose only: its maps explain nothing)"
    )


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


def load_model(name: Optional[str], weights: Optional[str] = None, size=None, *,
               notify: Optional[Notify] = None) -> LoadedModel:
    """Build the model a job explains, in eval mode on the CPU.

    ``weights``: a file (state dict), a torchvision weights name (``IMAGENET1K_V2``,
    ``DEFAULT``, ``ResNet50_Weights.IMAGENET1K_V2``), ``pretrained`` for timm, or
    ``"random"``. Required for torchvision and timm models (ValueError without it); optional
    for the embedded default (its trained weights) and a ``module:function`` factory (what
    it returns). ``notify`` receives one line before a download (default: stderr).
    """
    notify = notify or _stderr
    if name is None or name == "default":
        return _default(weights, size)
    if ":" in name:
        return _factory(name, weights, size)
    try:
        import torchvision
    except ImportError:
        torchvision = None
    if torchvision is not None and name in torchvision.models.list_models(module=torchvision.models):
        return _torchvision(name, weights, size, notify)
    try:
        import timm
    except ImportError:
        timm = None
    if timm is not None and timm.is_model(name):
        return _timm(name, weights, size, notify)
    hint = "" if timm is not None else " (timm is not installed)"
    raise ValueError(
        f"unknown model {name!r}{hint}: give a torchvision classification model name (e.g. resnet50), "
        "a timm name, 'module:function' returning an nn.Module, or omit --model for the embedded default"
    )


def _default(weights, size) -> LoadedModel:
    from fastsal.default_model import model as default

    net = default.build_default_model(pretrained=weights is None)
    if weights is not None and weights != RANDOM:
        net.load_state_dict(_load_state_dict(weights))
    pre = default.DEFAULT_PREPROCESS
    s = _size_pair(size) or (pre.size, pre.size)
    what = {None: "", RANDOM: ", random weights"}.get(weights, f", weights from {weights}")
    return LoadedModel(net.eval(), Preprocess(s, pre.mean, pre.std), list(pre.class_names),
                       f"fastsal default (synthetic shapes){what}")


def download_target(tv_weights) -> tuple:
    """(url, local path in the torch hub cache) of torchvision weights."""
    import torch.hub
    from urllib.parse import urlparse

    url = tv_weights.url
    return url, os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(url).path))


def _torchvision(name, weights, size, notify) -> LoadedModel:
    import torchvision

    tv_weights = None
    state = None
    if weights is None:
        names = ", ".join(w.name for w in torchvision.models.get_model_weights(name))
        raise _weights_required("torchvision", name, f"a weights name ({names}, DEFAULT; downloaded once to "
                                f"{os.path.join(torch.hub.get_dir(), 'checkpoints')})")
    if weights == RANDOM:
        pass
    elif os.path.exists(weights):
        state = _load_state_dict(weights)
    else:
        try:
            if "." in weights:
                tv_weights = torchvision.models.get_weight(weights)
            else:
                tv_weights = torchvision.models.get_model_weights(name)[weights]
        except (KeyError, ValueError, AttributeError):
            choices = ", ".join(w.name for w in torchvision.models.get_model_weights(name))
            raise ValueError(f"--weights {weights!r} is neither a file nor a weights name of {name} "
                             f"({choices}, DEFAULT), nor {RANDOM}") from None
    kwargs = {}
    if state is not None:
        n = _num_classes(state)
        if n is not None:
            kwargs["num_classes"] = n
    if name in ("googlenet", "inception_v3") and tv_weights is None:
        # no auxiliary heads: their outputs are not logits, and a state dict rarely has them
        kwargs.update(aux_logits=False, init_weights=True)
    if tv_weights is not None:
        url, local = download_target(tv_weights)
        if not os.path.exists(local):
            notify(f"{name}: the weights {tv_weights} are not in the torch hub cache; downloading {url} "
                   f"to {local} (once: later runs read that file)")
    try:
        net = torchvision.models.get_model(name, weights=tv_weights, **kwargs)
    except (OSError, RuntimeError) as exc:  # URLError is an OSError
        if tv_weights is not None:
            url, local = download_target(tv_weights)
            raise RuntimeError(
                f"could not get the weights {tv_weights} for {name}: downloading {url} failed ({exc}). "
                f"Without network, fetch that file elsewhere and copy it to {local}, or pass a local "
                "state-dict file with --weights PATH"
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
        desc = f"torchvision {name} " + (f"weights from {os.path.abspath(weights)}" if state is not None
                                         else "random weights (--weights random)")
    return LoadedModel(net.eval(), pre, classes, desc)


def _timm(name, weights, size, notify) -> LoadedModel:
    import timm

    if weights is None:
        raise _weights_required("timm", name, f"--weights pretrained for timm's own (downloaded once from the "
                                "Hugging Face hub to its cache, ~/.cache/huggingface/hub)")
    state = None
    pretrained = weights in TIMM_PRETRAINED
    if weights != RANDOM and not pretrained:
        if not os.path.exists(weights):
            raise ValueError(f"--weights {weights!r} for timm model {name}: give a state-dict file, "
                             f"pretrained, or {RANDOM}")
        state = _load_state_dict(weights)
    if pretrained:
        notify(f"{name}: timm's pretrained weights download on first use into the Hugging Face hub cache "
               "(HF_HOME, default ~/.cache/huggingface/hub)")
    try:
        net = timm.create_model(name, pretrained=pretrained)
    except Exception as exc:
        raise RuntimeError(f"could not create timm model {name} ({exc}); without network, pass a local "
                           "state-dict file with --weights PATH") from None
    if state is not None:
        net.load_state_dict(state)
    cfg = net.pretrained_cfg if hasattr(net, "pretrained_cfg") else {}
    inp = cfg.get("input_size", (3, 224, 224))
    pre = Preprocess(_size_pair(size) or (inp[1], inp[2]), tuple(cfg.get("mean", IMAGENET_MEAN)),
                     tuple(cfg.get("std", IMAGENET_STD)))
    what = {RANDOM: "random weights (--weights random)"}.get(weights, "pretrained" if pretrained
                                                               else f"weights from {weights}")
    return LoadedModel(net.eval(), pre, None, f"timm {name} {what}")


def _factory(spec, weights, size) -> LoadedModel:
    module_name, _, fn_name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), fn_name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"--model {spec!r}: cannot import {fn_name} from {module_name} ({exc})") from None
    net = fn()
    if not isinstance(net, torch.nn.Module):
        raise TypeError(f"{spec} returned {type(net).__name__}, not a torch.nn.Module")
    if weights is not None and weights != RANDOM:
        net.load_state_dict(_load_state_dict(weights))
    pre = Preprocess(_size_pair(size) or (224, 224), IMAGENET_MEAN, IMAGENET_STD)
    loaded_from = f", weights from {weights}" if weights not in (None, RANDOM) else ""
    return LoadedModel(net.eval(), pre, None, f"factory {spec}{loaded_from}")
