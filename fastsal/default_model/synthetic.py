"""A synthetic localization data set: one object of one of eight classes on a cluttered background.

Every sample is a pure function of ``(split, index)``: its random numbers come from a numpy
Generator seeded with ``(SEED, split id, index)``, so sample ``i`` is the same whatever order
the samples are drawn in and whichever worker draws them.

The object is a hard-edged, filled shape (or a two-colour textured patch) at a random position,
scale, rotation and colour. The clutter is made so that it cannot be mistaken for an object:
smooth two-colour gradients, pixel noise, soft-edged Gaussian blobs and thin (1-2 px) lines.

Boxes are ``(x0, y0, x1, y1)`` in pixel coordinates, half-open like a slice: the object covers
columns ``x0 <= x < x1`` and rows ``y0 <= y < y1`` (a pixel belongs to the object when at least
half of it is covered).
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from typing import Tuple

import numpy as np

SIZE = 64
"""Images are SIZE x SIZE RGB, uint8, HWC."""

CLASS_NAMES = ("disc", "ring", "square", "triangle", "cross", "star", "stripes", "checker")
"""Class ``i`` of the data set (and of the default model's output) is ``CLASS_NAMES[i]``."""

NUM_CLASSES = len(CLASS_NAMES)

SEED = 20240605
SPLITS = {"train": 0, "val": 1, "test": 2, "demo": 3}
"""Each split draws from its own seed stream, so no held-out sample is ever a training sample."""

MIN_SIZE, MAX_SIZE = 18, 36  # the object's outer diameter, in pixels
_SS = 2  # supersampling factor per axis for anti-aliased edges


@dataclass(frozen=True)
class Sample:
    image: np.ndarray  # (SIZE, SIZE, 3) uint8
    label: int
    box: Tuple[int, int, int, int]  # x0, y0, x1, y1, half-open
    mask: np.ndarray  # (SIZE, SIZE) float32 in [0, 1]: how much of each pixel the object covers


def rng_for(index: int, split: str = "train") -> np.random.Generator:
    """The Generator that draws sample ``index`` of ``split``."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLITS)}")
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    return np.random.default_rng([SEED, SPLITS[split], int(index)])


# ----------------------------------------------------------------------------------------------
# geometry helpers

_PIX = np.arange(SIZE, dtype=np.float32) + 0.5
_GY, _GX = np.meshgrid(_PIX, _PIX, indexing="ij")  # pixel centres
_SUB = (np.arange(SIZE * _SS, dtype=np.float32) + 0.5) / _SS
_SY, _SX = np.meshgrid(_SUB, _SUB, indexing="ij")  # supersample centres


def _in_polygon(u: np.ndarray, v: np.ndarray, verts: np.ndarray) -> np.ndarray:
    """Even-odd point-in-polygon test, vectorized over points."""
    inside = np.zeros(u.shape, dtype=bool)
    n = len(verts)
    for i in range(n):
        x1, y1 = verts[i]
        x2, y2 = verts[(i + 1) % n]
        if y1 == y2:
            continue
        crosses = (v >= min(y1, y2)) & (v < max(y1, y2))
        xint = x1 + (v - y1) * (x2 - x1) / (y2 - y1)
        inside ^= crosses & (u < xint)
    return inside


def _regular(n: int, r: float, phase: float = -np.pi / 2) -> np.ndarray:
    a = phase + 2 * np.pi * np.arange(n) / n
    return np.stack([r * np.cos(a), r * np.sin(a)], axis=1)


_TRIANGLE = _regular(3, 1.0)
_STAR = np.empty((10, 2))
_STAR[0::2] = _regular(5, 1.0)
_STAR[1::2] = _regular(5, 0.42, phase=-np.pi / 2 + np.pi / 5)


def _shape_cover(label: int, u: np.ndarray, v: np.ndarray, rng: np.random.Generator):
    """Coverage (bool) of the shape in local unit coordinates, and a second-colour mask or None."""
    name = CLASS_NAMES[label]
    r2 = u * u + v * v
    if name == "disc":
        return r2 <= 1.0, None
    if name == "ring":
        inner = rng.uniform(0.5, 0.65)
        return (r2 <= 1.0) & (r2 >= inner * inner), None
    if name == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.72, None
    if name == "triangle":
        return _in_polygon(u, v, _TRIANGLE), None
    if name == "cross":
        t = rng.uniform(0.24, 0.34)
        au, av = np.abs(u), np.abs(v)
        return ((au <= t) & (av <= 0.95)) | ((av <= t) & (au <= 0.95)), None
    if name == "star":
        return _in_polygon(u, v, _STAR), None
    if name == "stripes":
        period = rng.uniform(0.28, 0.4)
        second = np.floor(u / period + 100.0) % 2 == 1
        return np.maximum(np.abs(u), np.abs(v)) <= 0.72, second
    if name == "checker":
        period = rng.uniform(0.32, 0.45)
        second = (np.floor(u / period + 100.0) + np.floor(v / period + 100.0)) % 2 == 1
        return np.maximum(np.abs(u), np.abs(v)) <= 0.72, second
    raise AssertionError(name)


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    i = int(h * 6.0) % 6
    f = h * 6.0 - np.floor(h * 6.0)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    rgb = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return np.array(rgb, dtype=np.float32) * 255.0


# ----------------------------------------------------------------------------------------------
# the sample


def _window(cx: float, cy: float, reach: float):
    """Row and column slices of the pixels within ``reach`` of (cx, cy), clipped to the image."""
    x0, x1 = max(int(cx - reach), 0), min(int(np.ceil(cx + reach)) + 1, SIZE)
    y0, y1 = max(int(cy - reach), 0), min(int(np.ceil(cy + reach)) + 1, SIZE)
    return slice(y0, max(y1, y0)), slice(x0, max(x1, x0))


def _background(rng: np.random.Generator) -> np.ndarray:
    # a smooth gradient between two muted colours along a random direction
    c0 = _hsv_to_rgb(rng.random(), rng.uniform(0.0, 0.45), rng.uniform(0.25, 0.85))
    c1 = _hsv_to_rgb(rng.random(), rng.uniform(0.0, 0.45), rng.uniform(0.25, 0.85))
    a = rng.uniform(0, 2 * np.pi)
    t = (np.float32(np.cos(a)) * (_GX - SIZE / 2) + np.float32(np.sin(a)) * (_GY - SIZE / 2)) / SIZE
    t = np.clip(t + np.float32(0.5), 0, 1)[..., None]
    img = c0 * (1 - t) + c1 * t

    # soft Gaussian blobs (no hard edge, so never an object)
    for _ in range(rng.integers(2, 7)):
        cx, cy = rng.uniform(0, SIZE, 2)
        sig = rng.uniform(3.0, 10.0)
        strength = rng.uniform(0.25, 0.7)
        col = _hsv_to_rgb(rng.random(), rng.uniform(0.2, 1.0), rng.uniform(0.2, 1.0))
        ys, xs = _window(cx, cy, 3 * sig)
        d2 = (_GX[ys, xs] - np.float32(cx)) ** 2 + (_GY[ys, xs] - np.float32(cy)) ** 2
        alpha = (np.float32(strength) * np.exp(-d2 / np.float32(2 * sig * sig)))[..., None]
        img[ys, xs] = img[ys, xs] * (1 - alpha) + col * alpha

    # thin straight lines, 1-2 px wide, any colour
    for _ in range(rng.integers(2, 8)):
        _draw_line(img, rng)
    return img


def _draw_line(img: np.ndarray, rng: np.random.Generator) -> None:
    x0, y0 = rng.uniform(-8, SIZE + 8, 2)
    a = rng.uniform(0, np.pi)
    length = rng.uniform(14, 75)
    half = rng.uniform(0.5, 1.0)
    strength = rng.uniform(0.5, 1.0)
    col = _hsv_to_rgb(rng.random(), rng.uniform(0.0, 1.0), rng.uniform(0.1, 1.0))
    dx, dy = np.cos(a), np.sin(a)
    xa, xb = sorted((x0, x0 + length * dx))
    ya, yb = sorted((y0, y0 + length * dy))
    ys = slice(max(int(ya - 3), 0), max(min(int(yb + 4), SIZE), 0))
    xs = slice(max(int(xa - 3), 0), max(min(int(xb + 4), SIZE), 0))
    px, py = _GX[ys, xs] - np.float32(x0), _GY[ys, xs] - np.float32(y0)
    dx, dy = np.float32(dx), np.float32(dy)
    s = np.clip(px * dx + py * dy, 0, np.float32(length))
    d = np.hypot(px - s * dx, py - s * dy)
    alpha = (np.clip(np.float32(half + 0.5) - d, 0, 1) * np.float32(strength))[..., None]
    img[ys, xs] = img[ys, xs] * (1 - alpha) + col * alpha


def render(index: int, split: str = "train") -> Sample:
    """Sample ``index`` of ``split``, with the object's coverage mask (for tests and evaluation)."""
    rng = rng_for(index, split)
    label = int(rng.integers(NUM_CLASSES))
    img = _background(rng)

    diameter = rng.uniform(MIN_SIZE, MAX_SIZE)
    radius = diameter / 2
    # the rotated shape stays within ~1.02 * radius of its centre (square corners: 0.72 * sqrt 2)
    margin = 1.05 * radius + 1
    cx, cy = rng.uniform(margin, SIZE - margin, 2)
    theta = rng.uniform(0, 2 * np.pi)
    cos, sin = np.float32(np.cos(theta)), np.float32(np.sin(theta))

    # render the object in its window only, on a supersampled grid
    ys, xs = _window(cx, cy, margin + 1)
    sub = (slice(ys.start * _SS, ys.stop * _SS), slice(xs.start * _SS, xs.stop * _SS))
    h, w = ys.stop - ys.start, xs.stop - xs.start
    sx, sy = _SX[sub] - np.float32(cx), _SY[sub] - np.float32(cy)
    u = (cos * sx + sin * sy) / np.float32(radius)
    v = (cos * sy - sin * sx) / np.float32(radius)
    cover, second = _shape_cover(label, u, v, rng)

    def pool(m: np.ndarray) -> np.ndarray:  # supersamples -> pixel coverage
        return m.reshape(h, _SS, w, _SS).mean(axis=(1, 3), dtype=np.float32)

    m = pool(cover.astype(np.float32))
    mask = np.zeros((SIZE, SIZE), dtype=np.float32)
    mask[ys, xs] = m

    # a saturated colour that stands out from the background under the object
    win = img[ys, xs]
    under = (win * m[..., None]).sum(axis=(0, 1)) / max(float(m.sum()), 1e-6)
    for _ in range(8):
        col = _hsv_to_rgb(rng.random(), rng.uniform(0.55, 1.0), rng.uniform(0.55, 1.0))
        if np.abs(col - under).max() > 70:
            break
    shade = np.float32(1.0) + np.float32(rng.uniform(-0.15, 0.15)) * pool(u)
    obj = col * shade[..., None]
    if second is not None:
        # textured classes: a second, darker or complementary colour
        col2 = _hsv_to_rgb(rng.random(), rng.uniform(0.3, 1.0), rng.uniform(0.05, 0.45))
        frac2 = (pool((cover & second).astype(np.float32)) / np.maximum(m, 1e-6))[..., None]
        obj = obj * (1 - frac2) + col2 * frac2
    obj = obj + rng.standard_normal(obj.shape, dtype=np.float32) * np.float32(6.0)  # surface texture
    img[ys, xs] = win * (1 - m[..., None]) + obj * m[..., None]

    # sometimes a clutter line crosses the object, so occlusion by clutter is seen too
    if rng.random() < 0.3:
        _draw_line(img, rng)

    # sensor noise over everything
    img += rng.standard_normal(img.shape, dtype=np.float32) * np.float32(rng.uniform(2.0, 12.0))
    image = np.clip(np.rint(img), 0, 255).astype(np.uint8)

    ys, xs = np.nonzero(mask >= 0.5)
    box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    return Sample(image=image, label=label, box=box, mask=mask)


def sample(index: int, split: str = "train"):
    """``(image, label, box)`` of sample ``index`` of ``split``: uint8 HWC, int, (x0, y0, x1, y1)."""
    s = render(index, split)
    return s.image, s.label, s.box


def batch(indices, split: str = "train"):
    """Stacked samples: images uint8 (N, H, W, 3), labels int64 (N,), boxes int64 (N, 4)."""
    samples = [render(int(i), split) for i in indices]
    images = np.stack([s.image for s in samples])
    labels = np.array([s.label for s in samples], dtype=np.int64)
    boxes = np.array([s.box for s in samples], dtype=np.int64).reshape(-1, 4)
    return images, labels, boxes


def write_dataset(out_dir, count: int, split: str = "test", start: int = 0) -> str:
    """Write samples ``start .. start+count-1`` of ``split`` as PNGs in an ImageFolder-style tree.

    ``out_dir/<class name>/<split>_<index>.png``, plus ``out_dir/labels.csv`` with the columns
    ``path`` (relative to ``out_dir``, '/'-separated), ``label``, ``class_name``, ``x0, y0, x1, y1``.
    Returns the path of the CSV file.
    """
    from PIL import Image  # only this writer needs Pillow

    os.makedirs(out_dir, exist_ok=True)
    rows = []
    for index in range(start, start + count):
        s = render(index, split)
        name = CLASS_NAMES[s.label]
        rel = f"{name}/{split}_{index:06d}.png"
        os.makedirs(os.path.join(out_dir, name), exist_ok=True)
        Image.fromarray(s.image).save(os.path.join(out_dir, *rel.split("/")))
        rows.append([rel, s.label, name, *s.box])
    csv_path = os.path.join(out_dir, "labels.csv")
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "class_name", "x0", "y0", "x1", "y1"])
        writer.writerows(rows)
    return csv_path
