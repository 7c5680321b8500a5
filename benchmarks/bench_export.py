"""fastsal's exported graph in ONNX Runtime against ONNX Runtime inference, fastsal eager and Captum.

    python benchmarks/bench_export.py --models resnet50 vgg16 --batch 2 --repeats 5 \\
        --out benchmarks/results/cpu-export.csv

For each model (torchvision, random weights: the timings do not depend on them) and the
guided rule, four engines, each computing what a serving call needs, timed call by call,
interleaved repeat after repeat (the order rotates each repeat) so a slow spell on a
shared machine hits all alike:

* ``ort-saliency``: the file ``fastsal.export`` writes, in ONNX Runtime: logits + maps;
* ``ort-logits``: the plain model exported by ``torch.onnx.export``, in ONNX Runtime: logits only;
* ``fastsal``: ``fastsal.Explainer(model, "guided").explain(x)``: logits + maps, eager;
* ``captum``: ``model(x)`` for the predicted classes, then Captum's ``GuidedBackprop``.

ONNX Runtime and torch get the same number of threads (``--threads``, default: the CPU count);
ONNX Runtime's threads do not spin between runs (they would take the cores from torch's).
Targets (issue 14): ``ort-saliency`` <= 2.1x ``ort-logits`` (forward + backward against a
forward: the floor is about 2) and <= 0.7x ``fastsal``. The CSV rows carry the CPU, versions,
date and the load average before and after each model; a text summary goes beside it.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import statistics
import sys
import tempfile
import time
from typing import Callable, Dict, List

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _results import write_rows  # noqa: E402

from fastsal._machine import cpu_name as _cpu_name  # noqa: E402


def _session(path: str, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # no busy-waiting after a run: ONNX Runtime's threads would otherwise spin while the torch
    # engines run next in this process, and take their cores
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def _engines(name: str, batch: int, size: int, threads: int, workdir: str, log) -> Dict[str, Callable[[], object]]:
    import torchvision

    import fastsal

    model = torchvision.models.get_model(name, weights=None).eval()
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    xn = x.numpy()

    t0 = time.perf_counter()
    sal_path = os.path.join(workdir, f"{name}-guided.onnx")
    program = fastsal.export(model, "guided", x, path=sal_path)
    log(f"  fastsal.export {name}: {time.perf_counter() - t0:.0f} s; {program.fastsal_check}")
    t0 = time.perf_counter()
    plain_path = os.path.join(workdir, f"{name}-logits.onnx")
    torch.onnx.export(model, (x,), plain_path, dynamo=True, input_names=["image"], output_names=["logits"],
                      dynamic_shapes=({0: torch.export.Dim("batch", min=1)},), verbose=False)
    log(f"  torch.onnx.export {name} (logits only): {time.perf_counter() - t0:.0f} s")
    def mib(path):  # torch.onnx.export may put the weights in path + ".data"
        return sum(os.path.getsize(p) for p in (path, path + ".data") if os.path.exists(p)) / 2**20

    log(f"  file sizes: {mib(sal_path):.1f} MiB (logits + map), {mib(plain_path):.1f} MiB (logits only)")

    sal, plain = _session(sal_path, threads), _session(plain_path, threads)
    explainer = fastsal.Explainer(model, method="guided")
    engines = {
        "ort-saliency": lambda: sal.run(None, {"image": xn}),
        "ort-logits": lambda: plain.run(None, {"image": xn}),
        "fastsal": lambda: explainer.explain(x),
    }
    try:
        from captum.attr import GuidedBackprop
    except ImportError:
        log("  captum is not installed: its engine is left out")
    else:
        gbp = GuidedBackprop(model)

        def captum_call():
            with torch.no_grad():
                target = model(x).argmax(1)
            return gbp.attribute(x.clone().requires_grad_(True), target=target.tolist())

        engines["captum"] = captum_call
    # the two ONNX Runtime graphs give the same logits
    diff = float(abs(engines["ort-saliency"]()[0] - engines["ort-logits"]()[0]).max())
    log(f"  max |logits difference| between the two ONNX files: {diff:.2e}")
    return engines


def _measure(engines: Dict[str, Callable[[], object]], repeats: int, warmup: int) -> Dict[str, List[float]]:
    names = list(engines)
    for _ in range(warmup):
        for n in names:
            engines[n]()
    times: Dict[str, List[float]] = {n: [] for n in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            t0 = time.perf_counter()
            engines[n]()
            times[n].append((time.perf_counter() - t0) * 1e3)
    return times


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet50", "vgg16"])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", default="benchmarks/results/cpu-export.csv")
    args = parser.parse_args(argv)
    try:
        import onnxruntime
        import onnxscript  # noqa: F401
    except ImportError as exc:
        print(f"bench_export needs onnx, onnxscript and onnxruntime (pip install 'fastsal[export]'): {exc}")
        return 2
    torch.set_num_threads(args.threads)
    stamp = {
        "cpu": _cpu_name(), "threads": args.threads, "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    rows, lines = [], [f"bench_export: {stamp['cpu']}, {args.threads} threads, torch {stamp['torch']}, onnxruntime "
                       f"{stamp['onnxruntime']}, {stamp['date']}; guided, batch {args.batch}, {args.size} px, "
                       f"{args.repeats} interleaved repeats"]
    print(lines[0], flush=True)
    with tempfile.TemporaryDirectory() as workdir:
        for name in args.models:
            engines = _engines(name, args.batch, args.size, args.threads, workdir, lambda s: print(s, flush=True))
            load_before = os.getloadavg()[0]
            times = _measure(engines, args.repeats, args.warmup)
            load_after = os.getloadavg()[0]
            med = {n: statistics.median(t) for n, t in times.items()}
            for n, t in times.items():
                rows.append({"model": name, "engine": n, "method": "guided", "batch": args.batch, "size": args.size,
                             "ms_median": round(med[n], 1), "ms_min": round(min(t), 1), "ms_max": round(max(t), 1),
                             "vs_ort_logits": round(med[n] / med["ort-logits"], 3),
                             "vs_fastsal": round(med[n] / med["fastsal"], 3),
                             "load1_before": round(load_before, 2), "load1_after": round(load_after, 2), **stamp})
            vs_logits = med["ort-saliency"] / med["ort-logits"]
            vs_fastsal = med["ort-saliency"] / med["fastsal"]
            summary = (f"{name} b{args.batch}: " + ", ".join(f"{n} {med[n]:.0f} ms" for n in med)
                       + f" | ort-saliency / ort-logits = {vs_logits:.2f} (target <= 2.1: "
                       f"{'met' if vs_logits <= 2.1 else 'MISSED'}), ort-saliency / fastsal = {vs_fastsal:.2f} "
                       f"(target <= 0.7: {'met' if vs_fastsal <= 0.7 else 'MISSED'})"
                       + (f", captum / ort-saliency = {med['captum'] / med['ort-saliency']:.2f}" if "captum" in med else "")
                       + f"; load {load_before:.1f} -> {load_after:.1f}")
            print(summary, flush=True)
            lines.append(summary)
    write_rows(args.out, rows)
    with open(os.path.splitext(args.out)[0] + ".txt", "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
