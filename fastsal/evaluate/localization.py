"""Localization metrics: the pointing game, attribution mass inside the box, weak-box IoU.

Ground truth comes as boxes ``(N, 4)`` ``x0, y0, x1, y1`` in pixels, half-open like a slice
(the object covers columns ``x0 <= x < x1`` and rows ``y0 <= y < y1``: the convention of
:mod:`fastsal.default_model.synthetic` and of ``write_dataset``'s CSV), and/or boolean masks
``(N, H, W)``. Given both, a pixel counts when it is in the box *or* the mask. An image whose
box and mask are both empty (``x1 == x0`` or ``y1 == y0``, an all-False mask) is *excluded*
and counted in ``n_excluded``, never scored as a hit (Quantus 0.6 scores it as a hit).
A box outside the image, or with ``x1 < x0``/``y1 < y0``, is a ValueError.

Pointing game (Zhang et al. 2016, with TorchRay's protocol): the map (for fastsal,
``max_c |g_c|``) is resized bilinearly to the image size, smoothed with a Gaussian of
σ = 0.02·max(H, W) (:func:`scipy.ndimage.gaussian_filter`, ``mode="constant"``), and its argmax
(the first one in row-major order) is the point. The point hits when a ground-truth pixel lies
at Euclidean distance *strictly less* than the tolerance (TorchRay's ``d² < tol²``). TorchRay's
tolerance is 15 px at ImageNet's 224 px; here it scales with the image:
``tol = round(15 · max(H, W) / 224)`` (4 px at 64 px). The zero-tolerance variant hits only when
the point itself is a ground-truth pixel. The centre baseline points at pixel
``(x, y) = (W // 2, H // 2)`` of every image. Accuracy is reported averaged over classes (the
per-class hit rate, then the mean over the classes that have at least one scored image: TorchRay
averages over all of its dataset's classes, which is the same when every class occurs) and over
images.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import numpy as np
import torch

from fastsal.jobs.boxes import box_iou

TORCHRAY_TOLERANCE = 15
"""TorchRay's pointing-game tolerance, in pixels, at ImageNet's 224 px scale."""

TORCHRAY_SCALE = 224
SMOOTH = 0.02
"""σ of the pointing game's Gaussian, as a fraction of the image's longer side (TorchRay)."""


def scaled_tolerance(height: int, width: int) -> int:
    """TorchRay's 15 px at 224 px, scaled to an image of ``height x width``: ``round(15 · max(H, W) / 224)``."""
    return int(round(TORCHRAY_TOLERANCE * max(height, width) / TORCHRAY_SCALE))


# ----------------------------------------------------------------------------------------------
# ground truth


