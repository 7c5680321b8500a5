"""The pictures of ``fastsal eval``, drawn with Pillow alone (matplotlib is not a dependency).

* :func:`mprt_grid`: the cascading randomization of one image, rows methods, columns steps;
* :func:`similarity_curves`: similarity vs randomized layer, one panel per metric, one line per method;
* :func:`deletion_insertion_curves`: the mean deletion and insertion curves, one line per method.

Heat maps and the grid layout come from :mod:`fastsal.viz`; the line charts are drawn here
with ``ImageDraw`` (axes, ticks, grid lines, a legend).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from fastsal import viz

COLORS = {"gradient": (31, 119, 180), "deconvnet": (44, 160, 44), "guided": (214, 39, 40), "centre": (127, 127, 127)}
_EXTRA = [(148, 103, 189), (140, 86, 75), (227, 119, 194), (188, 189, 34)]
INK = (30, 30, 30)
GRID = (225, 225, 225)


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the bitmap font, one size
        return ImageFont.load_default()


def _color(name: str, i: int) -> Tuple[int, int, int]:
    return COLORS.get(name, _EXTRA[i % len(_EXTRA)])


def _text_size(draw, text: str, font) -> Tuple[int, int]:
    x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
    return x1 - x0, y1 - y0


def _fit(draw, text: str, font, width: int) -> str:
    """``text`` shortened from the left (``…tail``) to fit ``width`` pixels."""
    if _text_size(draw, text, font)[0] <= width:
        return text
    while len(text) > 1 and _text_size(draw, "…" + text, font)[0] > width:
        text = text[1:]
    return "…" + text


def mprt_grid(image, maps: Dict[str, np.ndarray], steps: Sequence[str], path: Optional[str] = None,
              mean=None, std=None, scale: int = 2):
    """Rows: methods; columns: the input, then ``steps`` (``"original"``, then each layer
    re-initialized in turn, output first). ``maps[method]`` is ``(len(steps), H, W)``, each
    cell drawn as its own heat map (:func:`fastsal.viz.heatmap`, scaled per cell). Returns the
    Pillow image; saves a PNG when ``path`` is given.
    """
    from PIL import Image, ImageDraw

    methods = list(maps)
    pic = viz.image_to_uint8(image, mean, std)
    h, w = pic.shape[:2]
    cw, ch, pad = w * scale, h * scale, 4
    font, small = _font(13), _font(11)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    left = max(_text_size(probe, m, font)[0] for m in methods) + 2 * pad
    title_h, label_h = 22, 16
    ncols = len(steps) + 1
    width = left + ncols * (cw + pad) + pad
    height = title_h + label_h + len(methods) * (ch + pad) + pad
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    draw.text((pad, 3), "Cascading randomization: layers re-initialized from the output down, left to right "
              "(max_c |grad|, each cell scaled on its own)", fill=INK, font=font)
    names = ["input"] + list(steps)
    for j, name in enumerate(names):
        x = left + j * (cw + pad)
        label = _fit(draw, name, small, cw)
        draw.text((x + (cw - _text_size(draw, label, small)[0]) // 2, title_h), label, fill=INK, font=small)
    for i, m in enumerate(methods):
        y = title_h + label_h + i * (ch + pad)
        tw, th = _text_size(draw, m, font)
        draw.text((pad, y + (ch - th) // 2), m, fill=INK, font=font)
        cells = [pic] + list(viz.heatmap(maps[m]))
        for j, cell in enumerate(cells):
            canvas.paste(viz.to_pil(cell).resize((cw, ch), Image.NEAREST), (left + j * (cw + pad), y))
    if path is not None:
        # a 256-colour palette: the heat maps use one colormap, so this keeps them exact enough
        # and the file 2-3x smaller
        canvas.quantize(256, dither=Image.Dither.NONE).save(path, format="PNG", optimize=True)
    return canvas


def _nice_range(values: np.ndarray, lo: float, hi: float, step: float) -> Tuple[float, float]:
    v = values[np.isfinite(values)]
    if v.size:
        lo = min(lo, np.floor(v.min() / step) * step)
        hi = max(hi, np.ceil(v.max() / step) * step)
    return float(lo), float(hi)


def _panel(canvas, box, title: str, series, xlim, ylim, yticks, xticks, xlabel: str = "", ylabel: str = "",
           rotate_xticks: bool = False, legend: str = "upper right"):
    """One line chart in ``box`` (x0, y0, x1, y1) of ``canvas``.

    ``series``: ``[(name, color, xs, ys)]``; ``xticks``: ``[(x, label)]``; ``yticks``: values;
    ``legend``: ``"upper right"``, ``"lower right"`` or ``""`` (none).
    """
    from PIL import Image, ImageDraw

    draw = ImageDraw.Draw(canvas)
    font, small = _font(13), _font(11)
    x0, y0, x1, y1 = box
    tick_h = max((_text_size(draw, t, small)[0] for _, t in xticks), default=0) + 8 if rotate_xticks else 18
    ax = (x0 + 48, y0 + 24, x1 - 10, y1 - tick_h - (18 if xlabel else 4))
    (xa, xb), (ya, yb) = xlim, ylim

    def px(x, y):
        return (ax[0] + (x - xa) / (xb - xa) * (ax[2] - ax[0]), ax[3] - (y - ya) / (yb - ya) * (ax[3] - ax[1]))

    draw.text((x0 + 48, y0 + 4), title, fill=INK, font=font)
    for t in yticks:
        _, yy = px(xa, t)
        draw.line([(ax[0], yy), (ax[2], yy)], fill=GRID, width=1)
        label = f"{t:g}"
        tw, th = _text_size(draw, label, small)
        draw.line([(ax[0] - 4, yy), (ax[0], yy)], fill=INK)
        draw.text((ax[0] - 6 - tw, yy - th // 2 - 2), label, fill=INK, font=small)
    for x, label in xticks:
        xx, _ = px(x, ya)
        draw.line([(xx, ax[3]), (xx, ax[3] + 4)], fill=INK)
        tw, th = _text_size(draw, label, small)
        if rotate_xticks:
            tile = Image.new("RGB", (tw + 4, th + 6), (255, 255, 255))
            ImageDraw.Draw(tile).text((2, 0), label, fill=INK, font=small)
            tile = tile.rotate(90, expand=True)
            canvas.paste(tile, (int(xx - tile.width / 2), int(ax[3] + 6)))
        else:
            draw.text((xx - tw / 2, ax[3] + 6), label, fill=INK, font=small)
    if ylabel:
        tw, th = _text_size(draw, ylabel, small)
        tile = Image.new("RGB", (tw + 4, th + 6), (255, 255, 255))
        ImageDraw.Draw(tile).text((2, 0), ylabel, fill=INK, font=small)
        tile = tile.rotate(90, expand=True)
        canvas.paste(tile, (x0 + 2, int((ax[1] + ax[3]) / 2 - tile.height / 2)))
    if xlabel:
        tw, _ = _text_size(draw, xlabel, small)
        draw.text(((ax[0] + ax[2]) / 2 - tw / 2, y1 - 16), xlabel, fill=INK, font=small)
    if ya < 0 < yb:
        _, yy = px(xa, 0)
        draw.line([(ax[0], yy), (ax[2], yy)], fill=(160, 160, 160), width=1)
    draw.rectangle(ax, outline=INK, width=1)
    for name, color, xs, ys in series:
        pts = [px(x, y) for x, y in zip(xs, ys) if np.isfinite(y)]
        if len(pts) > 1:
            draw.line(pts, fill=color, width=2, joint="curve")
        if len(pts) <= 40:
            for x, y in pts:
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
    if legend and series:
        lw = max(_text_size(draw, s[0], small)[0] for s in series) + 34
        lh = 8 + 16 * len(series)
        lx, ly = ax[2] - lw - 6, (ax[1] + 6 if legend == "upper right" else ax[3] - lh - 6)
        draw.rectangle([lx, ly, lx + lw, ly + lh], fill=(255, 255, 255), outline=(180, 180, 180))
        for k, (name, color, _, _) in enumerate(series):
            yy = ly + 12 + 16 * k
            draw.line([(lx + 6, yy), (lx + 24, yy)], fill=color, width=3)
            draw.text((lx + 28, yy - 7), name, fill=INK, font=small)


def similarity_curves(result, path: Optional[str] = None, metrics: Optional[Sequence[str]] = None,
                      panel: Tuple[int, int] = (560, 380)):
    """Similarity vs randomized layer of an MPRT :class:`~fastsal.evaluate.randomization.SanityResult`:
    one panel per metric (2 per row), one line per method, the mean over images; the first
    point is the unrandomized model. Returns the Pillow image; saves a PNG when ``path`` is given.
    """
    from PIL import Image

    metrics = list(metrics or result.similarities)
    summary = result.summary()
    labels = ["original"] + list(result.steps)
    ncols = 2 if len(metrics) > 1 else 1
    nrows = (len(metrics) + ncols - 1) // ncols
    pw, ph = panel
    canvas = Image.new("RGB", (pw * ncols, ph * nrows), (255, 255, 255))
    for k, metric in enumerate(metrics):
        series, values = [], []
        for i, m in enumerate(result.methods):
            orig = result.original[m][metric] if result.original is not None else np.array([1.0])
            orig = orig[np.isfinite(orig)]
            ys = [float(orig.mean()) if orig.size else np.nan] + list(summary[m][metric]["mean"])
            values += ys
            series.append((m, _color(m, i), list(range(len(ys))), ys))
        lo, hi = _nice_range(np.asarray(values, dtype=np.float64), 0.0, 1.0, 0.25)
        yticks = list(np.arange(lo, hi + 1e-9, 0.25 if hi - lo <= 1.5 else 0.5))
        r, c = divmod(k, ncols)
        _panel(canvas, (c * pw, r * ph, (c + 1) * pw, (r + 1) * ph),
               f"{result.check}: {metric}", series, (-0.3, len(labels) - 0.7), (lo, hi), yticks,
               list(enumerate(labels)), ylabel="similarity to the original map", rotate_xticks=True)
    if path is not None:
        canvas.save(path, format="PNG", optimize=True)
    return canvas


def deletion_insertion_curves(summary: Dict[str, dict], path: Optional[str] = None, panel=(480, 340)):
    """The mean deletion and insertion curves per method. ``summary[method]`` holds ``"x"`` and,
    per mode, ``{"curve": [...], "auc": float}`` (as ``fastsal eval`` records them)."""
    from PIL import Image

    modes = [mode for mode in ("deletion", "insertion") if any(mode in v for v in summary.values())]
    canvas = Image.new("RGB", (panel[0] * max(1, len(modes)), panel[1]), (255, 255, 255))
    for k, mode in enumerate(modes):
        series = []
        for i, (m, v) in enumerate(summary.items()):
            if mode in v:
                series.append((f"{m} (AUC {v[mode]['auc']:.3f})", _color(m, i), v["x"], v[mode]["curve"]))
        what = "most salient pixels set to 0" if mode == "deletion" else "restored into a blurred image"
        title = f"{mode}: {what}"
        _panel(canvas, (k * panel[0], 0, (k + 1) * panel[0], panel[1]), title, series, (0.0, 1.0), (0.0, 1.0),
               [0, 0.25, 0.5, 0.75, 1.0], [(t, f"{t:g}") for t in (0, 0.25, 0.5, 0.75, 1.0)],
               xlabel="fraction of pixels changed", ylabel="p(original top-1 class)",
               legend="upper right" if mode == "deletion" else "lower right")
    if path is not None:
        canvas.save(path, format="PNG", optimize=True)
    return canvas


__all__ = ["deletion_insertion_curves", "mprt_grid", "similarity_curves"]
