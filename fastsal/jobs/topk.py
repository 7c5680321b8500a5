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


def _iter_loaded(reader, indices, pre):
    """(item index, tensor) of the readable ones among ``indices`` (EXIF orientation applied),
    read in one pass (a tar shard front to back once)."""
    from fastsal.jobs import images as imgs

    for i, data, error in reader.read(indices):
        if error is None:
            tensor, _size, error = imgs.load_bytes(data, pre)
            if error is None:
                yield i, tensor


def _chunks(pairs, size):
    chunk = []
    for pair in pairs:
        chunk.append(pair)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def topk_images(model, reader, n_items: int, pre, layer_name: str, channel: int, k: int, batch_size: int,
                device) -> List[Tuple[float, int]]:
    """(strongest activation, item index) of the k best images, best first; ``reader`` as
    :func:`fastsal.jobs.sources.open_reader` makes."""
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
            for chunk in _chunks(_iter_loaded(reader, range(n_items), pre), batch_size):
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
    from fastsal.jobs.models import load_model
    from fastsal.jobs.sources import discover, open_reader

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
    reader = open_reader(args.src, source.kind, [it.key for it in source.items])
    best = topk_images(model, reader, len(source.items), pre, args.layer, args.channel, args.k, args.batch_size, device)
    tensors = dict(_iter_loaded(reader, sorted(i for _, i in best), pre))
    rows = []
    for value, i in best:
        x = tensors[i][None].to(device)
        projection = visualize_feature(model, x, args.layer, args.channel, method=args.method, seed="max")
        # cells for people: >= 256 px, enlarged smoothly
        rows.append([viz.enlarge(viz.image_to_uint8(tensors[i], pre.mean, pre.std)),
                     viz.enlarge(viz.gradient_rgb(projection[0].detach().cpu()))])
    picture = viz.grid(rows, labels=["image", f"{args.method} of {args.layer}[{args.channel}] (gray: 0)"])
    picture.save(args.out, format="PNG")
    listing = "\n".join(f"{v:10.4f}  {source.items[i].key}" for v, i in best)
    return f"top {len(best)} images for {args.layer} channel {args.channel}:\n{listing}\nwrote {args.out}"
