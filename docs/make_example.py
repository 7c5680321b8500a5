"""Make docs/example_guided.png: the three methods side by side for a few synthetic images.

    python docs/make_example.py [--out docs/example_guided.png] [--rows 3]

The model is fastsal's default model (a small CNN on the synthetic shapes data set) with its
shipped weights when they are installed, else the same network with random weights (the
caption printed says which). Nothing is downloaded. Runs on the CPU in a few seconds.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout's fastsal, installed or not

import fastsal
from fastsal.default_model import synthetic
from fastsal.default_model.model import DEFAULT_PREPROCESS, DefaultNet, build_default_model


def load_model():
    try:
        return build_default_model(pretrained=True), "trained default model"
    except (FileNotFoundError, RuntimeError, OSError):
        torch.manual_seed(0)
        return DefaultNet().eval(), "default model architecture with RANDOM weights (no trained weights installed)"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/example_guided.png")
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--scale", type=int, default=2)
    args = parser.parse_args(argv)

    model, what = load_model()
    images, labels, _ = synthetic.batch(range(args.rows), split="demo")
    x = DEFAULT_PREPROCESS.normalize(torch.from_numpy(images))
    start = time.perf_counter()
    result = fastsal.Explainer(model, method="guided").explain(x)
    seconds = time.perf_counter() - start
    names = [DEFAULT_PREPROCESS.class_names[int(t)] for t in result.targets]
    truth = [DEFAULT_PREPROCESS.class_names[int(t)] for t in labels]
    fastsal.viz.method_grid(
        model, x, target=result.targets, mean=DEFAULT_PREPROCESS.mean, std=DEFAULT_PREPROCESS.std,
        scale=args.scale, path=args.out,
    )
    print(f"{args.out}: {what}; rows = demo images 0..{args.rows - 1}, true classes {truth}, "
          f"explained (predicted) classes {names}; Explainer.explain took {seconds * 1000:.0f} ms on the CPU")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
