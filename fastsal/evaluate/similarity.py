"""Per-image similarities between two batches of saliency maps, after Adebayo et al. 2018.

Every function takes maps of shape ``(N, H, W)`` (numpy arrays or tensors) and returns one
score per image, a float64 array ``(N,)``. A score is NaN where it is undefined (a constant
map has no ranks to correlate); summaries skip NaNs and count what they kept.

Which map and which normalization feed which metric (:func:`compare`, from raw input
gradients ``(N, C, H, W)``):

============== ============================== ==========================================
metric         map                            normalization before the comparison
============== ============================== ==========================================
``rank_abs``   ``max_c |g_c|`` (Simonyan)     ``"adebayo"``: :func:`grayscale_99`;
                                              ``"max"``: divided by its max (Quantus)
``rank_noabs`` ``sum_c g_c`` (signed)         ``"adebayo"``: :func:`diverging_99`;
                                              ``"max"``: divided by its max of ``|.|``
``ssim``       the ``rank_abs`` map           then :func:`minmax01`, SSIM with
                                              ``data_range=1.0``
``hog``        the ``rank_abs`` map           then :func:`minmax01`, HOG, Spearman
============== ============================== ==========================================

Adebayo's code sums ``|g_c|`` over channels for its grayscale map; fastsal's display map is
``max_c |g_c|`` (design §6), used here. Spearman is invariant to the positive scalings, so
under ``"max"`` the ranks are those of the raw map; the 99th-percentile clip of
``"adebayo"`` ties the top 1 % of pixels.

Settings, fixed so scores are comparable across runs:

* Spearman: ``scipy.stats.rankdata`` (average ranks for ties, as ``scipy.stats.spearmanr``)
  along each flattened map, then the Pearson correlation of the ranks, for the whole batch at once.
* SSIM: ``skimage.metrics.structural_similarity`` on 2-D maps in [0, 1] with
  ``data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False``
  (Wang et al. 2004's settings; maps need ``H, W >= 11``).
* HOG: ``skimage.feature.hog`` with ``orientations=9``, ``pixels_per_cell=(max(4, H // 8),
  max(4, W // 8))`` (8 cells a side whatever the resolution), ``cells_per_block=(2, 2)``,
  ``block_norm="L2-Hys"``; the score is the Spearman correlation of the two feature vectors.

scikit-image is an optional dependency (``pip install "fastsal[eval]"``); SSIM and HOG import it
when first used.
"""

from __future__ import annotations

from typing import Dict, Iterable, Tuple

import numpy as np
from scipy import stats

SIMILARITIES: Tuple[str, ...] = ("rank_abs", "rank_noabs", "ssim", "hog")
NORMALIZATIONS: Tuple[str, ...] = ("adebayo", "max")

