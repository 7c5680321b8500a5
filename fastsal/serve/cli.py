"""``fastsal serve``: the command-line face of :mod:`fastsal.serve`."""

from __future__ import annotations

import argparse
import sys

EPILOG = """examples:
  fastsal serve                                  # the embedded model, offline, on http://127.0.0.1:8080
  curl --data-binary @cat.jpg http://127.0.0.1:8080/v1/models/fastsal:explain
  fastsal serve --model resnet50 --weights IMAGENET1K_V2 --device cuda --dtype bf16 --host 0.0.0.0
endpoints: POST /v1/models/NAME:predict and :explain (raw image bytes, or JSON {"instances": [...]}),
POST /v2/models/NAME/infer, GET /v1/models, /v2/models/NAME, /v2/health/ready, /metrics
"""


def add_serve_parser(sub) -> None:
    p = sub.add_parser(
        "serve", help="a model server (KServe V1/V2 protocols) that returns predictions and their saliency maps",
        description="Serve a CNN over HTTP with KServe's model server: :predict gives classes, :explain classes "
        "and saliency maps (PNG or float16, base64), V2 infer both. Requests are decoded and checked before they "
        "join a batch; one worker per device runs dynamic batches. SIGTERM finishes the requests in flight and "
        "exits 0. Needs the serve extra: pip install 'fastsal[serve]'.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
    )
    p.add_argument("--model", default=None, help="as for fastsal run: a torchvision or timm name, or module:function "
                   "(default: the embedded model trained on synthetic shapes, offline)")
    p.add_argument("--weights", default=None, help="as for fastsal run: a torchvision weights name, a local state "
                   "dict, or 'random'")
    p.add_argument("--name", default=None, help="the model's name in the URLs (default: the --model name; "
                   "'fastsal' for the embedded model)")
    p.add_argument("--method", default="guided", choices=["gradient", "deconvnet", "guided"],
                   help=":explain's method when a request names none")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback; 0.0.0.0 in a "
                   "container)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--max-batch-size", type=int, default=8, help="images per model batch, at most")
    p.add_argument("--max-wait-ms", type=float, default=200.0,
                   help="upper bound on how long a batch waits to fill; the wait used is the smaller of this and "
                   "half the measured time of a batch, and none when no other request is likely to come")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N, or a comma list "
                   "of GPUs (one worker each)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--size", type=int, default=None, help="input resolution (default: the model's)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: the usable cores but one on "
                   "CPU, cgroup CPU limits included; 1 per GPU worker)")
    p.add_argument("--max-body-mb", type=float, default=32.0, help="largest request body (413 above)")
    p.add_argument("--max-pixels", type=int, default=40_000_000, help="largest image, in pixels (413 above)")
    p.add_argument("--max-instances", type=int, default=64, help="most images in one request (413 above)")
    p.add_argument("--compile", action="store_true", help="torch.compile the saliency twin")
    p.add_argument("--no-cuda-graph", action="store_true", help="on CUDA, do not capture CUDA graphs")
    p.add_argument("--explainer", default="fastsal", choices=["fastsal", "captum"],
                   help="what computes the maps: fastsal, or Captum's classes (for comparisons)")
    p.add_argument("--grace-period", type=int, default=30,
                   help="seconds SIGTERM waits for the requests in flight")
    p.add_argument("--access-log", action="store_true", help="log every request")


def run_serve(args) -> int:
    from fastsal.serve.decoding import Limits
    from fastsal.serve.service import ServeConfig, Service

    try:
        from fastsal.serve import kserve_adapter
        kserve_adapter.import_kserve()
    except ImportError as exc:
        print(f"fastsal serve: {exc}", file=sys.stderr)
        return 2
    if not 0 < args.port < 65536:
        print(f"fastsal serve: --port must be 1..65535, got {args.port}", file=sys.stderr)
        return 2
    if args.max_body_mb <= 0 or args.max_pixels <= 0 or args.max_instances <= 0:
        print("fastsal serve: --max-body-mb, --max-pixels and --max-instances must be positive", file=sys.stderr)
        return 2
    config = ServeConfig(
        model=args.model, weights=args.weights, name=args.name, method=args.method,
        devices=[d for d in args.device.split(",") if d.strip()] or ["auto"], dtype=args.dtype,
        max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms, threads=args.threads, size=args.size,
        limits=Limits(int(args.max_body_mb * 2**20), args.max_pixels, args.max_instances),
        backend=args.explainer, compile=args.compile, cuda_graph=False if args.no_cuda_graph else None,
    )
    name = args.name
    try:
        observer = kserve_adapter.batch_observer(name or "model", args.max_batch_size)
        service = Service(config, on_batch=lambda kind, size, s: observer(kind, size, s))
        if name is None:  # the metrics label is the served name
            observer = kserve_adapter.batch_observer(service.name, args.max_batch_size)
        service.warm_up()
    except (ValueError, TypeError, FileNotFoundError, RuntimeError) as exc:
        print(f"fastsal serve: {exc}", file=sys.stderr)
        return 2
    print(kserve_adapter.main_ready_line(service, args.host, args.port), flush=True)
    try:
        kserve_adapter.serve(service, host=args.host, port=args.port, grace_period=args.grace_period,
                             access_log=args.access_log)
    finally:
        service.close(timeout=args.grace_period)
    print("fastsal serve: stopped", flush=True)
    return 0
