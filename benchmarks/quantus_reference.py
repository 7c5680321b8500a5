"""Record Quantus 0.6's answers for the cross-checks that CI runs without Quantus.

Quantus is too heavy for CI (about 700 MB with its dependencies), so this script runs it once
and commits its per-image answers to ``tests/data/quantus_reference.json``;
``tests/test_quantus_reference.py`` recomputes fastsal's side on every CI run and compares:

* MPRT, cascading, top-down, Quantus's conventions (BN statistics reset, the labels explained,
  Spearman of ``|map|``): per-image scores on the first 32 images of the synthetic test split,
  the embedded model, all three methods. Quantus's ``explain_func`` is fastsal's own saliency,
  so the comparison isolates the randomization and similarity machinery.
* PointingGame (no smoothing, no tolerance): hits of the embedded model's guided maps against
  the images' box masks, and of random maps with a planted maximum; plus the case where
  Quantus is wrong (an empty mask scored as a hit), recorded so the test can show fastsal
  excludes it instead.

    python -m pip install --target /tmp/qsite quantus==0.6.0
    PYTHONPATH=/tmp/qsite python benchmarks/quantus_reference.py --out tests/data/quantus_reference.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform

import numpy as np
import torch

N_MPRT = 32
N_POINTING = 64
SEED = 11
METHODS = ("gradient", "deconvnet", "guided")


def mprt_inputs():
    """The embedded model and the first N_MPRT synthetic test images with their labels (shared with the test)."""
    from fastsal.default_model import DEFAULT_PREPROCESS, build_default_model, synthetic

    images, labels, boxes = synthetic.batch(range(N_POINTING), split="test")
    x = DEFAULT_PREPROCESS.normalize(torch.from_numpy(images)).contiguous()
    return build_default_model().eval(), x, labels, boxes


def fastsal_explain(model, inputs, targets, **kwargs) -> np.ndarray:
    """Quantus ``explain_func``: fastsal's ``max_c |g_c|`` map, (N, 1, H, W)."""
    from fastsal import saliency

    maps = saliency(model, torch.as_tensor(inputs), target=torch.as_tensor(targets).long(),
                    method=kwargs["method"], reduce="abs_max")
    return maps[:, None].numpy()


def box_masks(boxes, h: int, w: int) -> np.ndarray:
    out = np.zeros((len(boxes), h, w), bool)
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        out[i, y0:y1, x0:x1] = True
    return out


def random_pointing_case():
    """16 random 20x20 maps (a unique maximum), 8x8 masks, the maximum planted inside for half."""
    rng = np.random.default_rng(0)
    n, h, w = 16, 20, 20
    maps = rng.random((n, h, w)).astype(np.float32)
    masks = np.zeros((n, h, w), bool)
    for i in range(n):
        x0, y0 = rng.integers(0, 12, 2)
        masks[i, y0:y0 + 8, x0:x0 + 8] = True
    for i in range(0, n, 2):
        ys, xs = np.nonzero(masks[i])
        maps[i, ys[3], xs[3]] = 2.0
    return maps, masks


def guided_maps(model, x, labels) -> np.ndarray:
    from fastsal import saliency

    return saliency(model, x, target=torch.as_tensor(labels).long(), method="guided", reduce="abs_max").numpy()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="tests/data/quantus_reference.json")
    args = p.parse_args(argv)
    import quantus

    model, x, labels, boxes = mprt_inputs()
    xm, ym = x[:N_MPRT], labels[:N_MPRT]
    mprt = {}
    for m in METHODS:
        metric = quantus.MPRT(layer_order="top_down", seed=SEED, disable_warnings=True, display_progressbar=False)
        with torch.random.fork_rng():  # Quantus reseeds the global generator
            scores = metric(model=model, x_batch=xm.numpy(), y_batch=ym, a_batch=None, explain_func=fastsal_explain,
                            explain_func_kwargs={"method": m}, channel_first=True, device="cpu", batch_size=16)
        mprt[m] = {layer: [float(v) for v in s] for layer, s in scores.items()}

    point = quantus.PointingGame(normalise=False, abs=False, disable_warnings=True, display_progressbar=False)
    maps = guided_maps(model, x, labels)
    masks = box_masks(boxes, *maps.shape[1:])
    model_hits = point(model=None, x_batch=np.zeros((len(maps), 3) + maps.shape[1:], np.float32), y_batch=labels,
                       a_batch=maps[:, None], s_batch=masks[:, None].astype(np.float32), channel_first=True)
    rmaps, rmasks = random_pointing_case()
    random_hits = point(model=None, x_batch=np.zeros((len(rmaps), 3) + rmaps.shape[1:], np.float32),
                        y_batch=np.zeros(len(rmaps), int), a_batch=rmaps[:, None],
                        s_batch=rmasks[:, None].astype(np.float32), channel_first=True)
    empty = point(model=None, x_batch=np.zeros((1, 3, 8, 8), np.float32), y_batch=np.zeros(1, int),
                  a_batch=np.random.default_rng(1).random((1, 1, 8, 8)).astype(np.float32),
                  s_batch=np.zeros((1, 1, 8, 8), np.float32), channel_first=True)

    record = {
        "what": "Quantus 0.6 answers for tests/test_quantus_reference.py; made by benchmarks/quantus_reference.py",
        "environment": {
            "quantus": quantus.__version__, "torch": torch.__version__, "numpy": np.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "machine": platform.machine(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        },
        "mprt": {"n": N_MPRT, "seed": SEED, "layer_order": "top_down", "batch_size": 16, "scores": mprt},
        "pointing": {
            "model_guided": [bool(h) for h in model_hits],
            "random_maps": [bool(h) for h in random_hits],
            "empty_mask_scored_as_hit": bool(empty[0]),
        },
    }
    with open(args.out, "w") as f:
        json.dump(record, f, indent=1)
        f.write("\n")
    print(f"wrote {args.out}: MPRT {len(mprt)} methods x {len(next(iter(mprt.values())))} steps x {N_MPRT} images; "
          f"pointing {sum(record['pointing']['model_guided'])}/{len(maps)} model hits, "
          f"{sum(record['pointing']['random_maps'])}/{len(rmaps)} random hits; "
          f"empty mask scored as hit: {record['pointing']['empty_mask_scored_as_hit']}")


if __name__ == "__main__":
    main()
