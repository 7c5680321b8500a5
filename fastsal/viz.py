"""Pictures of saliency maps: heat maps, overlays, the RGB guided-backprop picture, method grids.

Everything returns ``uint8`` numpy arrays of shape ``(H, W, 3)`` (or ``(N, H, W, 3)`` for a
batch) or a Pillow image, and :func:`save_png` writes them. Pillow is the only picture
dependency; matplotlib is optional and used only for colormap names fastsal does not
carry itself (``"inferno"``, ``"jet"`` and ``"gray"`` are built in).

Scaling: maps are divided by a high percentile of their magnitude (99.5 by default) per
image, then clipped, so one extreme pixel does not turn the rest of the picture black.
Colours: dark (0) to bright (that percentile and above) along the colour map ("inferno"
by default); :func:`overlay_image` draws this as a legend strip. The signed RGB picture of
:func:`gradient_rgb` has mid-gray for zero.

Pictures for people: :func:`overlay_image` draws at least 256 px on the long side (the map
upsampled smoothly, boxes at display scale, a legend strip); the other functions keep the
map's own resolution, and :func:`enlarge` blows any picture up smoothly.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np
import torch

ArrayLike = Union[torch.Tensor, np.ndarray]

# (position, R, G, B) anchors, interpolated linearly: a close approximation of matplotlib's
# perceptual "inferno", the classic "jet" and plain gray.
_COLORMAPS = {
    "inferno": [
        (0.0, 0, 0, 4),
        (0.125, 31, 12, 72),
        (0.25, 85, 15, 109),
        (0.375, 136, 34, 106),
        (0.5, 186, 54, 85),
        (0.625, 227, 89, 51),
        (0.75, 249, 140, 10),
        (0.875, 249, 201, 50),
        (1.0, 252, 255, 164),
    ],
    "jet": [(0.0, 0, 0, 128), (0.125, 0, 0, 255), (0.375, 0, 255, 255), (0.625, 255, 255, 0), (0.875, 255, 0, 0), (1.0, 128, 0, 0)],
    "gray": [(0.0, 0, 0, 0), (1.0, 255, 255, 255)],
}


def _numpy(x: ArrayLike) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float32).numpy()
    return np.asarray(x, dtype=np.float32)


def _lut(cmap: str) -> np.ndarray:
    """A 256 x 3 uint8 lookup table for ``cmap``."""
    anchors = _COLORMAPS.get(cmap)
    if anchors is not None:
        pos = np.array([a[0] for a in anchors])
        rgb = np.array([a[1:] for a in anchors], dtype=np.float64)
        t = np.linspace(0.0, 1.0, 256)
        table = np.stack([np.interp(t, pos, rgb[:, c]) for c in range(3)], axis=1)
        return np.round(table).astype(np.uint8)
    try:
        from matplotlib import colormaps  # optional extra
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ValueError(
            f"unknown colormap {cmap!r}: fastsal carries {sorted(_COLORMAPS)}; other names need matplotlib"
        ) from err
    if cmap not in colormaps:
        raise ValueError(f"unknown colormap {cmap!r} (neither fastsal's {sorted(_COLORMAPS)} nor matplotlib's)")
    return np.round(colormaps[cmap](np.linspace(0.0, 1.0, 256))[:, :3] * 255).astype(np.uint8)


def normalize(maps: ArrayLike, percentile: float = 99.5, symmetric: bool = False) -> np.ndarray:
    """Scale each map (``(H, W)`` or a batch ``(N, H, W)``) into ``[0, 1]``.

    Each map is divided by the ``percentile`` of its absolute values and clipped. With
    ``symmetric=True`` a signed map goes to ``0.5 + 0.5 * m / scale`` (zero is mid-gray);
    otherwise negative values clip to 0. A map that is all zero stays zero (0.5 if
    symmetric). Non-finite values raise a ValueError.
    """
    m = _numpy(maps)
    if m.ndim not in (2, 3):
        raise ValueError(f"maps must be (H, W) or (N, H, W), got shape {m.shape}; reduce the channels first")
    if not np.all(np.isfinite(m)):
        raise ValueError("maps contain NaN or Inf values; they cannot be drawn")
    if not 0 < percentile <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {percentile}")
    batch = m if m.ndim == 3 else m[None]
    flat = np.abs(batch.reshape(batch.shape[0], -1))
    scale = np.percentile(flat, percentile, axis=1) if flat.shape[1] else np.zeros(batch.shape[0])
    scale = np.where(scale > 0, scale, np.where(flat.max(axis=1, initial=0) > 0, flat.max(axis=1, initial=0), 1.0))
    scaled = batch / scale[:, None, None]
    out = np.clip(0.5 + 0.5 * scaled, 0.0, 1.0) if symmetric else np.clip(scaled, 0.0, 1.0)
    return out.astype(np.float32) if m.ndim == 3 else out[0].astype(np.float32)


def heatmap(maps: ArrayLike, cmap: str = "inferno", percentile: float = 99.5) -> np.ndarray:
    """Color a map ``(H, W)`` or a batch ``(N, H, W)``: uint8 ``(..., H, W, 3)``."""
    norm = normalize(maps, percentile)
    return _lut(cmap)[np.round(norm * 255).astype(np.int64)]


def image_to_uint8(image: ArrayLike, mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None) -> np.ndarray:
    """An input image ``(C, H, W)`` (C = 1 or 3; a batch ``(N, C, H, W)`` too) as uint8 RGB.

    With ``mean``/``std`` (the normalization the model's inputs were given) the image is
    de-normalized first; values are then clipped to [0, 1]. Without them, an image whose
    values lie outside [0, 1] is min-max scaled.
    """
    x = _numpy(image)
    batched = x.ndim == 4
    x = x if batched else x[None]
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"image must be (C, H, W) or (N, C, H, W) with C = 1 or 3, got shape {_numpy(image).shape}")
    if mean is not None or std is not None:
        m = np.asarray(mean if mean is not None else 0.0, dtype=np.float32).reshape(1, -1, 1, 1)
        s = np.asarray(std if std is not None else 1.0, dtype=np.float32).reshape(1, -1, 1, 1)
        x = x * s + m
    else:
        lo = x.min(axis=(1, 2, 3), keepdims=True)
        hi = x.max(axis=(1, 2, 3), keepdims=True)
        outside = (lo < 0) | (hi > 1)
        x = np.where(outside, (x - lo) / np.maximum(hi - lo, 1e-12), x)
    x = np.clip(x, 0.0, 1.0)
    if x.shape[1] == 1:
        x = np.repeat(x, 3, axis=1)
    out = np.round(x.transpose(0, 2, 3, 1) * 255).astype(np.uint8)
    return out if batched else out[0]


def overlay(
    image: ArrayLike,
    maps: ArrayLike,
    alpha: float = 0.6,
    cmap: str = "inferno",
    percentile: float = 99.5,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
) -> np.ndarray:
    """The heat map laid over the image: uint8 ``(H, W, 3)`` (or a batch).

    Each pixel blends toward the heat color by ``alpha`` times the normalized map, so
    pixels with no saliency show the image unchanged.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    img = image_to_uint8(image, mean, std).astype(np.float32)
    norm = normalize(maps, percentile)
    if img.shape[:-1] != norm.shape:
        raise ValueError(f"image {img.shape[:-1]} and map {norm.shape} must have the same (N,) H, W")
    heat = _lut(cmap)[np.round(norm * 255).astype(np.int64)].astype(np.float32)
    weight = (alpha * norm)[..., None]
    return np.round(img * (1.0 - weight) + heat * weight).astype(np.uint8)


DISPLAY_MIN_SIDE = 256  # pictures meant to be looked at are at least this long on their long side


def enlarge(picture: ArrayLike, min_side: int = DISPLAY_MIN_SIDE, resample: str = "bicubic") -> np.ndarray:
    """A uint8 ``(H, W, 3)`` picture enlarged (never shrunk) so its long side is at least
    ``min_side``, keeping its aspect ratio; ``resample`` "bicubic", "bilinear" or "nearest"."""
    from PIL import Image

    pil = to_pil(picture)
    w, h = pil.size
    factor = min_side / max(w, h) if max(w, h) else 1.0
    if factor <= 1.0:
        return np.asarray(pil.convert("RGB"))
    filters = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}
    if resample not in filters:
        raise ValueError(f"resample must be one of {sorted(filters)}, got {resample!r}")
    size = (max(1, round(w * factor)), max(1, round(h * factor)))
    return np.asarray(pil.convert("RGB").resize(size, resample=filters[resample]))


