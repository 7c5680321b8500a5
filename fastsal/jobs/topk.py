"""``fastsal topk``: Zeiler & Fergus's other picture. For one layer and channel, the k images
of a data set whose strongest activation in that channel is largest, each beside the
projection of that activation back to pixel space (DeconvNet by default)."""

from __future__ import annotations

import heapq
from typing import List, Tuple

import torch


def _resolve_layer(model: torch.nn.Module, name: str) -> torch.nn.Module:
    modules = dict(model.named_modules())
    if name not in modules:
        close = [n for n in modules if n and (name in n or n in name)][:8]
        raise ValueError(f"layer {name!r} is not a module of the model" + (f"; did you mean one of {close}?" if close else ""))
    return modules[name]


def topk_images(model, items, pre, layer_name: str, channel: int, k: int, batch_size: int, device) -> List[Tuple[float, int]]:
    """(strongest activation, item index) of the k best images, best first."""
    from fastsal.jobs import images as imgs

    layer = _resolve_layer(model, layer_name)
    captured = {}

    def hook(_module, _inp, out):
        if not isinstance(out, torch.Tensor) or out.dim() < 2:
            raise ValueError(f"layer {layer_name!r} does not output a (N, C, ...) tensor")
        if not 0 <= channel < out.shape[1]:
            raise ValueError(f"channel {channel} is out of range: layer {layer_name!r} has {out.shape[1]} channels")
        captured["max"] = out[:, channel].flatten(1).amax(dim=1)

    best: List[Tuple[float, int]] = []
    handle = layer.register_forward_hook(hook)
    try:
        with torch.inference_mode():
            for start in range(0, len(items), batch_size):
                chunk = []
                for i in range(start, min(start + batch_size, len(items))):
                    tensor, _size, error = imgs.load(items[i].path, pre)
                    if error is None:
                        chunk.append((i, tensor))
                if not chunk:
                    continue
                model(torch.stack([t for _, t in chunk]).to(device))
                for (i, _), v in zip(chunk, captured["max"].float().cpu().tolist()):
                    heapq.heappush(best, (v, -i))
                    if len(best) > k:
                        heapq.heappop(best)
    finally:
        handle.remove()
    return [(v, -neg) for v, neg in sorted(best, reverse=True)]


def topk_from_args(args) -> str:
    from fastsal import viz
    from fastsal.features import visualize_feature
    from fastsal.jobs import images as imgs
    from fastsal.jobs.models import load_model
    from fastsal.jobs.sources import discover

    if args.k < 1:
        raise SystemExit("fastsal topk: --k must be at least 1")
    device = torch.device("cuda" if (args.device == "auto" and torch.cuda.is_available()) else
                          (args.device if args.device != "auto" else "cpu"))
    loaded = load_model(args.model, args.weights, args.size)
    model = loaded.model.to(device)
    source = discover(args.src)
    if not source.items:
        raise SystemExit(f"fastsal topk: no images found in {args.src}")
    pre = loaded.preprocess
    best = topk_images(model, source.items, pre, args.layer, args.channel, args.k, args.batch_size, device)
    rows = []
    for value, i in best:
        tensor, _, _ = imgs.load(source.items[i].path, pre)
        x = tensor[None].to(device)
        projection = visualize_feature(model, x, args.layer, args.channel, method=args.method, seed="max")
        rows.append([viz.image_to_uint8(tensor, pre.mean, pre.std), viz.gradient_rgb(projection[0].detach().cpu())])
    scale = max(1, 192 // max(pre.size))
    picture = viz.grid(rows, labels=["image", f"{args.method} of {args.layer}[{args.channel}]"], scale=scale)
    picture.save(args.out, format="PNG")
    listing = "\n".join(f"{v:10.4f}  {source.items[i].key}" for v, i in best)
    return f"top {len(best)} images for {args.layer} channel {args.channel}:\n{listing}\nwrote {args.out}"
