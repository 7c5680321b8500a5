"""Saliency maps on the wire, never as JSON float lists (about 1.15 MB per 224² map).

Both encodings give ``{"encoding", "shape", "scale", "b64"}``; the map is
``decoded * scale`` in either:

* ``png`` (default): 8-bit grayscale PNG of ``map / max(map)``, ``scale = max(map)``, so the
  values come back within ``scale / 510``; a ``(K, H, W)`` stack is one ``(K*H, W)`` image
  with one scale per map. Any image viewer shows it.
* ``f16``: the map as little-endian float16 in C order (``scale`` is 1 unless the values
  are beyond float16's range, then a power of two that brings them inside it).

:func:`decode_map` is the client side of both.
"""

from __future__ import annotations

import base64
import io
from typing import List, Union

import numpy as np

F16_MAX = 60000.0  # a margin under float16's 65504


def _png_bytes(q: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(q).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def encode_map(saliency: np.ndarray, encoding: str = "png") -> dict:
    """``(H, W)`` or ``(K, H, W)`` float map -> the wire form."""
    m = np.asarray(saliency, dtype=np.float32)
    if m.ndim not in (2, 3):
        raise ValueError(f"a map is (H, W) or (K, H, W), got shape {m.shape}")
    if not np.isfinite(m).all():
        raise ValueError("the map holds NaN or Inf")
    shape = list(m.shape)
    if encoding == "png":
        stack = m.reshape(-1, m.shape[-2], m.shape[-1])
        peaks = np.abs(stack).reshape(stack.shape[0], -1).max(axis=1)
        safe = np.where(peaks > 0, peaks, 1.0).astype(np.float32)
        q = np.rint(np.clip(stack / safe[:, None, None], 0.0, 1.0) * 255.0).astype(np.uint8)
        scale: Union[float, List[float]] = [float(p) for p in peaks]
        if m.ndim == 2:
            scale = scale[0]
        data = _png_bytes(q.reshape(-1, m.shape[-1]))
    elif encoding == "f16":
        peak = float(np.abs(m).max()) if m.size else 0.0
        scale = 1.0
        while peak / scale > F16_MAX:
            scale *= 2.0**8
        data = (m / scale).astype("<f2").tobytes(order="C")
    else:
        raise ValueError(f"unknown encoding {encoding!r}: png or f16")
    return {"encoding": encoding, "shape": shape, "scale": scale, "b64": base64.b64encode(data).decode("ascii")}


def decode_map(wire: dict) -> np.ndarray:
    """The client side: ``{"encoding", "shape", "scale", "b64"}`` -> float32 map of ``shape``."""
    shape = tuple(int(s) for s in wire["shape"])
    raw = base64.b64decode(wire["b64"])
    if wire["encoding"] == "f16":
        return np.frombuffer(raw, dtype="<f2").astype(np.float32).reshape(shape) * np.float32(wire["scale"])
    if wire["encoding"] == "png":
        from PIL import Image

        q = np.asarray(Image.open(io.BytesIO(raw)), dtype=np.float32) / 255.0
        q = q.reshape((-1,) + shape[-2:])
        scale = np.atleast_1d(np.asarray(wire["scale"], dtype=np.float32))
        return (q * scale[:, None, None]).reshape(shape)
    raise ValueError(f"unknown encoding {wire['encoding']!r}")