def _legend_strip(width: int, cmap: str, percentile: float) -> np.ndarray:
    """A colour bar with its meaning: 0 on the left, the map's ``percentile`` (and above) on the right."""
    from PIL import Image, ImageDraw

    height, bar_h, margin = 30, 10, 6
    strip = Image.new("RGB", (width, height), (255, 255, 255))
    bar = _lut(cmap)[np.round(np.linspace(0, 255, max(1, width - 2 * margin))).astype(np.int64)]
    strip.paste(Image.fromarray(np.repeat(bar[None], bar_h, axis=0)), (margin, 2))
    draw = ImageDraw.Draw(strip)
    right = f">= p{percentile:g} of |map|"
    draw.text((margin, bar_h + 4), "0", fill=(0, 0, 0))
    tw = draw.textlength(right) if hasattr(draw, "textlength") else 6 * len(right)
    draw.text((max(margin + 12, width - margin - tw), bar_h + 4), right, fill=(0, 0, 0))
    return np.asarray(strip)


def overlay_image(
    image,
    saliency: ArrayLike,
    boxes: Sequence = (),
    min_side: int = DISPLAY_MIN_SIDE,
    alpha: float = 0.6,
    cmap: str = "inferno",
    percentile: float = 99.5,
    legend: bool = True,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
) -> np.ndarray:
    """A readable overlay: uint8 ``(H', W', 3)``, at least ``min_side`` pixels on its long side.

    ``image`` is a Pillow image, a uint8 ``(H, W, 3)`` array or a ``(C, H, W)`` tensor as
    :func:`overlay` takes; ``saliency`` a 2-D map of any size (the model's input resolution,
    say). The image is enlarged with bicubic interpolation, the map resized to it with
    bilinear interpolation before it is coloured (no blocks), and each of ``boxes`` (a box
    ``(x0, y0, x1, y1)`` in the image's pixels, half-open, or a pair ``(box, (r, g, b))``;
    None is skipped) drawn at display scale. With ``legend`` a colour bar under the picture
    says what the colours mean: 0 to the map's ``percentile`` of |map| (its colour scale).
    """
    import torch.nn.functional as F
    from PIL import Image, ImageDraw

    if isinstance(image, Image.Image):
        base = np.asarray(image.convert("RGB"))
    else:
        arr = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
        if arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3:
            base = arr
        else:
            base = image_to_uint8(image, mean, std)
    if base.ndim != 3:
        raise ValueError(f"overlay_image draws one image, got shape {base.shape}")
    h, w = base.shape[:2]
    m = _numpy(saliency)
    if m.ndim != 2:
        raise ValueError(f"saliency must be one 2-D map, got shape {m.shape}")
    shown = enlarge(base, min_side, "bicubic")
    dh, dw = shown.shape[:2]
    resized = F.interpolate(torch.from_numpy(np.ascontiguousarray(m))[None, None], size=(dh, dw), mode="bilinear",
                            align_corners=False)[0, 0].numpy()
    picture = overlay(shown.transpose(2, 0, 1).astype(np.float32) / 255.0, resized, alpha=alpha, cmap=cmap,
                      percentile=percentile)
    pil = Image.fromarray(picture)
    draw = ImageDraw.Draw(pil)
    sx, sy = dw / w, dh / h
    width = max(2, round(min(sx, sy)))
    for entry in boxes:
        box, color = (entry if entry is not None and len(entry) == 2 else (entry, (0, 255, 0)))
        if box is None:
            continue
        x0, y0, x1, y1 = box
        # half-open pixel box -> the outline just inside it, at display scale
        draw.rectangle([x0 * sx, y0 * sy, max(x0 * sx, x1 * sx - 1), max(y0 * sy, y1 * sy - 1)],
                       outline=tuple(color), width=width)
    out = np.asarray(pil)
    if legend:
        out = np.concatenate([out, _legend_strip(dw, cmap, percentile)], axis=0)
    return out


