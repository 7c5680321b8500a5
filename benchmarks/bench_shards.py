"""``fastsal run`` on tar shards versus the same images as loose files, CPU.

Writes N synthetic JPEG photos (smooth colour fields with shapes and noise, W x H pixels)
twice: as loose files in one folder and as WebDataset tar shards with the same bytes.
Then runs ``python -m fastsal run`` on each, interleaved (loose, tar, tar, loose, ...) so
drifting machine load hits both alike, with the same model, batch size and ``--workers``.
Each run's own figures come from its summary.json: saliency images/s over the main loop
(process start-up excluded) and the loader alone on its first ``--loader-probe`` images.
Both sources are in the page cache (just written): this compares the CPU cost of reading
and decoding, not disks.

    python benchmarks/bench_shards.py                       # 1024 images of 320x240, 8 shards, 3 repeats
    python benchmarks/bench_shards.py --n 256 --repeats 1   # a quick look

Writes benchmarks/results/cpu-shards-vs-loose.csv (one row per run, with CPU, versions,
date and the load average before and after) and prints the medians and their ratio.
``--decode gpu`` needs CUDA and is not measured by this script on a CPU.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time

import numpy as np
from fastsal._machine import cpu_name as _cpu_name

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def _photo(rng, w, h) -> bytes:
    from PIL import Image, ImageDraw

    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([np.sin(xx / rng.uniform(20, 80) + rng.uniform(0, 6)) * 60 + 128 + yy * rng.uniform(-0.2, 0.2)
                     for _ in range(3)], axis=2)
    base += rng.normal(0, 12, base.shape)
    im = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(im)
    for _ in range(4):
        x0, y0 = rng.integers(0, w - 20), rng.integers(0, h - 20)
        draw.ellipse([x0, y0, x0 + rng.integers(10, w // 2), y0 + rng.integers(10, h // 2)],
                     fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def make_data(root: str, n: int, w: int, h: int, n_shards: int):
    rng = np.random.default_rng(0)
    loose = os.path.join(root, "loose")
    tars = os.path.join(root, "tars")
    os.makedirs(loose)
    os.makedirs(tars)
    per = -(-n // n_shards)
    total = 0
    for s in range(n_shards):
        with tarfile.open(os.path.join(tars, f"shard-{s:06d}.tar"), "w") as tar:
            for i in range(s * per, min(n, (s + 1) * per)):
                data = _photo(rng, w, h)
                total += len(data)
                key = f"img{i:07d}"
                with open(os.path.join(loose, key + ".jpg"), "wb") as fh:
                    fh.write(data)
                for name, payload in ((key + ".jpg", data), (key + ".cls", str(i % 10).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return loose, tars, total


def run_once(src: str, out: str, args) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "fastsal", "run", src, "--out", out, "--workers", str(args.workers),
           "--batch-size", str(args.batch_size), "--device", "cpu", "--quiet", "--parquet", "no",
           "--loader-probe", str(args.loader_probe)]
    if args.model:
        cmd += ["--model", args.model, "--weights", args.weights]
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    with open(os.path.join(out, "summary.json")) as fh:
        summary = json.load(fh)
    r = summary["this_run"]
    return {"images": r["images"], "errors": summary["errors_total"], "loop_s": r["seconds"],
            "saliency_images_per_s": r["saliency_images_per_s"],
            "loader_only_images_per_s": r["loader_only_images_per_s_rank0"], "wall_s": round(wall, 2),
            "load1_before": round(load_before, 2), "load1_after": round(os.getloadavg()[0], 2)}



def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1024, help="images")
    p.add_argument("--width", type=int, default=320)
    p.add_argument("--height", type=int, default=240)
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--loader-probe", type=int, default=256)
    p.add_argument("--model", default=None, help="default: the embedded model (64 px input)")
    p.add_argument("--weights", default="random")
    p.add_argument("--out", default=os.path.join(HERE, "results", "cpu-shards-vs-loose.csv"))
    args = p.parse_args()

    import PIL
    import torch
    import torchvision

    import fastsal
    from _results import write_rows

    root = tempfile.mkdtemp(prefix="fastsal-bench-shards-")
    try:
        loose, tars, total = make_data(root, args.n, args.width, args.height, args.shards)
        print(f"{args.n} JPEGs of {args.width}x{args.height} ({total / 1e6:.1f} MB), {args.shards} shards; "
              f"workers {args.workers}, batch {args.batch_size}", flush=True)
        common = {"cpu": _cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__,
                  "torchvision": torchvision.__version__, "pillow": PIL.__version__,
                  "python": platform.python_version(), "fastsal": fastsal.__version__,
                  "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                  "n": args.n, "image_size": f"{args.width}x{args.height}", "shards": args.shards,
                  "workers": args.workers, "batch_size": args.batch_size, "model": args.model or "default"}
        rows = []
        for rep in range(args.repeats):
            order = ("loose", "tar") if rep % 2 == 0 else ("tar", "loose")
            for kind in order:
                res = run_once(loose if kind == "loose" else tars, os.path.join(root, f"out-{kind}"), args)
                assert res["images"] == args.n and res["errors"] == 0, res
                rows.append({"source": kind, "repeat": rep, **res, **common})
                print(f"  {kind:5s} rep {rep}: {res['saliency_images_per_s']:7.1f} img/s saliency, "
                      f"{res['loader_only_images_per_s']:7.1f} img/s loader alone "
                      f"(load {res['load1_before']} -> {res['load1_after']})", flush=True)
        write_rows(args.out, rows)
        med = {(k, m): statistics.median(r[m] for r in rows if r["source"] == k)
               for k in ("loose", "tar") for m in ("saliency_images_per_s", "loader_only_images_per_s")}
        for m in ("saliency_images_per_s", "loader_only_images_per_s"):
            print(f"median {m}: loose {med[('loose', m)]:.1f}, tar {med[('tar', m)]:.1f}, "
                  f"tar/loose {med[('tar', m)] / med[('loose', m)]:.2f}")
        print(f"wrote {args.out}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
