"""fastsal's cascading MPRT against Quantus 0.6 ``MPRT``, side by side in one process.

    PYTHONPATH=/path/to/quantus python benchmarks/bench_eval.py --n 200 --repeats 3 \\
        --out benchmarks/results/cpu-eval-vs-quantus.csv

The embedded default model (``fastsal.default_model``) and the first ``--n`` images of its
synthetic ``test`` split, with their true labels. Three engines, interleaved repeat after
repeat (the order rotates each repeat) so a slow spell on a shared machine hits all alike:

* ``fastsal-full``: ``fastsal.evaluate.mprt(model, x, methods=..., mode="cascading")`` with
  its defaults: the Adebayo convention (each randomized model explains its own top class)
  and every similarity (``rank_abs``, ``rank_noabs``, ``ssim``, ``hog``);
* ``fastsal-spearman``: the like-for-like run, ``convention="quantus"``, the true labels,
  ``similarities=("rank_abs",)``: the work Quantus does;
* ``quantus``: one ``quantus.MPRT(layer_order="top_down")`` call per method (Quantus
  explains one method per call), Spearman of |map| (its default), ``batch_size=64`` (its
  default). Its ``explain_func`` is written here, as a Quantus user would: Captum's
  ``Saliency`` / ``Deconvolution`` / ``GuidedBackprop`` on the model Quantus passes in,
  reduced to ``max_c |g_c|``, the same map fastsal's ``rank_abs`` compares.

Every layer with parameters is re-initialized in turn (13 on the default model). The ratios
are the median ``quantus`` time over each fastsal engine's median (> 1: fastsal is faster).
The ``quantus`` and ``fastsal-spearman`` per-image scores are compared too
(``max_abs_diff``): the two runs do the same computation.

Quantus and Captum are benchmark-only dependencies (not in fastsal's pyproject): install
them apart, e.g. ``pip install --target /tmp/qsite quantus==0.6.0``, and put that folder on
``PYTHONPATH``. Without them the script stops with a message saying so.

Writes ``--out`` (CSV rows: one per engine, then one per ratio, each stamped with the CPU,
the thread count, the versions and the date) and a text summary beside it (``.txt``).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import statistics
import sys
import time
import warnings
from typing import Callable, Dict, List

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
from _results import write_rows  # noqa: E402

import fastsal  # noqa: E402
from fastsal.default_model import DEFAULT_PREPROCESS, build_default_model  # noqa: E402
from fastsal.default_model import synthetic  # noqa: E402
from fastsal._machine import cpu_name  # noqa: E402
from fastsal.evaluate.randomization import METHODS, mprt  # noqa: E402
from fastsal.evaluate.similarity import SIMILARITIES  # noqa: E402

QUANTUS_BATCH = 64  # quantus.MPRT's default batch_size
CAPTUM_CLASS = {"gradient": "Saliency", "deconvnet": "Deconvolution", "guided": "GuidedBackprop"}


def _require_quantus():
    try:
        import quantus  # noqa: F401
        import captum.attr  # noqa: F401
    except ImportError as exc:
        sys.exit(
            f"bench_eval.py needs Quantus 0.6 and Captum, benchmark-only dependencies that fastsal does not "
            f"install ({exc}). Install them apart and put them on PYTHONPATH, e.g.\n"
            f"    python -m pip install --target /tmp/qsite quantus==0.6.0 captum\n"
            f"    PYTHONPATH=/tmp/qsite python benchmarks/bench_eval.py ..."
        )
    import quantus
    import captum

    return quantus, captum


def data(n: int):
    """The first ``n`` images of the synthetic test split, normalized (N, 3, 64, 64), and their labels."""
    images, labels, _ = synthetic.batch(range(n), split="test")
    x = DEFAULT_PREPROCESS.normalize(torch.from_numpy(images))
    return x.contiguous(), labels


def captum_explain(model, inputs, targets, **kwargs) -> np.ndarray:
    """Quantus ``explain_func``: Captum's map for ``kwargs["method"]``, reduced to ``max_c |g_c|`` (N, 1, H, W)."""
    import captum.attr

    cls = getattr(captum.attr, CAPTUM_CLASS[kwargs["method"]])
    x = torch.as_tensor(inputs, dtype=torch.float32)
    t = torch.as_tensor(targets).long()
    grad = cls(model).attribute(x, target=t)
    return grad.detach().abs().amax(dim=1, keepdim=True).numpy()


