"""What a model worker runs for one batch: the forward (``predict``) or the forward and the
backward (``explain``), on one device.

``fastsal`` explains with :class:`fastsal.Explainer` (one per method, made on first use);
``captum`` with Captum's classes after a forward for the predicted class, the way servers
built on Captum do it: it is here so the benchmark compares both behind the same server.

On CUDA a batch is padded to one of a few fixed sizes (powers of two up to the maximum
batch size), so ``Explainer(cuda_graph=True)`` replays a graph captured once per size
instead of capturing one per batch size seen.
"""

from __future__ import annotations

import contextlib
import inspect
import threading
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch

CAPTUM_CLASSES = {"gradient": "Saliency", "deconvnet": "Deconvolution", "guided": "GuidedBackprop"}


@dataclass
class BatchOutput:
    logits: torch.Tensor  # (N, C) float32, CPU
    targets: Optional[torch.Tensor] = None  # (N,) or (N, K) long, CPU; None for predict
    maps: Optional[torch.Tensor] = None  # (N, H, W) or (N, K, H, W) float32, CPU; None for predict


def explainer_top_k() -> bool:
    """Whether this fastsal's ``Explainer.explain`` takes ``top_k``."""
    from fastsal.explainer import Explainer

    return "top_k" in inspect.signature(Explainer.explain).parameters


def pad_sizes(max_batch_size: int) -> List[int]:
    sizes, s = [], 1
    while s < max_batch_size:
        sizes.append(s)
        s *= 2
    return sizes + [max_batch_size]


class Runner:
    """One device's model and explainers; called by that device's worker thread only."""

    def __init__(self, model: torch.nn.Module, device: torch.device, dtype: Optional[torch.dtype] = None,
                 backend: str = "fastsal", max_batch_size: int = 8, cuda_graph: Optional[bool] = None,
                 compile: bool = False):
        if backend not in ("fastsal", "captum"):
            raise ValueError(f"backend must be fastsal or captum, got {backend!r}")
        self.model = model
        self.device = device
        self.dtype = dtype
        self.backend = backend
        cuda = device.type == "cuda"
        self.cuda_graph = cuda if cuda_graph is None else bool(cuda_graph and cuda)
        self.compile = compile
        self.sizes = pad_sizes(max_batch_size) if cuda else None
        self._explainers: Dict[str, object] = {}
        self._lock = threading.Lock()
        self.top_k = backend == "captum" or explainer_top_k()

    # -- helpers -------------------------------------------------------------------------
    def _autocast(self):
        if self.dtype is None or self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def _pad(self, x: torch.Tensor, targets: Optional[torch.Tensor]):
        """Pad the batch (repeating its last item) to the next fixed size on CUDA."""
        n = x.shape[0]
        if self.sizes is None:
            return x, targets
        size = next((s for s in self.sizes if s >= n), n)
        if size == n:
            return x, targets
        x = torch.cat([x, x[-1:].expand(size - n, *x.shape[1:])])
        if targets is not None:
            targets = torch.cat([targets, targets[-1:].expand(size - n, *targets.shape[1:])])
        return x, targets

    def _explainer(self, method: str):
        ex = self._explainers.get(method)
        if ex is None:
            with self._lock:
                ex = self._explainers.get(method)
                if ex is None:
                    if self.backend == "fastsal":
                        from fastsal.explainer import Explainer

                        n_graphs = 2 * len(self.sizes) if self.sizes else 4
                        ex = Explainer(self.model, method=method, dtype=self.dtype, check_finite=False,
                                       cuda_graph=self.cuda_graph, compile=self.compile, max_graphs=n_graphs)
                    else:
                        import captum.attr

                        ex = getattr(captum.attr, CAPTUM_CLASSES[method])(self.model)
                    self._explainers[method] = ex
        return ex

    # -- the two kinds of batch ------------------------------------------------------------
    def predict(self, x: torch.Tensor) -> BatchOutput:
        n = x.shape[0]
        x, _ = self._pad(x.to(self.device, non_blocking=True), None)
        with torch.inference_mode(), self._autocast():
            logits = self.model(x)
        return BatchOutput(logits[:n].float().cpu())

    def explain(self, x: torch.Tensor, method: str, targets: Optional[Sequence[int]] = None, top_k: int = 1) -> BatchOutput:
        n = x.shape[0]
        t = None if targets is None else torch.as_tensor(list(targets), dtype=torch.long)
        x, t = self._pad(x.to(self.device, non_blocking=True), None if t is None else t.to(self.device))
        if self.backend == "captum":
            logits, classes, maps = self._captum(x, method, t, top_k)
        else:
            ex = self._explainer(method)
            out = ex.explain(x, target=t, top_k=top_k) if top_k > 1 else ex.explain(x, target=t)
            logits, classes, maps = out.logits, out.targets, out.maps
        return BatchOutput(logits[:n].float().cpu(), classes[:n].cpu(), maps[:n].float().cpu())

    def _captum(self, x, method, t, top_k):
        with torch.no_grad(), self._autocast():
            logits = self.model(x)
        if t is None:
            t = logits.topk(top_k, dim=1).indices if top_k > 1 else logits.argmax(dim=1)
        attr = self._explainer(method)
        columns = t.unsqueeze(1) if t.dim() == 1 else t
        maps = []
        for k in range(columns.shape[1]):
            with self._autocast():
                g = attr.attribute(x, target=columns[:, k].tolist())
            maps.append(g.detach().abs().amax(dim=1))
        m = maps[0] if t.dim() == 1 else torch.stack(maps, dim=1)
        return logits.detach(), t, m
