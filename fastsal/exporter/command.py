"""``fastsal export``: write a model's saliency graph as an ONNX file.

    fastsal export --out model.onnx                         # the embedded default model, guided
    fastsal export --model resnet50 --weights IMAGENET1K_V2 --method guided --out r50.onnx --size 224

Beside ``model.onnx`` it writes ``model.onnx.json``: the inputs and outputs, the image size,
the normalization the graph expects its input to have had, the class names when known, and
the check's figures.
"""

from __future__ import annotations

import json
import os
import sys

DESCRIPTION = (
    "Export a model and a saliency method as one ONNX graph, image -> (logits, saliency map), for ONNX "
    "Runtime, TensorRT or Triton Inference Server. The graph takes the normalized image (N, 3, H, W) at one "
    "fixed size (the batch may vary) and, with --target input, an int64 class index per image. After export, "
    "when onnxruntime is installed, the file is run on a random example and compared with fastsal eager."
)


def add_export_parser(sub) -> None:
    p = sub.add_parser("export", help="write a model's saliency graph (image -> logits, saliency map) as ONNX",
                       description=DESCRIPTION)
    p.add_argument("--out", required=True, metavar="FILE.onnx", help="the ONNX file to write (and FILE.onnx.json)")
    p.add_argument("--model", default=None, help="as for fastsal run; default: the embedded model")
    p.add_argument("--weights", default=None, help="as for fastsal run (required with a torchvision or timm --model)")
    p.add_argument("--method", default="guided", choices=["gradient", "deconvnet", "guided"])
    p.add_argument("--size", type=int, default=None, help="the image side the graph is made for (default: the model's)")
    p.add_argument("--target", default="predicted", choices=["predicted", "input"],
                   help="predicted: explain each image's argmax (image is the only input); input: the graph also "
                   "takes the class to explain, one int64 per image")
    p.add_argument("--reduce", default="abs_max", help="abs_max (max over channels of |g|: maps (N, H, W), default), "
                   "another fastsal reduction (abs_sum, l2, max, sum, abs) or none (the raw gradient)")
    p.add_argument("--static-batch", action="store_true", help="fix the batch size to --batch (default: any batch)")
    p.add_argument("--batch", type=int, default=2, help="batch size of the example the graph is traced and checked on")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (>= 18; default: torch's)")
    p.add_argument("--strict", action="store_true", help="refuse ReLU-like activations fastsal has no rule for")
    p.add_argument("--check", default="error", choices=["error", "warn", "skip"],
                   help="what a mismatch between ONNX Runtime and fastsal eager does (default: error)")


def _metadata(args, loaded, program, size) -> dict:
    check = program.fastsal_check
    return {
        "method": args.method,
        "model": loaded.description,
        "inputs": {"image": {"dtype": "float32", "shape": ["batch" if not args.static_batch else args.batch, 3, *size]},
                   **({"target": {"dtype": "int64", "shape": ["batch"]}} if args.target == "input" else {})},
        "outputs": {"logits": {"dtype": "float32", "shape": ["batch", "classes"]},
                    "saliency": {"dtype": "float32", "reduce": None if args.reduce.lower() == "none" else args.reduce}},
        "preprocess": {"size": list(size), "mean": list(loaded.preprocess.mean), "std": list(loaded.preprocess.std),
                       "note": "RGB scaled to [0, 1], resized to size, then (x - mean) / std, channels first"},
        "class_names": loaded.class_names,
        "check": {"ran": check.ran, "passed": check.passed, "reason": check.reason, "errors": check.errors,
                  "tolerances": check.tolerances},
    }


def run_export(args) -> int:
    import torch

    from fastsal.exporter.api import ExportCheckError, export
    from fastsal.jobs.models import load_model

    if args.batch < 1:
        print(f"fastsal export: --batch must be >= 1, got {args.batch}", file=sys.stderr)
        return 2
    if args.size is not None and args.size < 1:
        print(f"fastsal export: --size must be >= 1, got {args.size}", file=sys.stderr)
        return 2
    try:
        loaded = load_model(args.model, args.weights, args.size)
    except (ValueError, TypeError, FileNotFoundError, RuntimeError) as exc:
        print(f"fastsal export: {exc}", file=sys.stderr)
        return 2
    size = tuple(loaded.preprocess.size)
    generator = torch.Generator().manual_seed(0)
    image = torch.randn(args.batch, 3, *size, generator=generator)
    example = image if args.target == "predicted" else (image, torch.zeros(args.batch, dtype=torch.int64))
    reduce = None if args.reduce.lower() == "none" else args.reduce
    try:
        program = export(loaded.model, args.method, example, target=args.target, reduce=reduce,
                         dynamic_batch=not args.static_batch, path=args.out, opset=args.opset, strict=args.strict,
                         check=args.check)
    except (ValueError, TypeError, RuntimeError, ImportError) as exc:
        # ExportCheckError is a RuntimeError: its message has the figures and keeps the file
        kind = "check failed" if isinstance(exc, ExportCheckError) else "error"
        print(f"fastsal export: {kind}: {exc}", file=sys.stderr)
        return 2 if not isinstance(exc, ExportCheckError) else 1
    meta = _metadata(args, loaded, program, size)
    with open(args.out + ".json", "w") as f:
        json.dump(meta, f, indent=2)
    mib = os.path.getsize(args.out) / 2**20
    print(f"wrote {args.out} ({mib:.1f} MiB) and {args.out}.json: {loaded.description}, {args.method}, "
          f"image {'batch' if not args.static_batch else args.batch}x3x{size[0]}x{size[1]}")
    print(program.fastsal_check)
    return 0


__all__ = ["add_export_parser", "run_export"]