def gradient_rgb(grads: ArrayLike, percentile: float = 99.5) -> np.ndarray:
    """The RGB picture of a signed input gradient, as in Springenberg et al.'s guided backprop figures.

    ``grads`` is ``(3, H, W)`` or ``(N, 3, H, W)`` (1 channel is repeated). Each image is
    scaled by the ``percentile`` of ``|g|`` over all its channels and mapped to
    ``0.5 + 0.5 * g / scale``: zero gradient is mid-gray, each channel keeps its sign.
    """
    g = _numpy(grads)
    batched = g.ndim == 4
    g = g if batched else g[None]
    if g.ndim != 4 or g.shape[1] not in (1, 3):
        raise ValueError(f"grads must be (C, H, W) or (N, C, H, W) with C = 1 or 3, got shape {_numpy(grads).shape}")
    if g.shape[1] == 1:
        g = np.repeat(g, 3, axis=1)
    # treat the 3 channels of one image as one map for the scale
    n, c, h, w = g.shape
    as_maps = g.transpose(0, 2, 1, 3).reshape(n, h, c * w)
    norm = normalize(as_maps, percentile, symmetric=True).reshape(n, h, c, w).transpose(0, 2, 1, 3)
    out = np.round(norm.transpose(0, 2, 3, 1) * 255).astype(np.uint8)
    return out if batched else out[0]


