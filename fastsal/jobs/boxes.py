"""Weak localization from a saliency map (Simonyan et al. 2013, simplified): smooth the
map, threshold it, keep the largest connected component, take its bounding box.

The defaults (Gaussian smoothing of 3 % of the map's longer side, threshold 0.2 of the
maximum) were chosen on 200 images of the synthetic ``val`` split with the default model's
guided maps: mean IoU 0.69 there, 0.69 on the ``test`` split. Without smoothing, guided
maps are sparse edge maps and the largest component is a fragment (mean IoU 0.40).
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

Box = Tuple[int, int, int, int]


DEFAULT_THRESHOLD = 0.2
DEFAULT_SMOOTH = 0.03


def weak_box(
    saliency: np.ndarray,
    threshold: float = DEFAULT_THRESHOLD,
    image_size: Optional[Tuple[int, int]] = None,
    smooth: float = DEFAULT_SMOOTH,
) -> Optional[Box]:
    """The box ``(x0, y0, x1, y1)`` (exclusive ends) of the largest connected region where
    the map, blurred with a Gaussian of ``smooth`` times its longer side, is at least
    ``threshold`` times its maximum; in the coordinates of an image of ``image_size``
    ``(width, height)`` (default: the map's own). None for an all-zero or non-finite map.
    """
    from scipy import ndimage

    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"box threshold must be in (0, 1], got {threshold}")
    m = np.asarray(saliency, dtype=np.float32)
    if m.ndim != 2:
        raise ValueError(f"saliency map must be 2-D, got shape {m.shape}")
    if not np.all(np.isfinite(m)):
        return None
    if smooth < 0:
        raise ValueError(f"box smoothing must be >= 0, got {smooth}")
    if smooth > 0 and m.size:
        m = ndimage.gaussian_filter(m, sigma=smooth * max(m.shape))
    top = float(m.max()) if m.size else 0.0
    if top <= 0.0:
        return None
    labels, count = ndimage.label(m >= threshold * top)
    if count == 0:
        return None
    sizes = np.bincount(labels.ravel())[1:]
    largest = int(np.argmax(sizes)) + 1
    ys, xs = np.nonzero(labels == largest)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    h, w = m.shape
    if image_size is None:
        return int(x0), int(y0), int(x1), int(y1)
    iw, ih = image_size
    sx, sy = iw / w, ih / h
    return (
        int(np.floor(x0 * sx)),
        int(np.floor(y0 * sy)),
        min(iw, int(np.ceil(x1 * sx))),
        min(ih, int(np.ceil(y1 * sy))),
    )


def box_iou(a, b) -> float:
    """IoU of two half-open boxes ``(x0, y0, x1, y1)``; 0 when either is None or both are empty."""
    if a is None or b is None:
        return 0.0
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0
