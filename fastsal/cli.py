"""The ``fastsal`` command line: ``run``, ``demo``, ``topk`` and ``eval`` (``python -m fastsal`` too)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

EPILOG = """examples:
  fastsal demo --out demo/                      # offline, a minute on a CPU: the embedded model
  fastsal run images/ --out maps/               # every image under images/, embedded model
  fastsal run val/ --out maps/ --model resnet50 --weights IMAGENET1K_V2 --target label
  torchrun --nproc_per_node=4 -m fastsal run val/ --out maps/ --model resnet50 --weights r50.pth
  fastsal run 'shards/train-{000000..000099}.tar' --out maps/ --model resnet50 --weights IMAGENET1K_V2
then in Python:  fastsal.load_results("maps/")["cat/001.jpg"].box
"""


def _add_run(sub) -> None:
    p = sub.add_parser(
        "run",
        help="saliency maps and localization boxes for a folder of images",
        description="Compute a saliency map, the predicted class and a weak-localization box for every image "
        "of SRC, and write them to DIR. Rerunning the same command resumes; several processes "
        "(torchrun) split the work.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    p.add_argument("src", metavar="SRC", help="a folder of images (searched recursively; class subfolders give "
                   "labels), a .txt/.csv file of paths with optional labels (path,label), or tar shards in the "
                   "WebDataset layout: a .tar, a folder of .tar files, or a pattern 'data/shard-{000000..000999}.tar' "
                   "(quote it; a .cls member gives the label; result keys are <shard>.tar/<key>)")
    p.add_argument("--out", required=True, metavar="DIR", help="results folder (created; resumed if it holds this job)")
    p.add_argument("--model", default=None, help="torchvision or timm model name, or module:function; "
                   "default: the embedded model trained on synthetic shapes")
    p.add_argument("--weights", default=None, help="required with a torchvision or timm --model: a torchvision "
                   "weights name (e.g. DEFAULT, IMAGENET1K_V2; downloads once to the torch hub cache, needs internet), "
                   "'pretrained' (timm), a local .pth/.pt/.safetensors state dict, or 'random' for a randomly "
                   "initialised network on purpose (sanity checks)")
    p.add_argument("--method", default="guided", choices=["gradient", "deconvnet", "guided"])
    p.add_argument("--target", default="predicted", help="predicted (default), label (from class subfolders "
                   "or the list file) or a class index")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda[:N]")
    p.add_argument("--workers", type=int, default=2, help="image-decoding worker processes (0: in the main process)")
    p.add_argument("--size", type=int, default=None, help="input resolution (default: the model's)")
    p.add_argument("--box-threshold", type=float, default=0.2,
                   help="a box covers the largest connected region where the smoothed map >= this fraction "
                   "of its max (default 0.2)")
    p.add_argument("--box-smooth", type=float, default=0.03,
                   help="Gaussian blur before thresholding, as a fraction of the map's longer side (0: none)")
    p.add_argument("--save-original-size", action="store_true", help="also store each map resized to its image")
    p.add_argument("--map-dtype", default="float16", choices=["float16", "uint8"],
                   help="how maps are stored: float16 (default) or uint8 scaled by each map's own max, the scale "
                   "kept (half the space; load_results returns float maps either way)")
    p.add_argument("--no-exif-transpose", dest="exif_transpose", action="store_false",
                   help="use pixels as stored, ignoring the EXIF orientation tag (default: turn each image as a "
                   "viewer shows it, so boxes and maps are in the coordinates people see)")
    p.add_argument("--parquet", default="auto", choices=["auto", "yes", "no"],
                   help="write DIR/items.parquet at the end (auto: when pyarrow is installed; fastsal[parquet])")
    p.add_argument("--decode", default="auto", choices=["auto", "cpu", "gpu"],
                   help="JPEG decoding: gpu = torchvision.io.decode_jpeg on CUDA (auto: when running on CUDA)")
    p.add_argument("--loader-probe", type=int, default=256,
                   help="images read by the loader alone first, to report its throughput (0: skip)")
    p.add_argument("--overwrite", action="store_true", help="replace results of a different configuration in DIR")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="offline demo on the embedded model: overlays and the three methods side by side",
                       description="Generate a few synthetic images, explain them with the embedded model and write "
                       "overlay PNGs, a three-method grid and a summary. Runs offline in under a minute on a CPU.")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--images", type=int, default=8, help="how many synthetic images (default 8)")
    p.add_argument("--method", default="guided", choices=["gradient", "deconvnet", "guided"])


def _add_topk(sub) -> None:
    p = sub.add_parser("topk", help="Zeiler & Fergus: the top-k images of a channel, with their DeconvNet projections",
                       description="For one layer and channel, find the k images of SRC whose strongest activation in "
                       "that channel is largest, project each back to pixels with DeconvNet, and write a PNG grid.")
    p.add_argument("src", metavar="SRC")
    p.add_argument("--layer", required=True, help="qualified name of a module of the model (e.g. features.8)")
    p.add_argument("--channel", type=int, required=True)
    p.add_argument("--k", type=int, default=9)
    p.add_argument("--out", required=True, metavar="FILE.png")
    p.add_argument("--model", default=None, help="as for fastsal run")
    p.add_argument("--weights", default=None, help="as for fastsal run (required with a torchvision or timm --model)")
    p.add_argument("--size", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--method", default="deconvnet", choices=["gradient", "deconvnet", "guided"])
    p.add_argument("--device", default="auto")


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="sanity checks (MPRT, RandomLogit), pointing game, deletion/insertion: "
                       "do the maps explain the model?",
                       description="Run the checks of fastsal.evaluate on a model and a data set and write "
                       "results.json, a tidy results.csv (check, method, step, metric, mean, std, n), summary.md "
                       "and PNGs to DIR. Without --model and --data: the embedded model on its synthetic test "
                       "split, offline.")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--model", default=None, help="as for fastsal run (needs --data); default: the embedded model")
    p.add_argument("--weights", default=None, help="as for fastsal run")
    p.add_argument("--data", default=None, metavar="SRC", help="a CSV path,label,x0,y0,x1,y1 (boxes in image "
                   "pixels, half-open; write_dataset's format) or what fastsal run reads (no boxes); "
                   "default: the synthetic test split")
    p.add_argument("--checks", default="mprt,random-logit,pointing,deletion,insertion",
                   help="comma-separated, from mprt (cascading), mprt-independent, random-logit, "
                   "data-randomization, pointing, deletion, insertion (default: all but mprt-independent and "
                   "data-randomization)")
    p.add_argument("--methods", default="gradient,deconvnet,guided", help="comma-separated (default: all three)")
    p.add_argument("--n", type=int, default=200, help="images: the first N of the data (default 200)")
    p.add_argument("--batch-size", type=int, default=64, help="images per saliency pass (default 64)")
    p.add_argument("--seed", type=int, default=0, help="seed of the re-initializations and random classes")
    p.add_argument("--convention", default="adebayo", choices=["adebayo", "quantus"],
                   help="MPRT: adebayo (trainable parameters reset, BN statistics kept, own top class) or quantus "
                   "(BN statistics reset too, the labels explained)")
    p.add_argument("--steps", type=int, default=20, help="points of the deletion/insertion curves, minus one")
    p.add_argument("--permuted-weights", default=None, metavar="PATH",
                   help="data-randomization check: a state dict of the same model trained on permuted labels "
                   "(default for the embedded model: its shipped permuted-label twin)")
    p.add_argument("--size", type=int, default=None, help="input resolution (default: the model's)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastsal",
        description="fastsal: fast, memory-frugal saliency maps (Gradient, DeconvNet, Guided Backprop) for CNNs.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    _add_run(sub)
    _add_demo(sub)
    _add_topk(sub)
    _add_eval(sub)
    try:
        from fastsal.bench.cli import add_bench_parser
    except ImportError:
        pass
    else:
        add_bench_parser(sub)
    try:
        from fastsal.exporter.command import add_export_parser
    except ImportError:
        pass
    else:
        add_export_parser(sub)
    try:
        from fastsal.serve.cli import add_serve_parser
    except ImportError:
        pass
    else:
        add_serve_parser(sub)
    return parser


def _missing_extra(exc: ImportError) -> int:
    print(f"fastsal: {exc}. The command line needs the cli extra: pip install 'fastsal[cli]'", file=sys.stderr)
    return 2


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run":
            return _run(args)
        if args.command == "demo":
            from fastsal.jobs.demo import demo

            try:
                summary = demo(args.out, n_images=args.images, method=args.method)
            except ValueError as exc:
                print(f"fastsal demo: {exc}", file=sys.stderr)
                return 2
            print(json.dumps(summary, indent=2))
            return 0
        if args.command == "topk":
            from fastsal.jobs.topk import topk_from_args

            try:
                print(topk_from_args(args))
            except (ValueError, TypeError, FileNotFoundError, RuntimeError) as exc:
                print(f"fastsal topk: {exc}", file=sys.stderr)
                return 2
            return 0
        if args.command == "eval":
            from fastsal.evaluate.command import eval_from_args

            return eval_from_args(args)
        if args.command == "bench":
            from fastsal.bench.cli import run_bench

            return run_bench(args)
        if args.command == "export":
            from fastsal.exporter.command import run_export

            return run_export(args)
        if args.command == "serve":
            from fastsal.serve.cli import run_serve

            return run_serve(args)
    except ImportError as exc:
        if getattr(exc, "name", None) in ("PIL", "tqdm", "scipy", "torchvision"):
            return _missing_extra(exc)
        raise
    return 2


def _run(args) -> int:
    from fastsal.jobs.runner import JobError, RunOptions, run

    opts = RunOptions(
        src=args.src, out=args.out, model=args.model, weights=args.weights, method=args.method,
        target=args.target, batch_size=args.batch_size, dtype=args.dtype, device=args.device,
        workers=args.workers, size=args.size, box_threshold=args.box_threshold, box_smooth=args.box_smooth,
        save_original_size=args.save_original_size, overwrite=args.overwrite, decode=args.decode,
        loader_probe=args.loader_probe, progress=not args.quiet, map_dtype=args.map_dtype,
        exif_transpose=args.exif_transpose, parquet=args.parquet,
    )
    try:
        summary = run(opts)
    except JobError as exc:
        print(f"fastsal run: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    if summary is not None:
        r = summary["this_run"]
        lines = [
            f"images: {summary['images_total']} ({summary['errors_total']} unusable, see errors.tsv)",
            f"this run: {r['images']} images in {r['seconds']:.1f} s on {r['ranks']} process(es), {summary['device']}",
            f"saliency: {r['saliency_images_per_s'] or 0:.1f} images/s; loader alone: "
            f"{r['loader_only_images_per_s_rank0'] or 0:.1f} images/s (rank 0)",
            f"results: {summary['out']}  (fastsal.load_results(...) reads them)",
        ]
        if summary.get("table"):
            lines.append(f"table: {summary['table']}")
        print("\n".join(lines))
    return 0