# the classic name for the picture
guided_rgb = gradient_rgb


def to_pil(picture: ArrayLike):
    """A Pillow image from a uint8 ``(H, W, 3)`` or ``(H, W)`` array (or an already-made image)."""
    from PIL import Image

    if isinstance(picture, Image.Image):
        return picture
    arr = picture.detach().cpu().numpy() if isinstance(picture, torch.Tensor) else np.asarray(picture)
    if arr.dtype != np.uint8:
        raise TypeError(f"expected a uint8 picture (use heatmap/overlay/gradient_rgb first), got dtype {arr.dtype}")
    if arr.ndim == 3 and arr.shape[2] == 3:
        return Image.fromarray(arr, mode="RGB")
    if arr.ndim == 2:
        return Image.fromarray(arr, mode="L")
    raise ValueError(f"a picture must be (H, W, 3) or (H, W), got shape {arr.shape}")


def save_png(picture: ArrayLike, path) -> None:
    """Write a picture as PNG through Pillow, pixel for pixel (it is not resized: for a
    picture to look at, draw it with :func:`overlay_image` or :func:`enlarge` first)."""
    to_pil(picture).save(path, format="PNG", optimize=True)


def grid(
    cells: Sequence[Sequence[np.ndarray]],
    labels: Optional[Sequence[str]] = None,
    pad: int = 4,
    scale: int = 1,
    background: int = 255,
):
    """Lay out rows of uint8 ``(H, W, 3)`` pictures (all the same size) with optional column labels.

    ``scale`` enlarges each cell by nearest-neighbour repetition (small inputs stay crisp).
    Returns a Pillow image.
    """
    from PIL import Image, ImageDraw

    if not cells or not cells[0]:
        raise ValueError("grid needs at least one row with one picture")
    ncols = len(cells[0])
    if any(len(row) != ncols for row in cells):
        raise ValueError("every row of the grid must have the same number of pictures")
    if labels is not None and len(labels) != ncols:
        raise ValueError(f"{len(labels)} labels for {ncols} columns")
    h, w = cells[0][0].shape[:2]
    if any(c.shape[:2] != (h, w) for row in cells for c in row):
        raise ValueError("all pictures of a grid must have the same height and width")
    ch, cw = h * scale, w * scale
    label_h = 14 if labels else 0
    width = ncols * cw + (ncols + 1) * pad
    height = len(cells) * ch + (len(cells) + 1) * pad + label_h
    canvas = Image.new("RGB", (width, height), (background,) * 3)
    draw = ImageDraw.Draw(canvas)
    if labels:
        for j, text in enumerate(labels):
            draw.text((pad + j * (cw + pad) + 2, 1), text, fill=(0, 0, 0))
    for i, row in enumerate(cells):
        for j, cell in enumerate(row):
            pic = to_pil(cell if cell.ndim == 3 else np.repeat(cell[..., None], 3, axis=2))
            if scale != 1:
                pic = pic.resize((cw, ch), resample=Image.NEAREST)
            canvas.paste(pic, (pad + j * (cw + pad), label_h + pad + i * (ch + pad)))
    return canvas