def _as_numpy(x, what: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    try:
        return np.asarray(x)
    except Exception as exc:  # pragma: no cover - exotic inputs
        raise TypeError(f"{what} must be an array or a tensor, got {type(x).__name__}") from exc


def check_boxes(boxes, height: int, width: int) -> np.ndarray:
    """``boxes`` as an int64 array ``(N, 4)``, or a clear ValueError.

    Boxes are ``x0, y0, x1, y1``, half-open, inside an image of ``height x width``:
    ``0 <= x0 <= x1 <= W`` and ``0 <= y0 <= y1 <= H``. ``x1 == x0`` (or ``y1 == y0``) is an
    empty box, allowed here and excluded by the metrics.
    """
    b = _as_numpy(boxes, "boxes")
    if b.ndim != 2 or b.shape[1] != 4:
        raise ValueError(f"boxes must have shape (N, 4) as x0, y0, x1, y1, got {b.shape}")
    if b.size and not np.all(np.isfinite(b.astype(np.float64))):
        raise ValueError("boxes contain NaN or Inf")
    if b.size and not np.all(b == np.round(b)):
        raise ValueError("boxes must be whole pixel coordinates (x0, y0, x1, y1, half-open)")
    b = b.astype(np.int64)
    for i, (x0, y0, x1, y1) in enumerate(b):
        if x1 < x0 or y1 < y0:
            raise ValueError(f"box {i} {(int(x0), int(y0), int(x1), int(y1))} has x1 < x0 or y1 < y0 "
                             "(boxes are x0, y0, x1, y1, half-open)")
        if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
            raise ValueError(f"box {i} {(int(x0), int(y0), int(x1), int(y1))} is outside the {width}x{height} "
                             "(W x H) image (boxes are x0, y0, x1, y1, half-open: 0 <= x0 <= x1 <= W)")
    return b


def regions(boxes=None, masks=None, image_size: Optional[Tuple[int, int]] = None) -> np.ndarray:
    """The ground-truth pixels as a boolean array ``(N, H, W)``: the box *or* the mask.

    ``image_size`` is ``(H, W)``; it defaults to the masks' size and is required for boxes alone.
    """
    if boxes is None and masks is None:
        raise ValueError("the localization metrics need ground truth: pass boxes=(N, 4) and/or masks=(N, H, W)")
    m = None
    if masks is not None:
        m = _as_numpy(masks, "masks")
        if m.ndim != 3:
            raise ValueError(f"masks must have shape (N, H, W), got {m.shape}")
        if m.dtype != np.bool_:
            if not np.all((m == 0) | (m == 1)):
                raise ValueError("masks must be boolean (or 0/1); threshold soft masks first, e.g. masks >= 0.5")
            m = m.astype(bool)
        if image_size is not None and tuple(m.shape[1:]) != tuple(image_size):
            raise ValueError(f"masks are {m.shape[1]}x{m.shape[2]} (H x W) but the image size is {tuple(image_size)}")
        image_size = m.shape[1:]
    if boxes is None:
        return m
    if image_size is None:
        raise ValueError("with boxes alone, give image_size=(H, W)")
    h, w = int(image_size[0]), int(image_size[1])
    b = check_boxes(boxes, h, w)
    if m is not None and len(b) != len(m):
        raise ValueError(f"{len(b)} boxes but {len(m)} masks")
    out = np.zeros((len(b), h, w), dtype=bool)
    for i, (x0, y0, x1, y1) in enumerate(b):
        out[i, y0:y1, x0:x1] = True
    if m is not None:
        out |= m
    return out


def _labels(labels, n: int) -> np.ndarray:
    if labels is None:
        return np.zeros(n, dtype=np.int64)
    lab = _as_numpy(labels, "labels").reshape(-1)
    if len(lab) != n:
        raise ValueError(f"{len(lab)} labels for {n} images")
    return lab.astype(np.int64)


# ----------------------------------------------------------------------------------------------
# the point


def _maps_numpy(maps) -> np.ndarray:
    m = _as_numpy(maps, "maps")
    if m.ndim == 4:
        raise ValueError(f"maps must be (N, H, W); got {m.shape}: reduce the channels first (max_c |g_c|)")
    if m.ndim != 3:
        raise ValueError(f"maps must have shape (N, H, W), got {m.shape}")
    return m.astype(np.float32, copy=False)


def resize_maps(maps, image_size: Tuple[int, int]) -> np.ndarray:
    """Maps ``(N, h, w)`` resized bilinearly (``align_corners=False``) to ``image_size`` ``(H, W)``."""
    m = _maps_numpy(maps)
    if tuple(m.shape[1:]) == tuple(image_size):
        return m
    t = torch.from_numpy(np.ascontiguousarray(m))[:, None]
    t = torch.nn.functional.interpolate(t, size=tuple(int(s) for s in image_size), mode="bilinear", align_corners=False)
    return t[:, 0].numpy()


def points(maps, image_size: Optional[Tuple[int, int]] = None, smooth: float = SMOOTH) -> np.ndarray:
    """The pointing-game points ``(N, 2)`` as ``(x, y)`` pixels: argmax of each map, resized to
    ``image_size`` (default: the maps' size) and smoothed with σ = ``smooth``·max(H, W)
    (``smooth=0`` for the raw argmax). A map with no finite maximum points at ``(-1, -1)``.
    """
    from scipy import ndimage

    if smooth < 0:
        raise ValueError(f"smooth must be >= 0, got {smooth}")
    m = _maps_numpy(maps)
    size = tuple(m.shape[1:]) if image_size is None else (int(image_size[0]), int(image_size[1]))
    m = resize_maps(m, size)
    h, w = size
    sigma = smooth * max(h, w)
    out = np.full((len(m), 2), -1, dtype=np.int64)
    for i, mi in enumerate(m):
        if not np.all(np.isfinite(mi)):
            continue
        if sigma > 0:
            mi = ndimage.gaussian_filter(mi.astype(np.float64), sigma=sigma, mode="constant")
        y, x = np.unravel_index(int(np.argmax(mi)), mi.shape)
        out[i] = (x, y)
    return out


def point_hits(pts, truth: np.ndarray, tolerance: int) -> np.ndarray:
    """Per image: is a ground-truth pixel at distance ``< tolerance`` of the point ``(x, y)``?
    ``tolerance=0``: is the point itself a ground-truth pixel? A point ``(-1, -1)`` misses.
    """
    if not isinstance(tolerance, (int, np.integer)) or isinstance(tolerance, bool) or tolerance < 0:
        raise ValueError(f"tolerance must be a non-negative int (pixels), got {tolerance!r}")
    pts = np.asarray(pts, dtype=np.int64).reshape(-1, 2)
    n, h, w = truth.shape
    if len(pts) != n:
        raise ValueError(f"{len(pts)} points for {n} ground-truth regions")
    ys, xs = np.arange(h)[:, None], np.arange(w)[None, :]
    hits = np.zeros(n, dtype=bool)
    for i, (x, y) in enumerate(pts):
        if x < 0 or y < 0:
            continue
        if tolerance == 0:
            hits[i] = bool(y < h and x < w and truth[i, y, x])
        else:
            accept = (ys - y) ** 2 + (xs - x) ** 2 < tolerance ** 2
            hits[i] = bool(np.any(truth[i] & accept))
    return hits


def class_averaged(hits: np.ndarray, labels: np.ndarray, valid: np.ndarray) -> Tuple[Dict[int, float], float, float]:
    """``(per-class accuracy, mean over classes, mean over images)`` of ``hits`` on the ``valid`` images
    (NaN when no image is valid). Classes with no valid image are left out of the class mean.
    """
    per_class: Dict[int, float] = {}
    for c in np.unique(labels[valid]):
        sel = valid & (labels == c)
        per_class[int(c)] = float(hits[sel].mean())
    if not per_class:
        return per_class, float("nan"), float("nan")
    return per_class, float(np.mean(list(per_class.values()))), float(hits[valid].mean())


@dataclass
class PointingScore:
    """One pointing-game variant: hits per image and the accuracies."""

    hits: np.ndarray  # (N,) bool; False for excluded images
    accuracy: float  # mean over classes of the per-class hit rate (TorchRay)
    accuracy_overall: float  # hit rate over all scored images
    class_accuracy: Dict[int, float] = field(default_factory=dict)

    @classmethod
    def of(cls, hits, labels, valid) -> "PointingScore":
        per_class, acc, overall = class_averaged(hits, labels, valid)
        return cls(hits=hits & valid, accuracy=acc, accuracy_overall=overall, class_accuracy=per_class)


@dataclass
class PointingResult:
    """The pointing game of a set of maps, with the centre baseline beside it.

    ``saliency``/``centre``: at ``tolerance`` px; ``saliency_exact``/``centre_exact``: zero tolerance.
    """

    tolerance: int
    sigma: float  # the smoothing σ in pixels
    image_size: Tuple[int, int]  # (H, W)
    points: np.ndarray  # (N, 2) x, y
    valid: np.ndarray  # (N,) bool: False for excluded (empty ground truth)
    n: int  # scored images
    n_excluded: int
    saliency: PointingScore
    saliency_exact: PointingScore
    centre: PointingScore
    centre_exact: PointingScore

    def summary(self) -> dict:
        """A JSON-ready dict: the protocol and every accuracy (no per-image arrays)."""
        out = {"tolerance_px": self.tolerance, "sigma_px": self.sigma, "image_size": list(self.image_size),
               "n": self.n, "n_excluded": self.n_excluded}
        for name in ("saliency", "saliency_exact", "centre", "centre_exact"):
            s = getattr(self, name)
            out[name] = {"accuracy": s.accuracy, "accuracy_overall": s.accuracy_overall,
                         "class_accuracy": {str(k): v for k, v in s.class_accuracy.items()}}
        return out


def pointing_game_maps(
    maps,
    labels=None,
    boxes=None,
    masks=None,
    image_size: Optional[Tuple[int, int]] = None,
    tolerance: Optional[int] = None,
    smooth: float = SMOOTH,
) -> PointingResult:
    """The pointing game of precomputed maps ``(N, h, w)`` (any scale, resized to the image).

    Args:
        labels: the class of each image, for the class-averaged accuracy (None: one class).
        boxes: ``(N, 4)`` ``x0, y0, x1, y1``, half-open, in image pixels.
        masks: boolean ``(N, H, W)``; with boxes too, a pixel counts when in either.
        image_size: ``(H, W)`` of the images; default the masks' size, else the maps' size.
        tolerance: in pixels; default ``round(15 · max(H, W) / 224)`` (TorchRay's 15 px at 224).
        smooth: σ of the Gaussian as a fraction of ``max(H, W)`` (TorchRay: 0.02).
    """
    m = _maps_numpy(maps)
    if image_size is None:
        image_size = _as_numpy(masks, "masks").shape[1:] if masks is not None else m.shape[1:]
    image_size = (int(image_size[0]), int(image_size[1]))
    truth = regions(boxes, masks, image_size)
    n_all = len(m)
    if len(truth) != n_all:
        raise ValueError(f"{n_all} maps but {len(truth)} ground-truth boxes/masks")
    lab = _labels(labels, n_all)
    h, w = image_size
    tol = scaled_tolerance(h, w) if tolerance is None else tolerance
    valid = truth.reshape(n_all, -1).any(axis=1)
    pts = points(m, image_size, smooth)
    centre = np.tile(np.array([[w // 2, h // 2]], dtype=np.int64), (n_all, 1))
    return PointingResult(
        tolerance=int(tol),
        sigma=float(smooth * max(h, w)),
        image_size=image_size,
        points=pts,
        valid=valid,
        n=int(valid.sum()),
        n_excluded=int((~valid).sum()),
        saliency=PointingScore.of(point_hits(pts, truth, tol), lab, valid),
        saliency_exact=PointingScore.of(point_hits(pts, truth, 0), lab, valid),
        centre=PointingScore.of(point_hits(centre, truth, tol), lab, valid),
        centre_exact=PointingScore.of(point_hits(centre, truth, 0), lab, valid),
    )


def saliency_maps(model, inputs: torch.Tensor, labels=None, method="gradient", batch_size: Optional[int] = None):
    """``max_c |g_c|`` maps ``(N, H, W)`` of ``labels`` (None: the predicted classes), as numpy."""
    from fastsal.saliency import saliency

    target = None if labels is None else torch.as_tensor(_as_numpy(labels, "labels")).long().reshape(-1)
    maps = saliency(model, inputs, target=target, method=method, reduce="abs_max", batch_size=batch_size)
    return maps.detach().float().cpu().numpy()


def pointing_game(
    model,
    inputs: torch.Tensor,
    labels,
    boxes=None,
    masks=None,
    method="gradient",
    tolerance: Optional[int] = None,
    smooth: float = SMOOTH,
    batch_size: Optional[int] = None,
) -> PointingResult:
    """The pointing game of ``model`` on ``inputs`` ``(N, C, H, W)``: the ``method`` map
    (``max_c |g_c|``) of each image's true class ``labels``, scored against its box/mask
    (at the inputs' size). See :func:`pointing_game_maps` and the module's docstring.
    """
    maps = saliency_maps(model, inputs, labels, method, batch_size)
    return pointing_game_maps(maps, labels, boxes, masks, tuple(inputs.shape[-2:]), tolerance, smooth)


# ----------------------------------------------------------------------------------------------
# mass inside the box


@dataclass
class MassResult:
    """Attribution mass inside the ground truth, per image (NaN when excluded) and its mean."""

    values: np.ndarray  # (N,) in [0, 1]; NaN for an empty box/mask or an all-zero map
    mean: float
    n: int
    n_excluded: int
    mode: str


def mass_in_box(maps, boxes=None, masks=None, mode: str = "abs") -> MassResult:
    """The fraction of each map's mass inside its box/mask: ``sum(a[inside]) / sum(a)``.

    ``mode="abs"``: ``a = |map|`` (the default; ``max_c |g_c|`` maps are already non-negative);
    ``mode="positive"``: ``a = max(map, 0)``. The maps must be at the image's size ``(N, H, W)``.
    Empty boxes/masks and maps with no mass (sum 0 or non-finite) are excluded (NaN) and counted.
    """
    if mode not in ("abs", "positive"):
        raise ValueError(f"mode must be 'abs' or 'positive', got {mode!r}")
    m = _maps_numpy(maps).astype(np.float64)
    truth = regions(boxes, masks, m.shape[1:])
    if len(truth) != len(m):
        raise ValueError(f"{len(m)} maps but {len(truth)} ground-truth boxes/masks")
    a = np.abs(m) if mode == "abs" else np.maximum(m, 0.0)
    total = a.reshape(len(a), -1).sum(axis=1)
    inside = (a * truth).reshape(len(a), -1).sum(axis=1)
    valid = truth.reshape(len(truth), -1).any(axis=1) & np.isfinite(total) & (total > 0)
    values = np.full(len(a), np.nan)
    values[valid] = inside[valid] / total[valid]
    return MassResult(values=values, mean=float(values[valid].mean()) if valid.any() else float("nan"),
                      n=int(valid.sum()), n_excluded=int((~valid).sum()), mode=mode)


# ----------------------------------------------------------------------------------------------
# weak-box IoU


@dataclass
class BoxIoUResult:
    """Weak-localization boxes (``fastsal run``'s) and their IoU with the true boxes."""

    boxes: np.ndarray  # (N, 4) predicted, -1 where the map gave no box
    iou: np.ndarray  # (N,) NaN for excluded (empty true box); 0 when no box was predicted
    mean: float
    n: int
    n_excluded: int
    threshold: float
    smooth: float


def weak_box_iou(
    maps,
    boxes,
    image_size: Optional[Tuple[int, int]] = None,
    threshold: Optional[float] = None,
    smooth: Optional[float] = None,
) -> BoxIoUResult:
    """IoU between each true box and the weak box :func:`fastsal.jobs.boxes.weak_box` draws from
    the map: the same boxes ``fastsal run`` writes, with its defaults (threshold 0.2 of the
    maximum, Gaussian smoothing of 0.03 of the map's longer side). Maps ``(N, h, w)`` at any scale
    are mapped to ``image_size`` ``(H, W)`` (default: the maps' size), where the true boxes live.
    Empty true boxes are excluded (NaN) and counted; a map that gives no box scores IoU 0.
    """
    from fastsal.jobs.boxes import DEFAULT_SMOOTH, DEFAULT_THRESHOLD, weak_box

    threshold = DEFAULT_THRESHOLD if threshold is None else float(threshold)
    smooth = DEFAULT_SMOOTH if smooth is None else float(smooth)
    m = _maps_numpy(maps)
    h, w = (int(image_size[0]), int(image_size[1])) if image_size is not None else m.shape[1:]
    b = check_boxes(boxes, h, w)
    if len(b) != len(m):
        raise ValueError(f"{len(m)} maps but {len(b)} boxes")
    pred = np.full((len(m), 4), -1, dtype=np.int64)
    iou = np.full(len(m), np.nan)
    valid = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
    for i in range(len(m)):
        box = weak_box(m[i], threshold, (w, h), smooth)
        if box is not None:
            pred[i] = box
        if valid[i]:
            iou[i] = box_iou(box, tuple(int(v) for v in b[i]))
    return BoxIoUResult(boxes=pred, iou=iou, mean=float(iou[valid].mean()) if valid.any() else float("nan"),
                        n=int(valid.sum()), n_excluded=int((~valid).sum()), threshold=threshold, smooth=smooth)


__all__ = [
    "BoxIoUResult",
    "MassResult",
    "PointingResult",
    "PointingScore",
    "SMOOTH",
    "TORCHRAY_TOLERANCE",
    "box_iou",
    "check_boxes",
    "class_averaged",
    "mass_in_box",
    "point_hits",
    "pointing_game",
    "pointing_game_maps",
    "points",
    "regions",
    "resize_maps",
    "saliency_maps",
    "scaled_tolerance",
    "weak_box_iou",
]
