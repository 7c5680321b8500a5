"""The serving logic, framework-free: a request's bytes in, a future of its answer out.

    service = Service(ServeConfig())                  # the embedded model, on the CPU
    fut = service.v1("explain", jpeg_bytes)           # a concurrent.futures.Future
    fut.result()["explanations"][0]                   # {"encoding": "png", "shape": ..., "scale": ..., "b64": ...}

A request is decoded and checked on a small thread pool (never on the caller's thread:
an adapter's event loop only waits on the future), its images then join the
:class:`~fastsal.serve.batcher.Batcher`, whose worker thread (one per device) runs the model,
and the answer is encoded on the pool again. A bad request fails alone, at decoding, with a
:class:`~fastsal.serve.errors.ServeError`. An adapter (``kserve_adapter``) only moves bytes and
futures between its framework and :meth:`Service.v1` / :meth:`Service.v2`.
"""

from __future__ import annotations

import copy
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Dict, Hashable, List, Optional, Sequence

import numpy as np
import torch

from fastsal.serve.batcher import Batcher
from fastsal.serve.decoding import DecodedRequest, Limits, ModelInfo, V2Input, parse_v1, parse_v2
from fastsal.serve.encoding import encode_map
from fastsal.serve.engine import BatchOutput, Runner, pad_sizes
from fastsal.serve.errors import ServeError, Unavailable

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class ServeConfig:
    model: Optional[str] = None  # None: the embedded default model
    weights: Optional[str] = None
    name: Optional[str] = None  # the name in the URLs; default: the model's
    method: str = "guided"  # the default method of :explain
    devices: Sequence[str] = ("auto",)  # one worker per device
    dtype: str = "fp32"
    max_batch_size: int = 8
    max_wait_ms: float = 200.0  # an upper bound; the wait is tied to the measured batch time
    threads: Optional[int] = None  # torch threads (default: the usable cores on CPU, 1 per GPU worker)
    size: Optional[int] = None  # input resolution (default: the model's)
    limits: Limits = field(default_factory=Limits)
    backend: str = "fastsal"  # or "captum" (for comparisons)
    compile: bool = False
    cuda_graph: Optional[bool] = None  # default: on CUDA
    decode_threads: int = 4