SSIM_SETTINGS = dict(data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
HOG_ORIENTATIONS = 9
HOG_CELLS_PER_BLOCK = (2, 2)


def check_similarities(names: Iterable[str]) -> Tuple[str, ...]:
    """``names`` as a tuple, or a ValueError naming the allowed similarities."""
    if isinstance(names, str):
        names = (names,)
    names = tuple(names)
    bad = [n for n in names if n not in SIMILARITIES]
    if bad or not names:
        what = f"unknown similarity {bad[0]!r}" if bad else "no similarity asked for"
        raise ValueError(f"{what}: expected some of {', '.join(repr(s) for s in SIMILARITIES)}")
    return names


def _np(maps) -> np.ndarray:
    if hasattr(maps, "detach"):
        maps = maps.detach().cpu().double().numpy()
    maps = np.asarray(maps, dtype=np.float64)
    if maps.ndim != 3:
        raise ValueError(f"expected maps of shape (N, H, W), got shape {maps.shape}")
    return maps


def _pair(a, b) -> Tuple[np.ndarray, np.ndarray]:
    a, b = _np(a), _np(b)
    if a.shape != b.shape:
        raise ValueError(f"the two batches of maps differ in shape: {a.shape} vs {b.shape}")
    return a, b


def _safe_divide(maps: np.ndarray, scale: np.ndarray) -> np.ndarray:
    scale = scale.reshape(-1, 1, 1)
    # an all-zero map stays all zero (Quantus's normalise_by_max does the same)
    return np.divide(maps, scale, out=np.zeros_like(maps), where=scale > 0)


# ----- normalizations -------------------------------------------------------------------------------


def grayscale_99(maps) -> np.ndarray:
    """Adebayo's grayscale normalization: ``|map|`` clipped at its 99th percentile, divided by it (in [0, 1])."""
    a = np.abs(_np(maps))
    p99 = np.percentile(a.reshape(a.shape[0], -1), 99, axis=1)
    return np.minimum(_safe_divide(a, p99), 1.0)


def diverging_99(maps) -> np.ndarray:
    """Adebayo's diverging normalization: the signed map over the 99th percentile of ``|map|``, clipped to [-1, 1]."""
    a = _np(maps)
    p99 = np.percentile(np.abs(a).reshape(a.shape[0], -1), 99, axis=1)
    return np.clip(_safe_divide(a, p99), -1.0, 1.0)


def max_normalize(maps) -> np.ndarray:
    """Divided by the max of ``|map|`` per image (Quantus's ``normalise_by_max``); all-zero maps unchanged."""
    a = _np(maps)
    return _safe_divide(a, np.abs(a).reshape(a.shape[0], -1).max(axis=1))


def minmax01(maps) -> np.ndarray:
    """Min-max normalized to [0, 1] per image (a constant map becomes all zeros)."""
    a = _np(maps)
    flat = a.reshape(a.shape[0], -1)
    lo = flat.min(axis=1).reshape(-1, 1, 1)
    return _safe_divide(a - lo, flat.max(axis=1) - lo.ravel())


# ----- similarities ---------------------------------------------------------------------------------


def _centered_ranks(x: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Each row's average ranks minus their mean, and the rows' sums of squares (the half of a
    Spearman correlation that depends on one side only, so a reference side is ranked once)."""
    r = stats.rankdata(x, axis=1)
    r -= r.mean(axis=1, keepdims=True)
    return r, (r * r).sum(axis=1)


def _correlate(a: Tuple[np.ndarray, np.ndarray], b: Tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Pearson correlation of centered ranks (from :func:`_centered_ranks`), row by row."""
    (ra, ssa), (rb, ssb) = a, b
    num = (ra * rb).sum(axis=1)
    den = np.sqrt(ssa * ssb)  # sqrt(s * s) == s exactly: a map against itself scores 1.0
    with np.errstate(invalid="ignore", divide="ignore"):
        r = num / den
    r[den == 0] = np.nan  # a constant map: undefined, as scipy.stats.spearmanr
    return np.clip(r, -1.0, 1.0)


def _spearman_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation of each row of ``a`` with the same row of ``b`` (2-D inputs)."""
    return _correlate(_centered_ranks(a), _centered_ranks(b))


def spearman(a, b) -> np.ndarray:
    """Spearman rank correlation of each pair of maps (NaN where a map is constant)."""
    a, b = _pair(a, b)
    return _spearman_rows(a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1))


def _skimage(what: str):
    try:
        if what == "ssim":
            from skimage.metrics import structural_similarity

            return structural_similarity
        from skimage.feature import hog

        return hog
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"the {what!r} similarity needs scikit-image: pip install scikit-image (or fastsal[eval])"
        ) from exc


def ssim(a, b) -> np.ndarray:
    """SSIM of each pair of maps, which must already lie in [0, 1] (see :data:`SSIM_SETTINGS`)."""
    a, b = _pair(a, b)
    if min(a.shape[1:]) < 11:
        raise ValueError(f"SSIM with a Gaussian window of sigma 1.5 needs maps of at least 11 x 11, got {a.shape[1:]}")
    structural_similarity = _skimage("ssim")
    return np.array([structural_similarity(x, y, **SSIM_SETTINGS) for x, y in zip(a, b)], dtype=np.float64)


def hog_cell(shape: Tuple[int, int]) -> Tuple[int, int]:
    """The HOG cell size for maps of ``shape`` ``(H, W)``: ``(max(4, H // 8), max(4, W // 8))``."""
    return (max(4, shape[0] // 8), max(4, shape[1] // 8))


def hog_features(maps) -> np.ndarray:
    """HOG feature vectors ``(N, F)`` of maps (see the module docstring for the settings)."""
    m = _np(maps)
    cell = hog_cell(m.shape[1:])
    if m.shape[1] < 2 * cell[0] or m.shape[2] < 2 * cell[1]:
        raise ValueError(f"HOG needs maps of at least 8 x 8 pixels, got {m.shape[1:]}")
    hog = _skimage("hog")
    return np.stack(
        [
            hog(x, orientations=HOG_ORIENTATIONS, pixels_per_cell=cell, cells_per_block=HOG_CELLS_PER_BLOCK,
                block_norm="L2-Hys", feature_vector=True)
            for x in m
        ]
    ) if len(m) else np.zeros((0, 0))


def hog_similarity(a, b) -> np.ndarray:
    """Spearman correlation of the HOG features of each pair of maps."""
    a, b = _pair(a, b)
    if not len(a):
        return np.zeros(0)
    return _spearman_rows(hog_features(a), hog_features(b))


# ----- from raw gradients ---------------------------------------------------------------------------


def maps_from_gradient(grad) -> Tuple[np.ndarray, np.ndarray]:
    """``(max_c |g_c|, sum_c g_c)`` of a raw input gradient ``(N, C, H, W)``, as float64 arrays."""
    if hasattr(grad, "detach"):
        grad = grad.detach().cpu().double().numpy()
    g = np.asarray(grad, dtype=np.float64)
    if g.ndim != 4:
        raise ValueError(f"expected a raw input gradient of shape (N, C, H, W), got shape {g.shape}")
    return np.abs(g).max(axis=1), g.sum(axis=1)


def check_normalization(normalization: str) -> str:
    if normalization not in NORMALIZATIONS:
        raise ValueError(
            f"unknown normalization {normalization!r}: expected one of {', '.join(repr(n) for n in NORMALIZATIONS)}"
        )
    return normalization


def normalized_maps(grad, normalization: str = "adebayo") -> Tuple[np.ndarray, np.ndarray]:
    """``(abs map, signed map)`` of a raw gradient, normalized as :func:`compare` compares them."""
    check_normalization(normalization)
    abs_map, signed = maps_from_gradient(grad)
    if normalization == "adebayo":
        return grayscale_99(abs_map), diverging_99(signed)
    return max_normalize(abs_map), max_normalize(signed)


class PreparedMaps:
    """One side of :func:`compare`, computed once: the normalized maps of a raw gradient and
    what each similarity needs of them (centered ranks, the [0, 1] map, the HOG features'
    ranks). MPRT compares the original model's maps with every step's, so the original side
    is prepared once instead of once per step."""

    def __init__(self, grad, similarities=SIMILARITIES, normalization: str = "adebayo"):
        self.similarities = check_similarities(similarities)
        self.normalization = check_normalization(normalization)
        abs_map, signed = normalized_maps(grad, normalization)
        self.shape = abs_map.shape
        n = abs_map.shape[0]
        self._parts: Dict[str, object] = {}
        for name in self.similarities:
            if name == "rank_abs":
                self._parts[name] = _centered_ranks(abs_map.reshape(n, -1))
            elif name == "rank_noabs":
                self._parts[name] = _centered_ranks(signed.reshape(n, -1))
            elif name == "ssim":
                self._parts[name] = minmax01(abs_map)
            else:
                self._parts[name] = _centered_ranks(hog_features(minmax01(abs_map))) if n else None

    def compare(self, other: "PreparedMaps", similarities=None) -> Dict[str, np.ndarray]:
        """Per-image similarities ``{metric: (N,)}`` with ``other`` (prepared the same way);
        ``similarities``: a subset of those both were prepared with (default: all of mine)."""
        if other.shape != self.shape:
            raise ValueError(f"the two gradients differ in shape: {self.shape} vs {other.shape}")
        if other.normalization != self.normalization:
            raise ValueError(f"maps normalized differently: {self.normalization!r} vs {other.normalization!r}")
        out: Dict[str, np.ndarray] = {}
        for name in self.similarities if similarities is None else check_similarities(similarities):
            if name not in self._parts or name not in other._parts:
                raise ValueError(f"maps prepared without the {name!r} similarity")
            a, b = self._parts[name], other._parts[name]
            if name == "ssim":
                out[name] = ssim(a, b)
            elif a is None:  # no images
                out[name] = np.zeros(0)
            else:
                out[name] = _correlate(a, b)
        return out


def compare(grad_a, grad_b, similarities=SIMILARITIES, normalization: str = "adebayo") -> Dict[str, np.ndarray]:
    """Per-image similarities ``{metric: (N,)}`` between two raw input gradients ``(N, C, H, W)``.

    ``normalization``: ``"adebayo"`` (99th-percentile grayscale / diverging) or ``"max"``
    (divided by the max, as Quantus); see the table in the module docstring. Either side may
    be a :class:`PreparedMaps` (prepared with these similarities and this normalization).
    """
    similarities = check_similarities(similarities)
    a = grad_a if isinstance(grad_a, PreparedMaps) else PreparedMaps(grad_a, similarities, normalization)
    b = grad_b if isinstance(grad_b, PreparedMaps) else PreparedMaps(grad_b, similarities, normalization)
    for side in (a, b):
        if side.normalization != normalization:
            raise ValueError(f"maps prepared with normalization {side.normalization!r}, compared as {normalization!r}")
    return a.compare(b, similarities)


__all__ = [
    "SIMILARITIES",
    "NORMALIZATIONS",
    "PreparedMaps",
    "SSIM_SETTINGS",
    "check_similarities",
    "compare",
    "diverging_99",
    "grayscale_99",
    "hog_cell",
    "hog_features",
    "hog_similarity",
    "maps_from_gradient",
    "max_normalize",
    "minmax01",
    "normalized_maps",
    "spearman",
    "ssim",
]
