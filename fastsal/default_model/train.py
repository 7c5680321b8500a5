"""Train (bit for bit reproducibly, on one CPU thread) and evaluate fastsal's default model.

    python -m fastsal.default_model.train --out fastsal/default_model/weights.pt

reproduces the shipped weights (see README.md in this folder for the figures and the conditions
under which the bytes match). ``--eval WEIGHTS`` only evaluates a weights file.

Reproducibility comes from: a fixed torch seed for the initialization; one thread;
``torch.use_deterministic_algorithms(True)``; training step ``s`` seeing exactly the synthetic
training samples ``s * batch_size ... (s + 1) * batch_size - 1`` (each a pure function of its
index); and a weights file written through an in-memory buffer, so its bytes do not depend on
the output path (``torch.save`` names the archive after the file otherwise).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import io
import json
import math
import os
import platform
import sys
import time
from typing import Dict, Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fastsal.default_model import synthetic
from fastsal.default_model.model import DEFAULT_PREPROCESS, DefaultNet, load_state_dict_bytes

# The recipe of the shipped weights.
STEPS = 1400
BATCH_SIZE = 64
SHIPPED_STATE_DICT_SHA256 = "fe618ff0075adf742b689780b67131c37489aaff6eb38a181a5449fac328bfc5"
"""``state_dict_sha256`` of the shipped weights (the file's own sha256 is model.WEIGHTS_SHA256)."""
UNIQUE = 25600  # distinct training samples (each seen ~3.5 times, under random flips/turns)
LR = 3e-3
WEIGHT_DECAY = 1e-4
WARMUP = 20
TORCH_SEED = 0
PERMUTATION_SEED = 20181024  # the data randomization model's label permutation (+ the torch seed)

# The recipe of the permuted-label model (Adebayo et al.'s data randomization test): a small
# training set, no flips/turns, long enough to memorize the shuffled labels.
PERMUTED_STEPS = 1500
PERMUTED_UNIQUE = 512
PERMUTED_STATE_DICT_SHA256 = "4665873febd787943cde127c14594635ac9830a392e7a684c01a610bf830b806"
"""``state_dict_sha256`` of the shipped permuted-label weights (torch 2.14.1+cu130, AVX512)."""

# A short run that tests reproduce (a few steps, same recipe otherwise).
SHORT_STEPS = 4
SHORT_BATCH_SIZE = 16
SHORT_RUN_SHA256 = "01a36856cc87e086b076144e16388b98b53f4af7debaf02816e7e797cc3dcbb0"
"""``state_dict_sha256`` of ``train(steps=SHORT_STEPS, batch_size=SHORT_BATCH_SIZE)``."""
RECORDED_ON = {"torch": "2.14.1+cu130", "cpu_capability": "AVX2"}
"""Where the hashes above were recorded; bit-for-bit equality is promised only there (other
torch versions or CPU instruction sets may pick other float kernels)."""

POINTING_TOLERANCE = 4
"""Pixels of slack around the ground-truth box in the pointing game (Zhang et al. use 15 px at
~224-500 px; 4 px at 96 px is a little tighter in proportion)."""


@contextlib.contextmanager
def deterministic_cpu() -> Iterator[None]:
    """One thread, deterministic algorithms; the previous settings are restored on exit."""
    threads = torch.get_num_threads()
    det = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(det, warn_only=warn_only)
        torch.set_num_threads(threads)


def _inputs(images: np.ndarray) -> torch.Tensor:
    return DEFAULT_PREPROCESS.normalize(torch.from_numpy(images))


def _lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(steps - warmup, 1)
    return lr * 0.5 * (1.0 + math.cos(math.pi * t))


def _augment(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """One of the 8 flips/quarter turns of the square per image (every class is closed under them)."""
    out = torch.empty_like(x)
    for i in range(len(x)):
        t = torch.rot90(x[i], int(k[i]) % 4, dims=(1, 2))
        out[i] = t.flip(2) if int(k[i]) >= 4 else t
    return out


def training_set(unique: int, permute_labels: bool = False, seed: int = TORCH_SEED):
    """The first ``unique`` training samples as (uint8 NHWC images, labels); with
    ``permute_labels`` the labels are the true ones shuffled by a permutation seeded from
    ``seed`` (its own generator, so the true-label run's random stream is unchanged)."""
    size = synthetic.SIZE
    images = np.empty((unique, size, size, 3), dtype=np.uint8)
    labels = np.empty(unique, dtype=np.int64)
    for i in range(unique):
        s = synthetic.render(i, "train")
        images[i], labels[i] = s.image, s.label
    if permute_labels:
        perm = torch.randperm(unique, generator=torch.Generator().manual_seed(PERMUTATION_SEED + seed)).numpy()
        labels = labels[perm]
    return images, labels


def train(
    steps: int = STEPS,
    batch_size: int = BATCH_SIZE,
    unique: int = UNIQUE,
    lr: float = LR,
    weight_decay: float = WEIGHT_DECAY,
    warmup: int = WARMUP,
    seed: int = TORCH_SEED,
    log_every: int = 0,
    permute_labels: bool = False,
    augment: bool = True,
) -> Dict[str, torch.Tensor]:
    """Train from scratch; returns the float32 state dict. Same arguments, same bits.

    The run sees ``steps * batch_size`` images drawn from the first ``unique`` training samples
    (each rendered once, on first use), reshuffled every epoch and flipped/turned at random;
    all of it from a torch Generator seeded with ``seed``.

    ``permute_labels`` trains the model of Adebayo et al.'s data randomization test: every
    training sample keeps one label drawn by a fixed permutation of the ``unique`` samples'
    true labels (same class frequencies, no relation to the image), so the network can only
    memorize. ``augment=False`` turns the flips/turns off (memorizing is faster without them).
    """
    total = steps * batch_size
    unique = max(1, min(unique, total))
    with deterministic_cpu():
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        model = DefaultNet()
        model.train()
        order = torch.cat([torch.randperm(unique, generator=gen) for _ in range(-(-total // unique))])[:total]
        turns = torch.randint(0, 8, (total,), generator=gen)
        size = synthetic.SIZE
        images_all = np.empty((unique, size, size, 3), dtype=np.uint8)
        labels_all = np.empty(unique, dtype=np.int64)
        rendered = np.zeros(unique, dtype=bool)
        if permute_labels:
            images_all, labels_all = training_set(unique, permute_labels=True, seed=seed)
            rendered[:] = True

        decay = [p for n, p in model.named_parameters() if p.ndim > 1]
        no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=lr,
            foreach=False,
        )
        t0 = time.perf_counter()
        running = 0.0
        for step in range(steps):
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, steps, lr, min(warmup, steps))
            idx = order[step * batch_size : (step + 1) * batch_size].numpy()
            for i in idx[~rendered[idx]]:
                s = synthetic.render(int(i), "train")
                images_all[i], labels_all[i], rendered[i] = s.image, s.label, True
            x = _inputs(images_all[idx])
            if augment:
                x = _augment(x, turns[step * batch_size : (step + 1) * batch_size])
            loss = F.cross_entropy(model(x), torch.from_numpy(labels_all[idx]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            running += loss.item()
            if log_every and (step + 1) % log_every == 0:
                print(
                    f"step {step + 1}/{steps}  loss {running / log_every:.4f}  "
                    f"{time.perf_counter() - t0:.0f} s",
                    flush=True,
                )
                running = 0.0
        return {k: v.detach().clone() for k, v in model.state_dict().items()}


def state_dict_bytes(state_dict: Dict[str, torch.Tensor]) -> bytes:
    """The bytes of the weights file (independent of where it is written)."""
    buf = io.BytesIO()
    torch.save(state_dict, buf)
    return buf.getvalue()


def state_dict_sha256(state_dict: Dict[str, torch.Tensor]) -> str:
    """sha256 over the names, dtypes, shapes and raw bytes of the tensors, in order."""
    h = hashlib.sha256()
    for name, t in state_dict.items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# evaluation


class _GuidedReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        y = x.clamp_min(0)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return grad.clamp_min(0) * (y > 0)


class _DeconvReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clamp_min(0)

    @staticmethod
    def backward(ctx, grad):
        return grad.clamp_min(0)


class _RuleReLU(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn.apply(x)


def _with_relu_rule(model: nn.Module, rule: str) -> nn.Module:
    """A copy of ``model`` whose nn.ReLU modules apply ``rule`` in the backward pass."""
    if rule == "gradient":
        return model
    fn = {"guided": _GuidedReLU, "deconvnet": _DeconvReLU}[rule]
    twin = copy.deepcopy(model)
    for parent in twin.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.ReLU):
                setattr(parent, name, _RuleReLU(fn))
    return twin


def saliency(model: nn.Module, x: torch.Tensor, target: torch.Tensor, rule: str = "gradient") -> torch.Tensor:
    """(N, H, W) maps ``max_c |d logit_target / d x_c|`` under ``rule`` (plain autograd)."""
    net = _with_relu_rule(model, rule)
    x = x.detach().clone().requires_grad_(True)
    logits = net(x)
    logits.gather(1, target.view(-1, 1)).sum().backward()
    return x.grad.abs().amax(dim=1)


def pointing_hits(maps: torch.Tensor, boxes: torch.Tensor, tolerance: int = POINTING_TOLERANCE) -> torch.Tensor:
    """Bool (N,): the map's maximum (first one in raster order) lies in the box grown by tolerance."""
    n, h, w = maps.shape
    idx = maps.reshape(n, -1).argmax(dim=1)
    y, x = idx // w, idx % w
    x0, y0, x1, y1 = boxes.unbind(1)
    return (x >= x0 - tolerance) & (x < x1 + tolerance) & (y >= y0 - tolerance) & (y < y1 + tolerance)


def evaluate(
    state_dict: Dict[str, torch.Tensor],
    count: int = 1000,
    split: str = "test",
    batch_size: int = 100,
    tolerance: int = POINTING_TOLERANCE,
    rules=("gradient", "guided", "deconvnet"),
) -> dict:
    """Accuracy and pointing-game accuracy (target: the true class) on ``count`` held-out samples."""
    model = DefaultNet()
    model.load_state_dict(state_dict)
    model.eval()
    correct = 0
    hits = {r: {0: 0, tolerance: 0} for r in rules}
    centre_hits = 0
    random_hits = 0.0
    size = synthetic.SIZE
    with deterministic_cpu():
        for start in range(0, count, batch_size):
            idx = range(start, min(start + batch_size, count))
            images, labels, boxes = synthetic.batch(idx, split)
            x, y, b = _inputs(images), torch.from_numpy(labels), torch.from_numpy(boxes)
            with torch.no_grad():
                correct += int((model(x).argmax(1) == y).sum())
            for r in rules:
                maps = saliency(model, x, y, r)
                for tol in hits[r]:
                    hits[r][tol] += int(pointing_hits(maps, b, tol).sum())
            # baselines: always the image centre, and a uniformly random pixel (expected value)
            centre = torch.full((len(idx), size, size), 0.0)
            centre[:, size // 2, size // 2] = 1.0
            centre_hits += int(pointing_hits(centre, b, tolerance).sum())
            lo = (b[:, :2] - tolerance).clamp_min(0)
            hi = (b[:, 2:] + tolerance).clamp_max(size)
            random_hits += float(((hi - lo).clamp_min(0).prod(1).float() / size**2).sum())
    return {
        "count": count,
        "split": split,
        "accuracy": correct / count,
        "pointing_tolerance_px": tolerance,
        "pointing": {r: {f"tol{t}": v / count for t, v in d.items()} for r, d in hits.items()},
        "baseline_centre_point": centre_hits / count,
        "baseline_random_point": random_hits / count,
    }


def training_accuracy(state_dict: Dict[str, torch.Tensor], unique: int, permute_labels: bool = False) -> float:
    """Accuracy on the training set the run saw (with its shuffled labels if ``permute_labels``):
    how well the permuted-label model memorized."""
    model = DefaultNet()
    model.load_state_dict(state_dict)
    model.eval()
    images, labels = training_set(unique, permute_labels=permute_labels)
    correct = 0
    with torch.no_grad():
        for start in range(0, unique, 256):
            x = _inputs(images[start : start + 256])
            correct += int((model(x).argmax(1).numpy() == labels[start : start + 256]).sum())
    return correct / unique


def environment() -> dict:
    return {
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "machine": platform.machine(),
    }


def main(argv: Optional[list] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastsal.default_model.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="where to write the weights (.pt); required unless --eval is given")
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    p.add_argument("--unique", type=int, default=UNIQUE, help="distinct training samples")
    p.add_argument("--permute-labels", action="store_true",
                   help="train on shuffled labels (the data randomization test's model); recipe: "
                   f"--permute-labels --no-augment --unique {PERMUTED_UNIQUE} --steps {PERMUTED_STEPS}")
    p.add_argument("--no-augment", action="store_true", help="no random flips/quarter turns")
    p.add_argument("--eval", metavar="WEIGHTS", help="only evaluate this weights file")
    p.add_argument("--eval-count", type=int, default=1000, help="held-out samples to evaluate (0: none)")
    p.add_argument("--json", metavar="PATH", help="also write the figures as JSON here")
    args = p.parse_args(argv)
    if not args.out and not args.eval:
        p.error("give --out (train) or --eval (evaluate)")

    report: dict = {"environment": environment()}
    if args.eval:
        with open(args.eval, "rb") as f:
            data = f.read()
        sd = load_state_dict_bytes(data)
    else:
        t0, c0 = time.perf_counter(), time.process_time()
        sd = train(steps=args.steps, batch_size=args.batch_size, unique=args.unique, log_every=50,
                   permute_labels=args.permute_labels, augment=not args.no_augment)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        data = state_dict_bytes(sd)
        tmp = args.out + ".tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, args.out)
        report.update(
            steps=args.steps,
            batch_size=args.batch_size,
            unique=args.unique,
            permute_labels=args.permute_labels,
            augment=not args.no_augment,
            train_wall_s=round(wall, 1),
            train_cpu_s=round(cpu, 1),
            state_dict_sha256=state_dict_sha256(sd),
        )
        print(f"trained in {wall:.1f} s ({cpu:.1f} s of CPU) -> {args.out}")
    report.update(file_sha256=hashlib.sha256(data).hexdigest(), file_bytes=len(data))
    if args.permute_labels:
        report["train_accuracy_on_permuted_labels"] = training_accuracy(sd, args.unique, permute_labels=True)
    if args.eval_count:
        t0 = time.perf_counter()
        report["eval"] = evaluate(sd, count=args.eval_count)
        report["eval_wall_s"] = round(time.perf_counter() - t0, 1)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
