"""``fastsal.Explainer``: predictions and their saliency maps from one forward and one backward.

    explainer = fastsal.Explainer(model, method="guided")
    with torch.no_grad():                      # fine: the explainer turns grad on for itself
        result = explainer.explain(images)     # target=None: explain the predicted classes
    result.logits, result.targets, result.maps # (N, C), (N,), (N, H, W)
    top5 = explainer.explain(images, top_k=5)  # one forward, 5 backward passes
    top5.targets, top5.maps                    # (N, 5), (N, 5, H, W)

Guarantees:

* one forward and one backward per call (per chunk of ``batch_size``), on the model's
  saliency twin, made once and remade only when the model changed; with K classes per
  sample (``top_k=K`` or an ``(N, K)`` target), one forward and K backward passes;
* a TorchScript model (scripted or traced) is explained with plain autograd for
  ``method="gradient"`` (as Captum's ``Saliency``); the other rules refuse it;
* works under ``torch.no_grad()``/``torch.inference_mode()`` and on inference tensors;
* the caller's tensors (``.grad``, ``requires_grad``) and model are never touched;
* safe to call from several threads at once (eager and compiled calls run concurrently;
  CUDA-graph replays are serialized, since they share static buffers).

Options for fixed-shape serving on a GPU:

* ``compile=True`` (or a dict of ``torch.compile`` keyword arguments): the twin is compiled
  with ``torch.compile``; AOTAutograd compiles its backward too. With ``cuda_graph=True``
  keep the default compile mode: ``mode="reduce-overhead"`` makes Inductor's own CUDA
  graphs, an alternative to ``cuda_graph=True``, not something to nest inside it.
* ``cuda_graph=True``: for each input shape/dtype/target mode, the whole step (forward,
  target choice, backward, reduction) is captured once as a CUDA graph after a warm-up on
  a side stream, and replayed: inputs are copied into static buffers, outputs cloned out.
  Only for CUDA inputs (CPU inputs run eagerly), on the input's own device; other threads
  may use the GPU during a capture. At most ``max_graphs`` shapes are kept; a dropped graph
  is released only after its last replay finished.
  With ``dtype=`` the capture runs autocast with its weight cache off, as CUDA graphs need
  (the weights are cast inside the graph, so in-place weight updates are seen on replay).
"""

from __future__ import annotations

import collections
import threading
import warnings
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch

from fastsal._backward import maps_of
from fastsal._pass import TwinCache, check_dtype, check_inputs, grad_mode, leaf, run
from fastsal._torchscript import plain_autograd
from fastsal.reductions import Reduction, get_reduction
from fastsal.rules import RuleLike, as_rule
from fastsal.targets import (
    TargetType,
    check_multi_shape,
    check_top_k,
    classes_for,
    classes_k,
    is_multi,
    predicted,
    slice_target,
    top_classes,
)


@dataclass(frozen=True)
class Explanation:
    """The result of :meth:`Explainer.explain`."""

    logits: torch.Tensor  # (N, C): the model's own outputs, detached
    targets: torch.Tensor  # (N,) long: the classes explained (the argmax when target was None); (N, K) for K per sample
    maps: torch.Tensor  # the reduced input gradient: (N, H, W) for "abs_max"; (N, K, H, W) for K classes per sample

    def __len__(self) -> int:
        return self.logits.shape[0]


def _check_logits(logits) -> torch.Tensor:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"Explainer needs a model that returns logits of shape (N, C); it returned {shape}")
    return logits


def _step(fn, x: torch.Tensor, target, reduce, channels_last: bool, top_k: Optional[int] = None):
    """One forward and one backward (K with ``top_k`` or K target columns): ``(logits, classes, maps)``.

    ``target`` is None (the argmax, or the ``top_k`` largest logits), a long tensor ``(N,)``
    or ``(N, K)`` of checked class indices, or a function of the logits that gives one (it
    checks a user's target against the logits).
    """
    with grad_mode():
        xl = leaf(x.contiguous(memory_format=torch.channels_last) if channels_last else x)
        logits = _check_logits(fn(xl))
        if top_k is not None:
            classes = top_classes(logits, top_k)
        elif target is None:
            classes = predicted(logits)
        else:
            classes = target(logits) if callable(target) else target
        maps = maps_of(logits, classes, xl, reduce)
    return logits.detach(), classes, maps


