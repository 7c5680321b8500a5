"""``fastsal bench``: the command-line face of :mod:`fastsal.bench.runner`."""

from __future__ import annotations

import argparse
import csv
import os
import sys

QUICK = dict(models=["resnet18", "vgg11"], batch_sizes=[4], size=64, repeats=3, warmup=1)


def add_bench_parser(sub) -> None:
    p = sub.add_parser(
        "bench", help="saliency throughput and memory: fastsal vs Captum vs plain autograd vs inference",
        description="Measure, in one interleaved run, images/s, peak memory and the largest batch that fits a "
        "memory budget for inference, plain autograd, Captum and fastsal (eager; on CUDA also torch.compile and "
        "a CUDA graph). Writes a CSV, prints a table and the ratios, and draws a PNG next to the CSV.",
    )
    p.add_argument("--case", nargs="+", default=None, metavar="MODEL:DTYPE:BATCH[:ENGINE+...]",
                   help="run these cases, in this order, instead of every --model x --dtype x --batch-size "
                   "(e.g. resnet50:bf16:256 resnet50:fp32:64:inference+captum+fastsal); a case's engines are "
                   "those of --engine it names")
    p.add_argument("--model", nargs="+", default=None, help="torchvision model names (default: resnet50 vgg16)")
    p.add_argument("--batch-size", nargs="+", type=int, default=None, help="default: 8 on CPU, 64 256 on CUDA")
    p.add_argument("--dtype", nargs="+", default=None, choices=["fp32", "bf16", "fp16"],
                   help="default: fp32 on CPU, bf16 fp32 on CUDA")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--method", nargs="+", default=None, choices=["gradient", "deconvnet", "guided"],
                   help="default: all three (with --top-k: guided)")
    p.add_argument("--engine", nargs="+", default=None,
                   help="default: inference autograd captum fastsal fastsal-compile fastsal-graph (with --top-k: "
                   "inference captum-k-calls fastsal-k-calls fastsal-topk)")
    p.add_argument("--size", type=int, default=224, help="image side in pixels")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--memory-budget-gib", type=float, default=None,
                   help="budget for the largest-batch estimate (default: the card's memory, or 16 on CPU)")
    p.add_argument("--out", default=None, metavar="FILE.csv", help="default: bench.csv (with --top-k: bench-topk.csv, "
                   "appended to)")
    p.add_argument("--top-k", type=int, default=None, metavar="K",
                   help="instead: K classes per image, fastsal's Explainer(top_k=K) (one forward, K backward passes) "
                   "vs Captum's class called K times, interleaved; default model resnet50, batch 4, method guided")
    p.add_argument("--quick", action="store_true", help="small models and images: a CPU run under two minutes")
    p.add_argument("--no-plot", action="store_true", help="write no PNG (the CSVs only)")


def run_bench(args) -> int:
    import torch

    if args.top_k is not None:
        return _run_topk(args)
    args.method = args.method or ["gradient", "deconvnet", "guided"]
    args.engine = args.engine or ["inference", "autograd", "captum", "fastsal", "fastsal-compile", "fastsal-graph"]
    args.out = args.out or "bench.csv"

    from fastsal.bench.plot import plot
    from fastsal.bench.runner import bench, parse_case, product_cases, ratios

    device = torch.device("cuda" if (args.device == "auto" and torch.cuda.is_available()) else
                          ("cpu" if args.device == "auto" else args.device))
    cuda = device.type == "cuda"
    models = args.model or (QUICK["models"] if args.quick else ["resnet50", "vgg16"])
    batches = args.batch_size or (QUICK["batch_sizes"] if args.quick else ([64, 256] if cuda else [8]))
    dtypes = args.dtype or (["bf16", "fp32"] if cuda else ["fp32"])
    size = QUICK["size"] if args.quick and args.size == 224 else args.size
    repeats = QUICK["repeats"] if args.quick and args.repeats == 10 else args.repeats
    warmup = QUICK["warmup"] if args.quick and args.warmup == 2 else args.warmup
    budget = args.memory_budget_gib or (torch.cuda.get_device_properties(device).total_memory / 2**30 if cuda else 16.0)
    cases = [parse_case(c) for c in args.case] if args.case else product_cases(models, dtypes, batches)
    print(f"fastsal bench on {device}: cases {', '.join(_case_name(c) for c in cases)}, {size}px, "
          f"{repeats} interleaved repeats", flush=True)
    ratio_path = os.path.splitext(args.out)[0] + "_ratios.csv"
    sink = _RowSink(args.out, ratio_path, ratios)
    try:
        rows = bench(cases, device, args.engine, args.method, size, repeats, warmup, budget,
                     log=lambda s: print(s, flush=True), on_row=sink.add)
    finally:
        sink.close()
    # the final files: every row with its peak memory and largest batch, and the ratios
    _write_csv(args.out, rows)
    table = ratios(rows)
    _write_csv(ratio_path, table)
    png = None if args.no_plot else os.path.splitext(args.out)[0] + ".png"
    if png:
        plot(rows, png, title=f"fastsal bench - {rows[0]['card'] if rows else ''} - {rows[0]['date'] if rows else ''}")
    print("\nratios (fastsal / other; throughput > 1 and memory < 1 favour fastsal):")
    for r in table:
        print(f"  {r['model']:9s} {r['dtype']:4s} b={r['batch_size']:<4d} {r['engine']:15s} {r['method']:9s} "
              f"vs inference x{r['vs_inference_throughput']}  vs autograd x{r['vs_autograd_throughput']}  "
              f"vs captum x{r['vs_captum_throughput']} (memory x{r['vs_captum_peak_mem']}, "
              f"largest batch x{r['vs_captum_largest_batch']})")
    print(f"\nwrote {args.out}, {ratio_path}" + (f" and {png}" if png else ""))
    return 0


