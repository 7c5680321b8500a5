"""The KServe adapter: :class:`fastsal.serve.service.Service` behind KServe's Python model server.

KServe brings the routes clusters already speak (V1 ``:predict``/``:explain``, Open Inference
Protocol V2 ``infer``, liveness/readiness, Prometheus ``/metrics`` with
``request_explain_seconds``). This module only moves bytes and futures between it and the
service; the logic lives in the framework-free modules beside it. Three things KServe does
not do the way a server of maps needs, and what is done here instead:

* it listens on 0.0.0.0, hard-coded in its uvicorn config: :class:`_Server` sets the address
  on that config after KServe made it and before uvicorn binds;
* its V1 routes parse the body as JSON unless a non-JSON content type came with it (so a JPEG
  sent as ``application/octet-stream`` fails in its JSON parser), and read any body whole:
  :class:`BodyLimit`, an ASGI middleware, refuses a body over the limit (413) while it is
  still arriving, and hands V1 bodies to the service as bytes with their original content
  type and query string, so the service decides what they are;
* its handlers run in its event loop: ours only await the service's futures, so the loop
  never decodes an image or runs the model, and health checks stay fast under load.
"""

from __future__ import annotations

import asyncio
import json
import sys
import uuid

from fastsal.serve.decoding import V2Input
from fastsal.serve.errors import BadRequest, ServeError

V1_CONTENT_TYPE = b"application/x-fastsal-request"  # not JSON to KServe: the body reaches us as bytes
V2_DATATYPES = {"class": "INT64", "score": "FP32", "saliency": "FP16"}


def import_kserve():
    """Import kserve without letting it read our command line: ``kserve.model_server`` parses
    ``sys.argv`` when imported (``--model`` would be taken as an abbreviation of its
    ``--model_name``, and a bad value there exits the process)."""
    saved = sys.argv
    sys.argv = sys.argv[:1]
    try:
        import kserve  # noqa: F401
        import kserve.model_server  # noqa: F401
    except ImportError as exc:
        raise ImportError(f"fastsal serve needs KServe's model server: pip install 'fastsal[serve]' ({exc})") from exc
    finally:
        sys.argv = saved
    return kserve