class _GraphStep:
    """One captured CUDA graph of :func:`_step` for one input shape, dtype and target mode.

    Warm-up and capture run under ``torch.cuda.device(example.device)`` on a side stream made
    on that device, so an input on ``cuda:1`` is captured there whatever device is current.
    The capture uses ``capture_error_mode="thread_local"``: other threads may keep using the
    GPU meanwhile (``check_inputs``' ``isfinite`` and host sync, eager explains) without
    invalidating it.
    """

    def __init__(self, fn, example: torch.Tensor, given_targets: Optional[tuple], top_k, reduce, channels_last: bool):
        device = example.device
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        with torch.cuda.device(device):
            self.static_x = torch.empty_like(example, memory_format=fmt)
            self.static_x.copy_(example)
            # given_targets: the shape of the given classes, (N,) or (N, K); None for argmax/top_k
            self.static_targets = (
                torch.zeros(given_targets, dtype=torch.long, device=device) if given_targets is not None else None
            )
            step = lambda: _step(fn, self.static_x, self.static_targets, reduce, False, top_k)  # noqa: E731
            # warm up on a side stream (lazy initialisation, cuDNN/cuBLAS handles, autotuning)
            side = torch.cuda.Stream(device=device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(3):
                    step()
            torch.cuda.current_stream(device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            # the same side stream for the capture: torch's default capture stream is made
            # once, on whichever device was current then
            with torch.cuda.graph(self.graph, stream=side, capture_error_mode="thread_local"):
                self.logits, self.classes, self.maps = step()
        self.num_classes = self.logits.shape[1]

        self._done: Optional[torch.cuda.Event] = None

    def __call__(self, x: torch.Tensor, classes: Optional[torch.Tensor]) -> Explanation:
        """Replay on the caller's current stream (the caller holds the explainer's lock)."""
        with torch.cuda.device(x.device):
            stream = torch.cuda.current_stream(x.device)
            if self._done is not None:
                # a previous call may have run on another thread's stream: its clones must have
                # read the static outputs before this replay overwrites them
                stream.wait_event(self._done)
            self.static_x.copy_(x)
            if self.static_targets is not None:
                self.static_targets.copy_(classes)
            self.graph.replay()
            out = Explanation(self.logits.clone(), self.classes.clone(), self.maps.clone())
            done = torch.cuda.Event()
            done.record(stream)
            self._done = done
        return out

    def release(self) -> None:
        """Wait for the last replay (and the clones of its outputs) before the graph is dropped:
        dropping it hands its memory pool back to the allocator, which may reuse it at once."""
        if self._done is not None:
            self._done.synchronize()


class Explainer:
    """Explain a classifier's predictions with saliency maps, for production inference.

    Args:
        model: a classifier returning logits ``(N, C)``; never modified.
        method: ``"gradient"``, ``"deconvnet"`` or ``"guided"``.
        reduce: as in :func:`fastsal.saliency` (``"abs_max"``: ``(N, H, W)``; None: raw).
        dtype: ``torch.float16``/``torch.bfloat16``: run under autocast, weights cast to ``dtype``.
        channels_last: run the inputs in channels_last (default: half precision on GPU).
        batch_size: split larger batches into chunks (each one forward and one backward).
        check_finite: raise a ValueError for NaN/Inf inputs (one host sync per call).
        compile: ``True`` or a dict of ``torch.compile`` arguments to compile the twin.
        cuda_graph: capture and replay CUDA graphs for fixed shapes (CUDA inputs only).
        max_graphs: how many captured shapes to keep (least recently used dropped first).
        activations: ``"relu"`` (the ReLU family gets the rule) or ``"all"`` (smooth activations
            too: SiLU, GELU, ...); see :func:`fastsal.rewrite`.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        method: RuleLike = "guided",
        *,
        reduce: Reduction = "abs_max",
        dtype: Optional[torch.dtype] = None,
        channels_last: Optional[bool] = None,
        batch_size: Optional[int] = None,
        check_finite: bool = True,
        compile: Union[bool, dict] = False,
        cuda_graph: bool = False,
        max_graphs: int = 4,
        activations: str = "relu",
    ) -> None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.rule = as_rule(method)
        # a TorchScript model and the gradient: differentiated as it is (other rules raise here)
        self._plain = plain_autograd(model, self.rule, f"Explainer(method={str(self.rule)!r})")
        get_reduction(reduce)
        check_dtype(dtype)
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}")
        if not isinstance(compile, (bool, dict)):
            raise TypeError("compile must be a bool or a dict of torch.compile keyword arguments")
        self.model = model
        self.reduce = reduce
        self.dtype = dtype
        self.channels_last = channels_last
        self.batch_size = batch_size
        self.check_finite = check_finite
        self.compile = compile
        self.cuda_graph = bool(cuda_graph)
        self.max_graphs = int(max_graphs)
        self._twins = TwinCache(model, activations=activations)
        self._lock = threading.Lock()  # guards the compiled function and the CUDA graphs
        self._fn = None  # (twin, the forward function made for it)
        self._graphs: "collections.OrderedDict[tuple, _GraphStep]" = collections.OrderedDict()
        self._warned_cpu_graph = False

    # -- the function that runs the forward --------------------------------------------
    def _function(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """``x -> logits`` on the current twin (in ``dtype``; compiled if asked)."""
        twin = self.model if self._plain else self._twins.get(self.rule)
        current = self._fn
        if current is not None and current[0] is twin:
            return current[1]
        with self._lock:
            if self._fn is None or self._fn[0] is not twin:
                dtype = self.dtype

                def forward(x: torch.Tensor) -> torch.Tensor:
                    return run(twin, (x,), dtype)

                if self.compile:
                    options = dict(self.compile) if isinstance(self.compile, dict) else {}
                    forward = torch.compile(forward, **options)
                self._fn = (twin, forward)
                self._drop_graphs()  # graphs captured the old function
            return self._fn[1]

    def _drop_graphs(self) -> None:
        """Forget every captured graph, each once its last replay is done (caller holds the lock)."""
        while self._graphs:
            self._graphs.popitem(last=False)[1].release()

    def _uses_channels_last(self, x: torch.Tensor) -> bool:
        if self.channels_last is not None:
            return bool(self.channels_last) and x.dim() == 4
        return x.dim() == 4 and x.is_cuda and self.dtype in (torch.float16, torch.bfloat16)

    # -- public --------------------------------------------------------------------------
    def explain(self, inputs: torch.Tensor, target: TargetType = None, *, top_k: Optional[int] = None) -> Explanation:
        """Logits, the targets explained, and their maps for a batch ``inputs`` ``(N, C, H, W)``.

        ``target``: None (each sample's predicted class), an int, one class per sample (list
        or 1-D tensor), or K classes per sample (an ``(N, K)`` integer tensor or a list of N
        lists of K ints). ``top_k=K`` (with ``target=None``): each sample's K largest logits,
        largest first. With K classes per sample, ``targets`` is ``(N, K)`` and ``maps``
        ``(N, K, H, W)`` (for ``"abs_max"``), from one forward and K backward passes.
        """
        if not isinstance(inputs, torch.Tensor):
            raise TypeError(f"inputs must be a tensor, got {type(inputs).__name__}")
        if top_k is not None:
            check_top_k(top_k, target)
        check_inputs((inputs,), self.check_finite)
        n = inputs.shape[0] if inputs.dim() else 0
        if inputs.dim() < 2:
            raise ValueError(f"inputs must be a batch (N, ...), got shape {tuple(inputs.shape)}")
        if is_multi(target):
            check_multi_shape(target, n)  # before chunking, which slices the rows
        step = n if self.batch_size is None or self.batch_size >= n else self.batch_size
        if step == n or n == 0:
            return self._explain_chunk(inputs, target, n, top_k)
        parts = []
        for start in range(0, n, step):
            stop = min(start + step, n)
            part_target = slice_target(target, start, stop, n)
            parts.append(self._explain_chunk(inputs[start:stop], part_target, stop - start, top_k))
        return Explanation(
            torch.cat([p.logits for p in parts]), torch.cat([p.targets for p in parts]), torch.cat([p.maps for p in parts])
        )

    __call__ = explain

    def _explain_chunk(self, x: torch.Tensor, target: TargetType, n: int, top_k: Optional[int] = None) -> Explanation:
        fn = self._function()
        cl = self._uses_channels_last(x)
        if self.cuda_graph:
            if x.is_cuda:
                return self._explain_graph(fn, x, target, n, cl, top_k)
            if not self._warned_cpu_graph:
                self._warned_cpu_graph = True
                warnings.warn("Explainer(cuda_graph=True) got CPU inputs: running eagerly", RuntimeWarning, stacklevel=3)
        if target is None:
            logits, classes, maps = _step(fn, x, None, self.reduce, cl, top_k)
        else:
            # the number of classes is known once the forward ran: the target is checked then
            check = lambda logits: _classes(target, n, logits.shape[1], logits.device)  # noqa: E731
            logits, classes, maps = _step(fn, x, check, self.reduce, cl)
        return Explanation(logits, classes, maps)

    def _explain_graph(self, fn, x, target, n, cl, top_k=None) -> Explanation:
        if target is None:
            given = None
        else:
            given = (n, check_multi_shape(target, n)) if is_multi(target) else (n,)
        key = (tuple(x.shape), x.dtype, x.device, given, top_k, cl)
        with self._lock:
            graph = self._graphs.get(key)
            if graph is None:
                graph = _GraphStep(fn, x, given, top_k, self.reduce, cl)
                self._graphs[key] = graph
                while len(self._graphs) > self.max_graphs:
                    self._graphs.popitem(last=False)[1].release()
            else:
                self._graphs.move_to_end(key)
            classes = None if target is None else _classes(target, n, graph.num_classes, x.device)
            return graph(x, classes)


def _classes(target, n: int, num_classes: int, device) -> torch.Tensor:
    """A user's target, checked against the logits: ``(n,)`` or, for K classes per sample, ``(n, K)``."""
    if is_multi(target):
        return classes_k(target, n, num_classes, device)
    return classes_for(target, n, num_classes, device)


__all__ = ["Explainer", "Explanation"]
