"""Randomization sanity checks (Adebayo et al. 2018): do the maps depend on the model and the labels?

* :func:`mprt`: the model-parameter randomization test, cascading or independent;
* :func:`data_randomization`: a model trained on the true labels vs one trained on permuted labels;
* :func:`random_logit`: the map of the true class vs the map of a random other class (class sensitivity).

Each returns a :class:`SanityResult`: per-image scores per (method, step, metric), with
:meth:`SanityResult.summary` (mean, std and count per step) and :meth:`SanityResult.rows`
(one tidy row per check x method x step x metric). The metrics and the normalizations that
feed them are in :mod:`fastsal.evaluate.similarity`.

MPRT. The "layers" are the modules that directly hold parameters or BatchNorm running
statistics, in the order a forward pass of the model first calls them, reversed: the
output layer first. Modules the forward never calls are left out (they cannot change a
map) and listed in ``result.info["skipped"]``. Step ``i`` re-initializes layers ``0..i``
(``mode="cascading"``) or layer ``i`` alone (``"independent"``) with each module's own
``reset_parameters()``, run under ``torch.manual_seed`` inside ``torch.random.fork_rng``, so
the caller's random state is untouched. The user's model is never modified: the work is
done on ``copy.deepcopy`` copies, put in eval mode; each step's copy gets one saliency
twin per method and every image is explained in batches.

The two conventions:

============ ======================================== ===========================================
             ``"adebayo"`` (default)                  ``"quantus"`` (Quantus 0.6 ``MPRT``)
============ ======================================== ===========================================
reset        trainable parameters only; BN running    everything ``reset_parameters()`` resets,
             statistics and frozen parameters kept    BN running statistics included
seed         layer ``i``: ``seed + i`` (the same       every layer: ``seed + 1``, as Quantus
             weights in both modes)                    does, so the weights match it bit for bit
class        each model explains its own top class    the fixed labels ``target`` (required)
             (or ``target`` if given)
maps         :func:`~fastsal.evaluate.similarity.     divided by the max (Quantus's default
             grayscale_99` / ``diverging_99``          ``normalise_by_max``)
============ ======================================== ===========================================

``result.original`` holds the unrandomized model compared with itself (1.0, or NaN for a
constant map); it is a reference point for curves and is never part of a step's mean or
of :meth:`SanityResult.overall` (Quantus 0.6 averages it in).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from fastsal.evaluate.similarity import SIMILARITIES, PreparedMaps, check_similarities, compare
from fastsal.saliency import saliency

METHODS: Tuple[str, ...] = ("gradient", "deconvnet", "guided")
MODES: Tuple[str, ...] = ("cascading", "independent")
CONVENTIONS: Tuple[str, ...] = ("adebayo", "quantus")

Scores = Dict[str, Dict[str, np.ndarray]]  # method -> metric -> (n_steps, N)


@dataclass
class SanityResult:
    """Per-image similarity scores of one check.

    ``scores[method][metric]`` is a float array ``(len(steps), N)``; row ``i`` belongs to
    ``steps[i]`` (for MPRT: the qualified name of the layer re-initialized last, output
    layer first). ``original[method][metric]`` (MPRT only) is ``(N,)``: the unrandomized
    model against itself.
    """

    check: str
    methods: Tuple[str, ...]
    similarities: Tuple[str, ...]
    steps: Tuple[str, ...]
    scores: Scores
    original: Optional[Dict[str, Dict[str, np.ndarray]]] = None
    info: dict = field(default_factory=dict)

    def score(self, method: str, step: str, metric: str) -> np.ndarray:
        """Per-image scores ``(N,)`` of one method, step (or ``"original"``) and metric."""
        if method not in self.scores:
            raise KeyError(f"no method {method!r} in this result: {', '.join(self.methods)}")
        if metric not in self.scores[method]:
            raise KeyError(f"no metric {metric!r} in this result: {', '.join(self.similarities)}")
        if step == "original" and self.original is not None:
            return self.original[method][metric]
        if step not in self.steps:
            raise KeyError(f"no step {step!r} in this result: {', '.join(self.steps)}")
        return self.scores[method][metric][self.steps.index(step)]

    def summary(self) -> Dict[str, Dict[str, Dict[str, np.ndarray]]]:
        """``{method: {metric: {"mean", "std", "n"}}}``, arrays over ``steps`` (NaN scores skipped; no original)."""
        out: Dict[str, Dict[str, Dict[str, np.ndarray]]] = {}
        for method, by_metric in self.scores.items():
            out[method] = {}
            for metric, s in by_metric.items():
                ok = np.isfinite(s)
                n = ok.sum(axis=1)
                filled = np.where(ok, s, 0.0)
                mean = np.divide(filled.sum(axis=1), n, out=np.full(len(n), np.nan), where=n > 0)
                sq = ((filled - mean[:, None]) ** 2 * ok).sum(axis=1)
                var = np.divide(sq, n, out=np.full(len(n), np.nan), where=n > 0)
                out[method][metric] = {"mean": mean, "std": np.sqrt(var), "n": n}
        return out

    def overall(self, method: str, metric: str) -> float:
        """The mean over every step and image (the unrandomized model excluded; NaNs skipped)."""
        s = self.scores[method][metric]
        return float(np.nanmean(s)) if np.isfinite(s).any() else float("nan")

    def rows(self, include_original: bool = False) -> List[dict]:
        """Tidy rows ``{check, method, step, metric, mean, std, n}``, in step order."""
        summary = self.summary()
        rows = []
        for method in self.methods:
            for metric in self.similarities:
                if include_original and self.original is not None:
                    o = self.original[method][metric]
                    ok = o[np.isfinite(o)]
                    rows.append(dict(check=self.check, method=method, step="original", metric=metric,
                                     mean=float(ok.mean()) if ok.size else float("nan"),
                                     std=float(ok.std()) if ok.size else float("nan"), n=int(ok.size)))
                s = summary[method][metric]
                for i, step in enumerate(self.steps):
                    rows.append(dict(check=self.check, method=method, step=step, metric=metric,
                                     mean=float(s["mean"][i]), std=float(s["std"][i]), n=int(s["n"][i])))
        return rows


# ----- argument checks ------------------------------------------------------------------------------


def _choice(value, allowed: Sequence[str], what: str) -> str:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}: expected one of {', '.join(repr(a) for a in allowed)}")
    return value


def _methods(methods) -> Tuple[str, ...]:
    methods = (methods,) if isinstance(methods, str) else tuple(methods)
    if not methods:
        raise ValueError(f"no method asked for: expected some of {', '.join(repr(m) for m in METHODS)}")
    for m in methods:
        _choice(m, METHODS, "method")
    return methods


def _batch(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"x must be an image batch tensor (N, C, H, W), got {getattr(x, 'shape', type(x).__name__)}")


def _labels(target, n: int, what: str = "target") -> Optional[torch.Tensor]:
    if target is None:
        return None
    t = torch.as_tensor(target).long().reshape(-1)
    if t.numel() == 1:
        t = t.expand(n)
    if t.numel() != n:
        raise ValueError(f"{what} has {t.numel()} labels for {n} images")
    return t.clone()


# ----- the work -------------------------------------------------------------------------------------


def _gradients(model: nn.Module, x: torch.Tensor, target, methods, batch_size) -> Dict[str, torch.Tensor]:
    """Raw input gradients ``(N, C, H, W)`` per method, through the public API."""
    return {m: saliency(model, x, target=target, method=m, reduce=None, batch_size=batch_size) for m in methods}


def _own_parameters(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False)) or isinstance(module, nn.modules.batchnorm._NormBase)


def _layers(model: nn.Module, x: torch.Tensor) -> Tuple[List[str], List[str]]:
    """(layer names output first, names of parameter-holding modules the forward never called)."""
    names = {id(m): name for name, m in model.named_modules() if _own_parameters(m)}
    called: List[str] = []
    hooks = []

    def hook(module, args, output):
        name = names[id(module)]
        if name not in called:
            called.append(name)

    for name, m in model.named_modules():
        if _own_parameters(m):
            hooks.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(x[:1])
    finally:
        for h in hooks:
            h.remove()
    skipped = [n for n in names.values() if n not in called]
    return called[::-1], skipped


def _reset(module: nn.Module, name: str, convention: str, seed: int) -> None:
    """Re-initialize one module in place, under ``seed``, per ``convention``."""
    if not hasattr(module, "reset_parameters"):
        raise ValueError(
            f"layer {name!r} ({type(module).__name__}) holds parameters but has no reset_parameters(); "
            "MPRT re-initializes each layer with its own reset_parameters()"
        )
    keep = {}
    if convention == "adebayo":
        keep = {n: b.detach().clone() for n, b in module.named_buffers(recurse=False)}
        keep.update({n: p.detach().clone() for n, p in module.named_parameters(recurse=False) if not p.requires_grad})
    devices = [t.device for t in module.parameters(recurse=False)]
    with torch.random.fork_rng(devices=[d for d in devices if d.type == "cuda"]):
        torch.manual_seed(seed)
        with torch.no_grad():
            module.reset_parameters()
    with torch.no_grad():
        for n, t in keep.items():
            getattr(module, n).copy_(t)


def mprt(
    model: nn.Module,
    x: torch.Tensor,
    *,
    methods: Sequence[str] = METHODS,
    mode: str = "cascading",
    convention: str = "adebayo",
    target=None,
    seed: int = 0,
    similarities: Sequence[str] = SIMILARITIES,
    batch_size: Optional[int] = None,
) -> SanityResult:
    """Model-parameter randomization test of ``methods`` on images ``x`` ``(N, C, H, W)``.

    Args:
        mode: ``"cascading"`` (step ``i`` re-initializes layers ``0..i``, output first) or
            ``"independent"`` (step ``i`` re-initializes layer ``i`` only).
        convention: ``"adebayo"`` or ``"quantus"`` (see the module docstring).
        target: per-image labels (required for ``"quantus"``); with ``"adebayo"``, None lets
            each model explain its own top class.
        seed: the seed of the re-initializations.
        similarities: some of ``"rank_abs"``, ``"rank_noabs"``, ``"ssim"``, ``"hog"``.
        batch_size: images per saliency pass (None: all at once).

    Returns a :class:`SanityResult` with ``check="mprt-<mode>"``, ``steps`` the layer names.
    """
    methods = _methods(methods)
    _choice(mode, MODES, "mode")
    _choice(convention, CONVENTIONS, "convention")
    similarities = check_similarities(similarities)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    _batch(x)
    if convention == "quantus" and target is None:
        raise ValueError("convention='quantus' explains the fixed labels: pass target= (one label per image)")
    labels = _labels(target, x.shape[0])
    normalization = "adebayo" if convention == "adebayo" else "max"

    base = copy.deepcopy(model).eval()
    layers, skipped = _layers(base, x)
    if not layers:
        raise ValueError("the model has no layer with parameters for MPRT to re-initialize")
    seeds = [seed + i if convention == "adebayo" else seed + 1 for i in range(len(layers))]

    # the original side of every comparison is prepared (ranked, HOG'd) once
    original = {m: PreparedMaps(g, similarities, normalization)
                for m, g in _gradients(base, x, labels, methods, batch_size).items()}
    scores: Scores = {m: {s: np.empty((len(layers), x.shape[0])) for s in similarities} for m in methods}
    base_scores = {m: original[m].compare(original[m]) for m in methods}

    work = copy.deepcopy(base) if mode == "cascading" else None
    for i, name in enumerate(layers):
        if mode == "independent":
            work = copy.deepcopy(base)
        _reset(work.get_submodule(name), name, convention, seeds[i])
        grads = _gradients(work, x, labels, methods, batch_size)
        for m in methods:
            step = PreparedMaps(grads.pop(m), similarities, normalization)
            for metric, s in original[m].compare(step).items():
                scores[m][metric][i] = s
    return SanityResult(
        check=f"mprt-{mode}", methods=methods, similarities=similarities, steps=tuple(layers), scores=scores,
        original=base_scores,
        info=dict(mode=mode, convention=convention, seed=seed, seeds=seeds, skipped=skipped,
                  normalization=normalization),
    )


def data_randomization(
    model_true: nn.Module,
    model_permuted: nn.Module,
    x: torch.Tensor,
    *,
    methods: Sequence[str] = METHODS,
    target=None,
    similarities: Sequence[str] = SIMILARITIES,
    normalization: str = "adebayo",
    batch_size: Optional[int] = None,
) -> SanityResult:
    """Data randomization test: the maps of a model trained on the true labels vs one trained on permuted labels.

    ``target``: None (each model explains its own top class) or per-image labels (both explain
    them). The models are not modified (each is explained through a deep copy in eval mode).
    One step, ``"permuted-labels"``: ``scores[method][metric]`` is ``(1, N)``.
    """
    methods = _methods(methods)
    similarities = check_similarities(similarities)
    _batch(x)
    labels = _labels(target, x.shape[0])
    a = _gradients(copy.deepcopy(model_true).eval(), x, labels, methods, batch_size)
    b = _gradients(copy.deepcopy(model_permuted).eval(), x, labels, methods, batch_size)
    scores = {m: {k: v[None] for k, v in compare(a[m], b[m], similarities, normalization).items()} for m in methods}
    return SanityResult(
        check="data-randomization", methods=methods, similarities=similarities, steps=("permuted-labels",),
        scores=scores, info=dict(normalization=normalization),
    )


def random_logit(
    model: nn.Module,
    x: torch.Tensor,
    labels,
    *,
    methods: Sequence[str] = METHODS,
    seed: int = 0,
    similarities: Sequence[str] = SIMILARITIES,
    normalization: str = "adebayo",
    batch_size: Optional[int] = None,
) -> SanityResult:
    """Class sensitivity (RandomLogit): the map of ``labels`` vs the map of a random other class.

    The other class of image ``j`` is ``(labels[j] + k_j) % C`` with ``k_j`` uniform in
    ``1..C-1`` from ``numpy.random.default_rng(seed)``: uniform over the other classes, and
    never the label itself. It is in ``result.info["other"]``. One step, ``"random-class"``.
    """
    methods = _methods(methods)
    similarities = check_similarities(similarities)
    _batch(x)
    if labels is None:
        raise ValueError("random_logit needs the labels (one per image)")
    y = _labels(labels, x.shape[0], "labels")
    work = copy.deepcopy(model).eval()
    with torch.no_grad():
        out = work(x[:1])
    if out.dim() != 2 or out.shape[1] < 2:
        raise ValueError(f"random_logit needs (N, C) logits with C >= 2, got output shape {tuple(out.shape)}")
    c = out.shape[1]
    if bool(((y < 0) | (y >= c)).any()):
        raise ValueError(f"labels must lie in 0..{c - 1}")
    k = np.random.default_rng(seed).integers(1, c, size=x.shape[0])
    other = (y + torch.as_tensor(k, dtype=torch.long)) % c
    a = _gradients(work, x, y, methods, batch_size)
    b = _gradients(work, x, other, methods, batch_size)
    scores = {m: {k2: v[None] for k2, v in compare(a[m], b[m], similarities, normalization).items()} for m in methods}
    return SanityResult(
        check="random-logit", methods=methods, similarities=similarities, steps=("random-class",), scores=scores,
        info=dict(seed=seed, other=other.numpy(), normalization=normalization),
    )


__all__ = ["CONVENTIONS", "METHODS", "MODES", "SanityResult", "data_randomization", "mprt", "random_logit"]