class BodyLimit:
    """ASGI middleware: a 413 for bodies over ``max_bytes`` (before reading them when the length is
    announced), and V1 ``:predict``/``:explain`` bodies passed on as bytes (see the module doc)."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = int(max_bytes)

    async def _refuse(self, send, size: str) -> None:
        body = json.dumps({"error": f"the body is {size} bytes; this server takes at most {self.max_bytes:,} "
                                    "(fastsal serve --max-body-mb)"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})

    async def _drain(self, receive, length) -> None:
        """Read and drop what is left of an oversized body (only call it while some is left), up to
        a bound, so that a client still sending gets the 413 instead of a reset connection; past the
        bound the connection closes."""
        budget = max(4 * self.max_bytes, 16 * 2**20)
        if length is not None and length > budget:
            return
        while budget > 0:
            message = await receive()
            if message["type"] != "http.request":
                return
            budget -= len(message.get("body", b""))
            if not message.get("more_body", False):
                return

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        headers = list(scope.get("headers") or [])
        length = next((v for k, v in headers if k == b"content-length"), None)
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await self._drain(receive, int(length))
            return await self._refuse(send, f"{int(length):,}")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                if message.get("more_body", False):
                    await self._drain(receive, None)
                return await self._refuse(send, f"more than {self.max_bytes:,}")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        path = scope.get("path", "")
        if path.startswith("/v1/models/") and path.endswith((":predict", ":explain")):
            original = next((v for k, v in headers if k == b"content-type"), b"")
            drop = (b"content-type", b"x-fastsal-content-type", b"x-fastsal-query", b"ce-specversion")
            headers = [(k, v) for k, v in headers if k not in drop]
            headers += [(b"content-type", V1_CONTENT_TYPE), (b"x-fastsal-content-type", original),
                        (b"x-fastsal-query", scope.get("query_string", b""))]
            scope = dict(scope, headers=headers)
            send = _json_response(send, set(headers))
        delivered = False

        async def replay():
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


def _json_response(send, request_headers: set):
    """KServe's V1 ``:explain`` copies the request's headers into its response (host, user-agent,
    content-type, ...): drop those, and answer as the JSON it is."""
    async def clean(message):
        if message["type"] == "http.response.start":
            kept = [(k, v) for k, v in message.get("headers", [])
                    if k == b"content-length" or (k, v) not in request_headers]
            if not any(k == b"content-type" for k, _ in kept):
                kept.append((b"content-type", b"application/json"))
            message = dict(message, headers=kept)
        await send(message)
    return clean


def make_model(service):
    """The KServe ``Model`` that answers for ``service``."""
    kserve = import_kserve()
    from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse, RequestedOutput

    class FastsalModel(kserve.Model):
        def __init__(self):
            super().__init__(service.name)
            self.service = service
            self.ready = service.ready

        def load(self) -> bool:
            self.ready = self.service.ready
            return self.ready

        def stop(self):
            self.ready = False  # the service itself is closed once the HTTP server stopped

        def get_input_types(self):
            return service.v2_metadata()["inputs"]

        def get_output_types(self):
            return service.v2_metadata()["outputs"]

        async def predict(self, payload, headers=None, response_headers=None):
            if isinstance(payload, InferRequest):
                return await self._v2(payload)
            return await self._v1("predict", payload, headers)

        async def explain(self, payload, headers=None):
            if isinstance(payload, InferRequest):
                raise BadRequest("V2 has no explain verb: ask infer for the 'saliency' output")
            return await self._v1("explain", payload, headers)

        async def _v1(self, verb, payload, headers):
            headers = headers or {}
            body = payload if isinstance(payload, (bytes, bytearray)) else json.dumps(payload).encode()
            future = self.service.v1(verb, bytes(body), headers.get("x-fastsal-content-type") or None,
                                     headers.get("x-fastsal-query") or None)
            return await asyncio.wrap_future(future)

        async def _v2(self, request):
            inputs = []
            for inp in request.inputs:
                try:
                    data = inp.as_numpy().reshape(-1).tolist()
                except Exception as exc:  # noqa: BLE001 - whatever KServe could not convert
                    raise BadRequest(f"input {inp.name!r} ({inp.datatype} {inp.shape}) cannot be read: {exc}") from None
                inputs.append(V2Input(inp.name, inp.datatype, list(inp.shape), data))
            wanted = [o.name for o in request.request_outputs] if request.request_outputs else None
            arrays = await asyncio.wrap_future(self.service.v2(inputs, request.parameters, wanted))
            asked = {o.name: o for o in (request.request_outputs or [])}
            default_binary = bool((request.parameters or {}).get("binary_data_output", False))
            outputs, requested = [], []
            for name, arr in arrays.items():
                outputs.append(InferOutput(name, list(arr.shape), V2_DATATYPES[name], data=arr))
                o = asked.get(name)
                binary = o.binary_data if o is not None and o.binary_data is not None else default_binary
                # float16 cannot travel in JSON: the saliency output always uses the binary extension
                requested.append(RequestedOutput(name, {"binary_data": bool(binary) or name == "saliency"}))
            return InferResponse(response_id=request.id or str(uuid.uuid4()), model_name=self.name,
                                 infer_outputs=outputs, requested_outputs=requested)

    return FastsalModel()


_METRICS = {}


def _metrics(max_batch_size: int):
    """Prometheus histograms of the batches (on KServe's registry, so ``/metrics`` shows them)."""
    if not _METRICS:
        from prometheus_client import Histogram

        _METRICS["size"] = Histogram("fastsal_batch_size", "images per model batch", ["model", "kind"],
                                     buckets=[float(b) for b in range(1, max(2, max_batch_size) + 1)])
        _METRICS["seconds"] = Histogram("fastsal_batch_seconds", "model time per batch", ["model", "kind"])
    return _METRICS


def batch_observer(model_name: str, max_batch_size: int):
    m = _metrics(max_batch_size)

    def observe(kind: str, size: int, seconds: float) -> None:
        m["size"].labels(model_name, kind).observe(size)
        m["seconds"].labels(model_name, kind).observe(seconds)

    return observe


def serve(service, host: str = "127.0.0.1", port: int = 8080, grace_period: int = 30,
          access_log: bool = False) -> None:
    """Serve ``service`` (warmed up) over HTTP until SIGTERM/SIGINT; returns after a clean stop."""
    kserve = import_kserve()
    import logging

    from fastapi.responses import ORJSONResponse
    from kserve.errors import ModelNotFound
    from kserve.model_server import app

    model = make_model(service)

    async def serve_error(_request, exc: ServeError):
        return ORJSONResponse(status_code=exc.status, content={"error": exc.message})

    async def model_metadata(model_name: str):
        if model_name != service.name:
            raise ModelNotFound(model_name)
        meta = service.v2_metadata()
        return {"name": service.name, "versions": [], "platform": "pytorch", **meta}

    class _Server(kserve.ModelServer):
        def setup_event_loop(self):
            # called by ModelServer.start after it made its uvicorn config, before uvicorn binds
            config = getattr(getattr(self, "_rest_server", None), "config", None)
            if config is None or not hasattr(config, "host"):  # never fall back to 0.0.0.0 silently
                raise RuntimeError(f"cannot set the listen address with this kserve version "
                                   f"({getattr(kserve, '__version__', '?')}); fastsal serve is tested with kserve 0.21")
            config.host = host
            super().setup_event_loop()

    app.add_middleware(BodyLimit, max_bytes=service.config.limits.max_body_bytes)
    app.add_exception_handler(ServeError, serve_error)
    # before KServe's own route, which leaves "platform" empty
    app.add_api_route("/v2/models/{model_name}", model_metadata, methods=["GET"], include_in_schema=False)
    server = _Server(http_port=port, enable_grpc=False, workers=1, enable_latency_logging=False,
                     grace_period=grace_period)
    if not access_log:  # a log line per request (two from KServe's timing middleware) costs CPU
        for name in ("uvicorn.access", "kserve.trace"):
            logging.getLogger(name).setLevel(logging.WARNING)
    server.start([model])


def main_ready_line(service, host: str, port: int) -> str:
    """The line printed when the server is about to listen (tests and scripts wait for it)."""
    d = service.describe()
    return (f"fastsal serve: {d['name']} ({d['model']}, {d['classes']} classes, {d['input_size'][0]}x"
            f"{d['input_size'][1]}) on {', '.join(d['devices'])} {d['dtype']}, {d['backend']}, max batch "
            f"{d['max_batch_size']}, {d['torch_threads']} torch thread(s); listening on http://{host}:{port}")


__all__ = ["BodyLimit", "batch_observer", "import_kserve", "make_model", "serve"]