def _run_topk(args) -> int:
    import torch

    from fastsal.bench.topk import append_csv, bench_topk

    if args.top_k < 1:
        raise SystemExit(f"fastsal bench: --top-k must be at least 1, got {args.top_k}")
    if args.case or args.quick:
        raise SystemExit("fastsal bench: --top-k takes --model, --batch-size, --method, --size, --repeats, not --case "
                         "or --quick")
    device = torch.device("cuda" if (args.device == "auto" and torch.cuda.is_available()) else
                          ("cpu" if args.device == "auto" else args.device))
    out = args.out or "bench-topk.csv"
    rows = []
    for model in args.model or ["resnet50"]:
        for batch in args.batch_size or [4]:
            print(f"fastsal bench --top-k {args.top_k} on {device}: {model}, batch {batch}, {args.size}px, "
                  f"{args.repeats} interleaved repeats", flush=True)
            rows += bench_topk(model, batch, args.top_k, args.method or ["guided"], device, args.size, args.repeats,
                               args.warmup, args.engine, log=lambda s: print(s, flush=True))
    append_csv(out, rows)
    print("\nthroughput vs Captum calling its class K times (> 1 favours the engine):")
    for r in rows:
        if r.get("vs_captum_throughput") is not None and r["engine"] != "captum-k-calls":
            print(f"  {r['model']} b={r['batch_size']} K={r['top_k']} {r['engine']:16s} {r['method']:9s} "
                  f"x{r['vs_captum_throughput']}  (load {r['load_before']} -> {r['load_after']})")
    print(f"\nappended {len(rows)} rows to {out}")
    return 0


def _case_name(c) -> str:
    return f"{c.model}:{c.dtype}:{c.batch_size}" + (":" + "+".join(c.engines) if c.engines else "")


class _RowSink:
    """Writes each row to the CSV as it comes (flushed), and the ratios of the rows so far,
    so a run cut short (a timeout, a crash) leaves what it measured on disk."""

    def __init__(self, path: str, ratio_path: str, ratios):
        from fastsal.bench.runner import FIELDS

        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.rows = []
        self.ratio_path = ratio_path
        self.ratios = ratios
        self.fh = open(path, "w", newline="")
        self.writer = csv.DictWriter(self.fh, fieldnames=FIELDS, extrasaction="ignore")
        self.writer.writeheader()
        self.fh.flush()

    def add(self, row) -> None:
        self.rows.append(dict(row))
        self.writer.writerow(row)
        self.fh.flush()
        _write_csv(self.ratio_path, self.ratios(self.rows))

    def close(self) -> None:
        self.fh.close()


def _write_csv(path, rows) -> None:
    if not rows:
        return
    from fastsal.bench.runner import FIELDS

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fields = [f for f in FIELDS if any(f in r for r in rows)]
    for r in rows:
        fields += [k for k in r if k not in fields]
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="bench_models")
    add_bench_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", *(sys.argv[1:] if argv is None else argv)])
    return run_bench(args)
