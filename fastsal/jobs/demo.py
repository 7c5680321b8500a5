"""``fastsal demo``: the main job, end to end and offline, on the embedded default model.

Synthetic images (shapes on clutter, with known boxes) -> ``fastsal run`` -> overlays with
the predicted box (green) beside the true one (white), the three methods side by side,
and a summary of how often the prediction, the map's peak and the box were right.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np

from fastsal.jobs.boxes import box_iou


def demo(out: str, n_images: int = 8, method: str = "guided") -> dict:
    import torch
    from PIL import Image

    from fastsal import viz
    from fastsal.default_model import synthetic
    from fastsal.default_model.model import DEFAULT_PREPROCESS, build_default_model
    from fastsal.jobs.runner import RunOptions, run
    from fastsal.jobs.store import load_results

    t0 = time.perf_counter()
    if n_images < 1:
        raise ValueError("--images must be at least 1")
    os.makedirs(out, exist_ok=True)
    image_dir = os.path.join(out, "images")
    csv_path = synthetic.write_dataset(image_dir, n_images, split="demo")
    truth = {}
    with open(csv_path) as fh:
        next(fh)
        for line in fh:
            rel, label, _name, x0, y0, x1, y1 = line.rstrip("\n").split(",")
            truth[rel] = (int(label), (int(x0), int(y0), int(x1), int(y1)))

    results_dir = os.path.join(out, "results")
    run(RunOptions(src=image_dir, out=results_dir, method=method, batch_size=16, workers=0,
                   device="cpu", loader_probe=0, progress=False, overwrite=True))
    results = load_results(results_dir)

    names = list(DEFAULT_PREPROCESS.class_names)
    correct = pointing = 0
    ious = []
    for key in results:
        rec = results[key]
        label, true_box = truth[key]
        image = np.asarray(Image.open(os.path.join(image_dir, key)).convert("RGB"))
        # drawn for people: >= 256 px, the map upsampled smoothly, boxes at display scale, a legend
        pic = viz.overlay_image(image, rec.map.astype(np.float32),
                                boxes=[(true_box, (255, 255, 255)), (rec.box, (0, 255, 0))])
        viz.save_png(pic, os.path.join(out, f"overlay_{os.path.basename(key)}"))
        correct += int(rec.label == label)
        y, x = np.unravel_index(np.argmax(rec.map.astype(np.float32)), rec.map.shape)
        pointing += int(true_box[0] <= x < true_box[2] and true_box[1] <= y < true_box[3])
        ious.append(box_iou(rec.box, true_box))

    model = build_default_model()
    images = np.stack([np.asarray(Image.open(os.path.join(image_dir, k)).convert("RGB")) for k in list(results)[:6]])
    batch = DEFAULT_PREPROCESS.normalize(torch.from_numpy(images))
    viz.method_grid(model, batch, mean=DEFAULT_PREPROCESS.mean, std=DEFAULT_PREPROCESS.std,
                    scale=-(-viz.DISPLAY_MIN_SIDE // max(images.shape[1:3])),
                    path=os.path.join(out, "methods.png"))
    n = len(results)
    summary = {
        "images": n,
        "method": method,
        "accuracy": correct / n if n else None,
        "pointing_game": pointing / n if n else None,
        "mean_box_iou": float(np.mean(ious)) if ious else None,
        "classes": names,
        "seconds": round(time.perf_counter() - t0, 2),
        "outputs": {"overlays": f"{out}/overlay_*.png (white: true box, green: fastsal's box; "
                                "colours from 0 to the map's 99.5th percentile, see the strip below each)",
                    "methods": f"{out}/methods.png", "results": results_dir},
    }
    with open(os.path.join(out, "summary.json"), "w") as fh:
        json.dump(summary, fh, indent=2)
    return summary