def usable_cpus() -> int:
    """The cores this process may use: its CPU affinity, capped by a cgroup CPU quota (a
    Kubernetes CPU limit), which ``os.cpu_count()`` does not see."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:  # cgroup v2: "max 100000" or "200000 100000"
            quota, period = f.read().split()[:2]
        if quota != "max":
            n = min(n, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)


def default_threads(cuda: bool) -> int:
    """Torch threads of a worker: on CPU all usable cores but one (left to decoding and the
    HTTP loop; oversubscribed OpenMP threads are slower than fewer), 1 for a GPU worker."""
    return 1 if cuda else max(1, usable_cpus() - 1)


def resolve_devices(choices: Sequence[str]) -> List[torch.device]:
    """``auto`` -> CUDA when there is one; ``cuda`` -> the current CUDA device; ``cuda:N``."""
    out = []
    for choice in choices:
        choice = choice.strip()
        if choice == "auto":
            out.append(torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available()
                       else torch.device("cpu"))
            continue
        try:
            dev = torch.device(choice)
        except RuntimeError:
            raise ValueError(f"--device must be auto, cpu, cuda or cuda:N (comma-separated for several GPUs), "
                             f"got {choice!r}") from None
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError(f"--device {choice}: no CUDA device is visible; use --device cpu")
            index = torch.cuda.current_device() if dev.index is None else dev.index
            if index >= torch.cuda.device_count():
                raise ValueError(f"--device {choice}: only {torch.cuda.device_count()} CUDA device(s) visible")
            dev = torch.device("cuda", index)
        elif dev.type != "cpu":
            raise ValueError(f"--device {choice}: fastsal serve runs on cpu or cuda")
        out.append(dev)
    if len(set(out)) != len(out):
        raise ValueError(f"--device lists a device twice ({', '.join(map(str, out))}): one worker per device")
    if any(d.type == "cpu" for d in out) and len(out) > 1:
        raise ValueError("--device cpu cannot be combined with other devices: one CPU worker uses every core")
    return out


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


class _Gather:
    """Completes ``outer`` with ``finish(results)`` once every future in ``futures`` is done."""

    def __init__(self, futures: List[Future], done: Callable[[Optional[BaseException], list], None]):
        self._left = len(futures)
        self._futures = futures
        self._done = done
        self._lock = threading.Lock()
        for f in futures:
            f.add_done_callback(self._one)

    def _one(self, _f) -> None:
        with self._lock:
            self._left -= 1
            last = self._left == 0
        if last:
            errors = [f.exception() for f in self._futures if f.exception() is not None]
            self._done(errors[0] if errors else None, [] if errors else [f.result() for f in self._futures])


class Service:
    """The served model: loading, warm-up, request handling and shutdown.

    ``loaded`` (a :class:`fastsal.jobs.models.LoadedModel`) skips :func:`load_model`; its model
    is moved to the (first) device, and copied for further devices.
    """

    def __init__(self, config: ServeConfig, loaded=None, on_batch: Optional[Callable[[str, int, float], None]] = None):
        from fastsal.jobs.models import load_model

        self.config = config
        if config.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {config.dtype!r}")
        if config.max_batch_size < 1:
            raise ValueError(f"--max-batch-size must be at least 1, got {config.max_batch_size}")
        if config.max_wait_ms < 0:
            raise ValueError(f"--max-wait-ms must be >= 0, got {config.max_wait_ms}")
        self.devices = resolve_devices(config.devices)
        cuda = self.devices[0].type == "cuda"
        threads = config.threads or default_threads(cuda)
        self.threads = int(threads)
        torch.set_num_threads(self.threads)
        if loaded is None:
            loaded = load_model(config.model, config.weights, config.size)
        self.loaded = loaded
        self.name = config.name or _default_name(config.model)
        self.dtype = DTYPES[config.dtype]
        self.runners = []
        for i, dev in enumerate(self.devices):
            model = loaded.model if i == 0 else copy.deepcopy(loaded.model)
            model = model.to(dev).eval()
            for p in model.parameters():
                p.requires_grad_(False)  # no weight gradient is ever needed
            self.runners.append(Runner(model, dev, self.dtype, backend=config.backend,
                                       max_batch_size=config.max_batch_size, cuda_graph=config.cuda_graph,
                                       compile=config.compile))
        self._on_batch = on_batch
        self.batcher = Batcher(self._run_batch, workers=len(self.runners), max_batch_size=config.max_batch_size,
                               max_wait_s=config.max_wait_ms / 1000.0, on_batch=self._batch_done,
                               worker_init=self._worker_init)
        self._pool = ThreadPoolExecutor(max_workers=max(1, config.decode_threads), thread_name_prefix="fastsal-decode")
        self._closed = False
        self.ready = False
        try:
            self.info = self._probe()
        except BaseException:
            self.close(timeout=5)
            raise

    # -- start-up --------------------------------------------------------------------------
    def _worker_init(self, index: int) -> None:
        """In each worker thread: its torch thread cap, and its GPU as the current device
        (thread-local), so allocations of ops that use the current device land there."""
        torch.set_num_threads(self.threads)
        device = self.runners[index].device
        if device.type == "cuda":
            torch.cuda.set_device(device)

    def _probe(self) -> ModelInfo:
        """Run the model once to learn its number of classes (and check it gives logits)."""
        pre = self.loaded.preprocess
        h, w = pre.size
        out = self.runners[0].predict(torch.zeros(1, 3, h, w))
        if out.logits.dim() != 2:
            raise ValueError(f"the model returns shape {tuple(out.logits.shape)} for one image; "
                             "fastsal serve needs a classifier returning logits (N, C)")
        n = out.logits.shape[1]
        names = self.loaded.class_names
        if names is not None and len(names) != n:
            names = None
        top_k = n if self.runners[0].top_k else 1
        return ModelInfo(pre, n, tuple(names) if names else None, self.config.method, top_k)

    def warm_up(self) -> Dict[str, float]:
        """Run each kind of batch once per worker (every padded size on CUDA, where it captures
        the CUDA graphs) and seed the batcher's batch times; then the service is ready."""
        h, w = self.info.preprocess.size
        seconds = {}
        for runner in self.runners:
            sizes = runner.sizes or [1, self.config.max_batch_size]
            for n in sizes:
                x = torch.zeros(n, 3, h, w)
                for key, fn in ((("predict", 1), lambda: runner.predict(x)),
                                (("explain", self.config.method, 1, False), lambda: runner.explain(x, self.config.method))):
                    fn()  # first call: lazy set-up, twin, graph capture
                    t0 = time.perf_counter()
                    fn()
                    dt = time.perf_counter() - t0
                    if n == sizes[-1]:
                        self.batcher.record(key, dt)
                    seconds[f"{key[0]} b{n}"] = dt
        self.ready = True
        return seconds

    # -- requests ------------------------------------------------------------------------
    def v1(self, verb: str, body: bytes, content_type: Optional[str] = None, query: Optional[str] = None) -> Future:
        """A V1 ``:predict``/``:explain``: a future of the JSON-ready answer (or a ServeError)."""
        if verb not in ("predict", "explain"):
            raise ValueError(f"verb must be predict or explain, got {verb!r}")
        return self._handle(lambda: parse_v1(body, self.info, self.config.limits, content_type, query, verb),
                            verb, self._respond_v1)

    def v2(self, inputs: Sequence[V2Input], parameters: Optional[dict] = None,
           outputs: Optional[Sequence[str]] = None) -> Future:
        """A V2 ``infer``: a future of ``{output name: numpy array}``."""
        def decode():
            req = parse_v2(inputs, parameters, outputs, self.info, self.config.limits)
            return req

        return self._handle(decode, None, self._respond_v2)

    def _handle(self, decode, verb, respond) -> Future:
        outer: Future = Future()
        if self._closed:
            outer.set_exception(Unavailable("the server is shutting down: retry on another replica"))
            return outer
        self.batcher.arriving(1)

        def decoded(f: Future) -> None:
            try:
                req: DecodedRequest = f.result()
            except BaseException as exc:  # noqa: BLE001
                self.batcher.arriving(-1)
                outer.set_exception(exc)
                return
            v = verb or ("explain" if "saliency" in req.extra.get("outputs", ()) else "predict")
            p = req.params
            n = len(req.instances)
            self.batcher.arriving(n - 1)
            futures = []
            try:
                for k, inst in enumerate(req.instances):
                    # an image with a given target and one without never share a batch
                    key = (("predict", p.top_k) if v == "predict"
                           else ("explain", p.method, p.top_k, inst.target is not None))
                    futures.append(self.batcher.submit(key, inst))
            except ServeError as exc:
                self.batcher.arriving(-(n - k - 1))
                outer.set_exception(exc)
                return

            def finished(error, results):
                if error is not None:
                    outer.set_exception(error)
                    return
                try:
                    self._pool.submit(self._respond, respond, v, req, results, outer)
                except RuntimeError:  # the pool is shut down
                    self._respond(respond, v, req, results, outer)

            _Gather(futures, finished)

        try:
            self._pool.submit(decode).add_done_callback(decoded)
        except RuntimeError:
            self.batcher.arriving(-1)
            outer.set_exception(Unavailable("the server is shutting down: retry on another replica"))
        return outer

    @staticmethod
    def _respond(respond, verb, req, results, outer) -> None:
        try:
            outer.set_result(respond(verb, req, results))
        except BaseException as exc:  # noqa: BLE001
            outer.set_exception(exc)

    # -- the worker's side -----------------------------------------------------------------
    def _run_batch(self, worker: int, key: Hashable, items: list) -> list:
        runner = self.runners[worker]
        x = torch.stack([i.tensor for i in items])
        if key[0] == "predict":
            out = runner.predict(x)
        else:
            _, method, top_k, targeted = key
            out = runner.explain(x, method, [i.target for i in items] if targeted else None, top_k)
        return [_row(out, i) for i in range(len(items))]

    def _batch_done(self, key, size, seconds) -> None:
        if self._on_batch is not None:
            self._on_batch(key_name(key), size, seconds)

    # -- answers -------------------------------------------------------------------------
    def _class_name(self, c: int):
        names = self.info.class_names
        return names[c] if names else None

    def _respond_v1(self, verb: str, req: DecodedRequest, rows: List[BatchOutput]) -> dict:
        predictions, explanations = [], []
        for row in rows:
            logits = row.logits.numpy()
            probs = _softmax(logits)
            c = int(logits.argmax())
            entry = {"class": c, "class_name": self._class_name(c), "score": float(probs[c])}
            if verb == "predict":
                if req.params.top_k > 1:
                    top = np.argsort(-logits, kind="stable")[: req.params.top_k]
                    entry["top_k"] = [{"class": int(t), "class_name": self._class_name(int(t)),
                                       "score": float(probs[t])} for t in top]
            else:
                t = row.targets.numpy()
                if t.ndim == 0:
                    entry["target"] = int(t)
                    entry["target_name"] = self._class_name(int(t))
                    entry["target_score"] = float(probs[int(t)])
                else:
                    entry["target"] = [int(v) for v in t]
                    entry["target_name"] = [self._class_name(int(v)) for v in t]
                    entry["target_score"] = [float(probs[int(v)]) for v in t]
                explanations.append(encode_map(row.maps.numpy(), req.params.encoding))
            predictions.append(entry)
        answer = {"predictions": predictions}
        if verb == "explain":
            answer["explanations"] = explanations
        return answer

    def _respond_v2(self, verb: str, req: DecodedRequest, rows: List[BatchOutput]) -> Dict[str, np.ndarray]:
        logits = np.stack([r.logits.numpy() for r in rows])
        probs = _softmax(logits)
        classes = logits.argmax(axis=1).astype(np.int64)
        out = {"class": classes, "score": probs[np.arange(len(rows)), classes].astype(np.float32)}
        if verb == "explain":
            out["saliency"] = np.stack([r.maps.numpy() for r in rows]).astype(np.float16)
        return {k: out[k] for k in req.extra["outputs"]}

    def v2_metadata(self) -> dict:
        """The V2 model metadata: inputs and outputs with datatypes and shapes (-1: any N)."""
        h, w = self.info.preprocess.size
        return {
            "inputs": [{"name": "image", "datatype": "BYTES", "shape": [-1]},
                       {"name": "target", "datatype": "INT64", "shape": [-1]}],
            "outputs": [{"name": "class", "datatype": "INT64", "shape": [-1]},
                        {"name": "score", "datatype": "FP32", "shape": [-1]},
                        {"name": "saliency", "datatype": "FP16", "shape": [-1, h, w]}],
        }

    def describe(self) -> dict:
        h, w = self.info.preprocess.size
        return {"name": self.name, "model": self.loaded.description, "devices": [str(d) for d in self.devices],
                "dtype": self.config.dtype, "backend": self.config.backend, "input_size": [h, w],
                "classes": self.info.num_classes, "method": self.config.method,
                "max_batch_size": self.config.max_batch_size, "torch_threads": self.threads,
                "pad_sizes": pad_sizes(self.config.max_batch_size) if self.devices[0].type == "cuda" else None}

    # -- shutdown ------------------------------------------------------------------------
    def close(self, timeout: Optional[float] = 30.0) -> bool:
        """Refuse new requests, finish the queued ones, stop the workers and the pool."""
        self._closed = True
        self.ready = False
        ok = self.batcher.close(timeout)
        self._pool.shutdown(wait=True)
        return ok


def _row(out: BatchOutput, i: int) -> BatchOutput:
    return BatchOutput(out.logits[i], None if out.targets is None else out.targets[i],
                       None if out.maps is None else out.maps[i])


def key_name(key) -> str:
    """A batch kind as a metrics label: ``predict``, ``explain/guided``, ``explain/guided/top3``."""
    if key[0] == "predict":
        return "predict" if key[1] == 1 else f"predict/top{key[1]}"
    name = f"explain/{key[1]}"
    return name + (f"/top{key[2]}" if key[2] > 1 else "") + ("/target" if key[3] else "")


def _default_name(model: Optional[str]) -> str:
    if model is None or model == "default":
        return "fastsal"
    name = model.rsplit(":", 1)[-1].rsplit(".", 1)[-1]
    return "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in name) or "model"