def run_quantus(quantus, model, x: torch.Tensor, y: np.ndarray, methods, seed: int) -> Dict[str, dict]:
    """One quantus.MPRT call per method; returns {method: {layer: per-image scores}}."""
    out = {}
    xn = x.numpy()
    for m in methods:
        metric = quantus.MPRT(layer_order="top_down", seed=seed, disable_warnings=True, display_progressbar=False)
        with torch.random.fork_rng():  # Quantus reseeds the global generator
            out[m] = metric(model=model, x_batch=xn, y_batch=y, a_batch=None, explain_func=captum_explain,
                            explain_func_kwargs={"method": m}, channel_first=True, device="cpu",
                            batch_size=QUANTUS_BATCH)
    return out


def agreement(fs, qs, methods) -> Dict[str, float]:
    """Per method, the largest |fastsal - Quantus| over layers and images (Spearman of |map|, Quantus convention)."""
    worst = {}
    for m in methods:
        worst[m] = 0.0
        for step in fs.steps:
            a = fs.score(m, step, "rank_abs")
            b = np.asarray(qs[m][step], dtype=np.float64)
            ok = np.isfinite(a) & np.isfinite(b)
            if ok.any():
                worst[m] = max(worst[m], float(np.abs(a[ok] - b[ok]).max()))
    return worst


def _stats(samples: List[float]) -> Dict[str, float]:
    s = sorted(samples)
    q = statistics.quantiles(s, n=5) if len(s) >= 5 else [s[0], s[0], s[-1], s[-1]]
    return {"s": statistics.median(s), "s_min": s[0], "s_p20": q[0], "s_p80": q[3], "s_max": s[-1]}


