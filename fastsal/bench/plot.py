"""A PNG of a benchmark run with Pillow alone: images/s and peak memory, by engine."""

from __future__ import annotations

from typing import Dict, List

COLORS = {"inference": (120, 120, 120), "autograd": (230, 159, 0), "captum": (213, 94, 0),
          "fastsal": (0, 114, 178), "fastsal-compile": (86, 180, 233), "fastsal-graph": (0, 158, 115)}


def plot(rows: List[Dict[str, object]], path: str, title: str = "") -> None:
    from PIL import Image, ImageDraw

    rows = [r for r in rows if r.get("images_per_s")]
    if not rows:
        return
    labels = [f"{r['model']} {r['dtype']} b{r['batch_size']} {r['engine']}/{r['method']}" for r in rows]
    bar_h, gap, left, width = 14, 4, 330, 360
    height = 40 + len(rows) * (bar_h + gap)
    img = Image.new("RGB", (left + 2 * width + 60, height), "white")
    d = ImageDraw.Draw(img)
    d.text((10, 8), title or "fastsal bench", fill="black")
    d.text((left, 24), "images/s", fill="black")
    d.text((left + width + 40, 24), "peak memory (MiB)", fill="black")
    max_ips = max(float(r["images_per_s"]) for r in rows)
    max_mem = max(float(r.get("peak_mem_mib") or 0) for r in rows) or 1.0
    for i, (r, label) in enumerate(zip(rows, labels)):
        y = 40 + i * (bar_h + gap)
        color = COLORS.get(str(r["engine"]), (0, 0, 0))
        d.text((6, y), label[:52], fill="black")
        w1 = int(width * float(r["images_per_s"]) / max_ips)
        d.rectangle([left, y, left + max(w1, 1), y + bar_h], fill=color)
        d.text((left + w1 + 3, y), f"{float(r['images_per_s']):.1f}", fill="black")
        mem = float(r.get("peak_mem_mib") or 0)
        x2 = left + width + 40
        w2 = int((width - 40) * mem / max_mem)
        d.rectangle([x2, y, x2 + max(w2, 1), y + bar_h], fill=color)
        d.text((x2 + w2 + 3, y), f"{mem:.0f}", fill="black")
    img.save(path, format="PNG")
