"""Each fastsal kernel against its eager-torch equivalent, in GB/s of the minimal bytes.

    python benchmarks/bench_kernels.py --out benchmarks/results/kernels.csv

On a GPU: the Triton kernels (64 M-element ReLU tensors; VGG-sized 64x64x112x112 pools)
next to torch's ``threshold_backward``, ``max_pool2d_with_indices_backward`` and the
relu+pool pair, and the card's measured copy bandwidth (a device-to-device clone). On a
CPU (``--quick`` sizes) the reference path runs; only the ratios mean anything there.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from _results import machine_info, time_it, write_rows  # noqa: E402

from fastsal.backend import kernels_for  # noqa: E402

RULES = {0: "gradient", 1: "deconvnet", 2: "guided"}


def _gbps(nbytes: float, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9


def bench(device: str, relu_numel: int, pool_shape, dtypes, repeats: int):
    info = machine_info()
    rows = []

    def row(op, impl, dtype, nbytes, t, **extra):
        r = dict(op=op, impl=impl, dtype=str(dtype).replace("torch.", ""), min_bytes=int(nbytes),
                 ms=round(t["ms"], 4), ms_p20=round(t["ms_p20"], 4), ms_p80=round(t["ms_p80"], 4),
                 gb_per_s=round(_gbps(nbytes, t["ms"]), 2), **extra, **info)
        rows.append(r)
        print(f"{op:28s} {impl:22s} {r['dtype']:9s} {r['ms']:9.3f} ms  {r['gb_per_s']:8.1f} GB/s")

    for dtype in dtypes:
        es = torch.tensor([], dtype=dtype).element_size()
        x = torch.randn(relu_numel, device=device, dtype=dtype)
        k = kernels_for(x)
        impl = "triton" if k.__name__.endswith("triton") else "reference"

        copy = time_it(lambda: x.clone(), repeats=repeats)
        row("copy", "torch", dtype, 2 * x.numel() * es, copy)

        n = x.numel()
        t = time_it(lambda: k.relu_forward(x, True), repeats=repeats)
        row("relu_forward+mask", impl, dtype, 2 * n * es + n / 8, t)
        t = time_it(lambda: torch.relu(x), repeats=repeats)
        row("relu_forward", "torch", dtype, 2 * n * es, t)

        y, bits = k.relu_forward(x, True)
        grad = torch.randn_like(x)
        for code, name in RULES.items():
            nbytes = 2 * n * es + (0 if code == 1 else n / 8)
            t = time_it(lambda: k.relu_backward(grad, bits, code), repeats=repeats)
            row(f"relu_backward_{name}", impl, dtype, nbytes, t, copy_fraction=round(copy["ms"] / t["ms"], 3))
        t = time_it(lambda: torch.ops.aten.threshold_backward(grad, y, 0), repeats=repeats)
        row("threshold_backward", "torch", dtype, 3 * n * es, t, copy_fraction=round(copy["ms"] / t["ms"], 3))

        # VGG-sized relu -> 2x2 max-pool
        xp = torch.randn(pool_shape, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
        n_in = xp.numel()
        args = ([2, 2], [2, 2], [0, 0], [1, 1])
        t = time_it(lambda: k.max_pool2d_forward(xp, *args, False, True, True), repeats=repeats)
        pooled, sw, pbits = k.max_pool2d_forward(xp, *args, False, True, True)
        m = pooled.numel()
        row("relu_max_pool2d_forward", impl, dtype, n_in * es + m * es + m + m / 8, t)
        t = time_it(lambda: F.max_pool2d(torch.relu(xp), 2, return_indices=True), repeats=repeats)
        row("relu+max_pool2d_forward", "torch", dtype, 2 * n_in * es + n_in * es + m * (es + 8), t)

        g_out = torch.randn_like(pooled)
        fused_bytes = m * es + m + m / 8 + n_in * es
        t_fused = time_it(
            lambda: k.max_pool2d_backward(g_out, sw, pbits, 2, list(xp.shape), *args, True), repeats=repeats
        )
        row("relu_max_pool2d_backward_guided", impl, dtype, fused_bytes, t_fused)
        t_unpool = time_it(
            lambda: k.max_pool2d_backward(g_out, sw, pbits, -1, list(xp.shape), *args, True), repeats=repeats
        )
        row("max_pool2d_backward", impl, dtype, m * es + m + n_in * es, t_unpool)

        relu_out = torch.relu(xp)
        _, indices = F.max_pool2d(relu_out, 2, return_indices=True)

        def torch_pair():
            g = torch.ops.aten.max_pool2d_with_indices_backward(g_out, relu_out, [2, 2], [2, 2], [0, 0], [1, 1], False, indices)
            return torch.ops.aten.threshold_backward(g, relu_out, 0)

        t_pair = time_it(torch_pair, repeats=repeats)
        row("max_pool2d_with_indices_backward+threshold_backward", "torch", dtype,
            m * es + m * 8 + 2 * n_in * es + 2 * n_in * es, t_pair,
            fused_speedup=round(t_pair["ms"] / t_fused["ms"], 3))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results/kernels.csv", help="CSV file to write")
    p.add_argument("--quick", action="store_true", help="small sizes (CPU, smoke test)")
    p.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated")
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.quick or device == "cpu":
        relu_numel, pool_shape, repeats = 1 << 20, (4, 64, 56, 56), 5
    else:
        relu_numel, pool_shape, repeats = 64 << 20, (64, 64, 112, 112), 20
    dtypes = [getattr(torch, d.strip()) for d in args.dtypes.split(",")]
    rows = bench(device, relu_numel, pool_shape, dtypes, repeats)
    write_rows(args.out, rows)
    print(f"wrote {len(rows)} rows to {args.out}")


if __name__ == "__main__":
    main()