def bench(n: int, methods, repeats: int, seed: int, threads: int, out: str) -> List[dict]:
    quantus, captum = _require_quantus()
    # Captum warns on every call (inputs made to require grad, hooks on ReLUs): keep the log readable
    warnings.filterwarnings("ignore", category=UserWarning, module="captum")
    if threads:
        torch.set_num_threads(threads)
    model = build_default_model()
    x, y = data(n)
    target = torch.from_numpy(y)

    engines: Dict[str, Callable[[], object]] = {
        "fastsal-full": lambda: mprt(model, x, methods=methods, mode="cascading", seed=seed),
        "fastsal-spearman": lambda: mprt(model, x, methods=methods, mode="cascading", convention="quantus",
                                         target=target, seed=seed, similarities=("rank_abs",)),
        "quantus": lambda: run_quantus(quantus, model, x, y, methods, seed),
    }
    # warm-up on 4 images: imports, first-call allocations, Captum's and skimage's lazy set-up
    x4, y4 = x[:4], y[:4]
    mprt(model, x4, methods=methods, mode="cascading")
    mprt(model, x4, methods=methods, convention="quantus", target=torch.from_numpy(y4), similarities=("rank_abs",))
    run_quantus(quantus, model, x4, y4, methods, seed)

    names = list(engines)
    samples: Dict[str, List[float]] = {k: [] for k in names}
    cpu: Dict[str, List[float]] = {k: [] for k in names}  # process CPU seconds: robust when the machine is shared
    last: Dict[str, object] = {}
    load_before = os.getloadavg()[0]
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            t0, c0 = time.perf_counter(), time.process_time()
            last[name] = engines[name]()
            samples[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
            print(f"repeat {r + 1}/{repeats}  {name:17s} {samples[name][-1]:8.2f} s  ({cpu[name][-1]:.2f} s CPU)",
                  flush=True)
    load = f"{load_before:.1f} -> {os.getloadavg()[0]:.1f}"

    # both reset every layer under seed + 1 (Quantus's convention), so the scores can be compared
    diff = agreement(last["fastsal-spearman"], last["quantus"], methods)
    n_layers = len(last["fastsal-full"].steps)
    info = dict(cpu=cpu_name(), cpu_count=os.cpu_count(), threads=torch.get_num_threads(),
                torch=torch.__version__, fastsal=fastsal.__version__, quantus=quantus.__version__,
                captum=captum.__version__, numpy=np.__version__, load_avg_1min=load,
                date=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))
    sims = {"fastsal-full": "+".join(SIMILARITIES), "fastsal-spearman": "rank_abs", "quantus": "rank_abs"}
    conv = {"fastsal-full": "adebayo", "fastsal-spearman": "quantus", "quantus": "quantus"}
    rows, st = [], {}
    for name in names:
        st[name] = _stats(samples[name])
        rows.append(dict(kind="time", engine=name, n=n, methods="+".join(methods), similarities=sims[name],
                         convention=conv[name], layers=n_layers, repeats=repeats,
                         **{k: round(v, 3) for k, v in st[name].items()},
                         cpu_s=round(float(np.median(cpu[name])), 3),
                         ms_per_image=round(1e3 * st[name]["s"] / n, 2),
                         samples_s=" ".join(f"{v:.3f}" for v in samples[name]), ratio="", max_abs_diff="", **info))
    for name in ("fastsal-full", "fastsal-spearman"):
        rows.append(dict(kind="ratio", engine=f"quantus / {name}", n=n, methods="+".join(methods),
                         similarities=f"{sims[name]} vs rank_abs", convention=f"{conv[name]} vs quantus",
                         layers=n_layers, repeats=repeats, ratio=round(st["quantus"]["s"] / st[name]["s"], 2),
                         cpu_s=round(float(np.median(cpu["quantus"]) / np.median(cpu[name])), 2),
                         max_abs_diff=" ".join(f"{m}:{d:.1e}" for m, d in diff.items()) if name == "fastsal-spearman" else "", **info))

    lines = [
        f"MPRT, cascading, default model, n={n} images of the synthetic test split, methods={'+'.join(methods)}, "
        f"{n_layers} layers, {repeats} interleaved repeats",
        f"{info['cpu']} (os.cpu_count()={info['cpu_count']}), torch threads {info['threads']}; torch {info['torch']}, "
        f"fastsal {info['fastsal']}, quantus {info['quantus']}, captum {info['captum']}, numpy {info['numpy']}; "
        f"{info['date']}; load average (1 min) {load}",
        "",
        f"{'engine':17s} {'similarities':33s} {'median s':>9s} {'p20':>8s} {'p80':>8s} {'ms/image':>9s} {'CPU s':>8s}",
    ]
    for name in names:
        s = st[name]
        lines.append(f"{name:17s} {sims[name]:33s} {s['s']:9.2f} {s['s_p20']:8.2f} {s['s_p80']:8.2f} "
                     f"{1e3 * s['s'] / n:9.1f} {np.median(cpu[name]):8.2f}")
    ratio = {k: (st["quantus"]["s"] / st[k]["s"], np.median(cpu["quantus"]) / np.median(cpu[k]))
             for k in ("fastsal-full", "fastsal-spearman")}
    lines += [
        "",
        f"quantus / fastsal-full     = {ratio['fastsal-full'][0]:.2f}x wall, {ratio['fastsal-full'][1]:.2f}x CPU  "
        "(the issue's target: >= 3x)",
        f"quantus / fastsal-spearman = {ratio['fastsal-spearman'][0]:.2f}x wall, "
        f"{ratio['fastsal-spearman'][1]:.2f}x CPU  (like for like)",
        "max |fastsal-spearman - quantus| per-image score: " + ", ".join(f"{m} {d:.1e}" for m, d in diff.items()),
    ]
    text = "\n".join(lines)
    print("\n" + text)
    if out:
        write_rows(out, rows)
        with open(os.path.splitext(out)[0] + ".txt", "w") as fh:
            fh.write(text + "\n")
        print(f"\nwrote {out} and {os.path.splitext(out)[0]}.txt")
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=200, help="images of the synthetic test split (default 200)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--repeats", type=int, default=3, help="interleaved timed repeats of each engine (default 3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own choice)")
    p.add_argument("--out", default="", help="CSV to write (and a .txt summary beside it)")
    a = p.parse_args(argv)
    if a.n < 4 or a.repeats < 1:
        p.error("--n must be >= 4 and --repeats >= 1")
    bench(a.n, tuple(a.methods), a.repeats, a.seed, a.threads, a.out)


if __name__ == "__main__":
    main()