def method_grid(
    model: torch.nn.Module,
    images: torch.Tensor,
    target=None,
    methods: Sequence[str] = ("gradient", "deconvnet", "guided"),
    style: str = "auto",
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    scale: int = 1,
    path=None,
):
    """One row per image of a batch: the input, then each method's map side by side.

    ``style``: ``"heat"`` (``abs_max`` heat maps), ``"rgb"`` (the signed RGB picture),
    ``"overlay"`` (heat laid over the input), or ``"auto"``: a heat map for ``gradient``,
    the RGB picture for ``deconvnet`` and ``guided`` (how the papers show them).
    ``target=None`` explains each image's predicted class. Saves a PNG when ``path`` is
    given; returns the Pillow image.
    """
    from fastsal.rules import as_rule
    from fastsal.saliency import saliency

    if style not in ("auto", "heat", "rgb", "overlay"):
        raise ValueError(f"style must be 'auto', 'heat', 'rgb' or 'overlay', got {style!r}")
    rules = [as_rule(m) for m in methods]
    columns = [image_to_uint8(images, mean, std)]
    for rule in rules:
        grads = saliency(model, images, target=target, method=rule, reduce=None)
        kind = style if style != "auto" else ("heat" if rule.value == "gradient" else "rgb")
        if kind == "rgb":
            columns.append(gradient_rgb(grads))
        elif kind == "heat":
            columns.append(heatmap(grads.abs().amax(dim=1)))
        else:
            columns.append(overlay(images, grads.abs().amax(dim=1), mean=mean, std=std))
    rows = [[col[i] for col in columns] for i in range(images.shape[0])]
    picture = grid(rows, labels=["input"] + [r.value for r in rules], scale=scale)
    if path is not None:
        picture.save(path, format="PNG", optimize=True)
    return picture


def show(picture: ArrayLike, title: Optional[str] = None):  # pragma: no cover - interactive
    """Display a picture with matplotlib (optional extra)."""
    try:
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError("fastsal.viz.show needs matplotlib (pip install matplotlib); save_png does not") from err
    fig, ax = plt.subplots()
    ax.imshow(np.asarray(to_pil(picture)))
    ax.axis("off")
    if title:
        ax.set_title(title)
    return fig


__all__ = [
    "normalize",
    "heatmap",
    "image_to_uint8",
    "overlay",
    "overlay_image",
    "enlarge",
    "gradient_rgb",
    "guided_rgb",
    "to_pil",
    "save_png",
    "grid",
    "method_grid",
    "show",
]
