"""Decoding and preprocessing: any readable image becomes a normalized RGB tensor; anything
else becomes a one-line reason for the errors file."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np
import torch


@dataclass(frozen=True)
class Preprocess:
    """How a model wants its input: the whole image resized to ``size`` and normalized.

    The image is not center-cropped, so every pixel is explained and boxes map back to
    the original image linearly.
    """

    size: Tuple[int, int]  # (height, width)
    mean: Sequence[float]
    std: Sequence[float]

    def as_dict(self):
        return {"size": list(self.size), "mean": list(self.mean), "std": list(self.std)}


class ImageError(Exception):
    """An image that could not be used, with the reason."""


def _to_rgb(im, exif_transpose: bool):
    from PIL import ImageOps

    im.load()
    if exif_transpose:
        # the orientation a viewer applies: boxes and maps are then in the pixels people see
        im = ImageOps.exif_transpose(im)
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        # transparent pixels over white, as a viewer shows them
        from PIL import Image

        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


def _decode(opener, exif_transpose: bool):
    from PIL import Image, UnidentifiedImageError

    try:
        with opener() as im:
            return _to_rgb(im, exif_transpose)
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError("file not found") from None
    except UnidentifiedImageError:
        raise ImageError("not an image Pillow can read (corrupt or unknown format)") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ImageError(f"unreadable image: {exc}") from None


def read_rgb(path: str, exif_transpose: bool = True):
    """Decode ``path`` to an RGB PIL image, turned as its EXIF orientation says (unless
    ``exif_transpose=False``), or raise ImageError saying why not."""
    from PIL import Image

    try:
        if os.path.getsize(path) == 0:
            raise ImageError("empty file")
    except FileNotFoundError:
        raise ImageError("file not found") from None
    except OSError as exc:
        raise ImageError(f"unreadable file: {exc}") from None
    return _decode(lambda: Image.open(path), exif_transpose)


def decode_rgb(data: bytes, exif_transpose: bool = True):
    """:func:`read_rgb` for encoded bytes already in memory (a tar member, a request body)."""
    import io

    from PIL import Image

    if not data:
        raise ImageError("empty file")
    return _decode(lambda: Image.open(io.BytesIO(data)), exif_transpose)


def exif_orientation(data: bytes) -> int:
    """The EXIF orientation tag (1-8) of encoded image bytes; 1 when absent or unreadable.
    Reads the headers only (no decoding)."""
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            value = int(im.getexif().get(0x0112, 1))
    except Exception:  # a broken header: the decoder will say what is wrong
        return 1
    return value if 1 <= value <= 8 else 1


def apply_orientation(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """Turn a decoded ``(..., H, W)`` tensor as EXIF ``orientation`` says, exactly as
    Pillow's ``ImageOps.exif_transpose`` turns the image (for decoders that ignore EXIF,
    such as ``decode_jpeg`` on CUDA)."""
    if orientation == 2:
        return image.flip(-1)
    if orientation == 3:
        return image.flip(-2, -1)
    if orientation == 4:
        return image.flip(-2)
    if orientation == 5:
        return image.transpose(-2, -1)
    if orientation == 6:
        return torch.rot90(image, -1, dims=(-2, -1))
    if orientation == 7:
        return image.transpose(-2, -1).flip(-2, -1)
    if orientation == 8:
        return torch.rot90(image, 1, dims=(-2, -1))
    return image


def to_tensor(image, pre: Preprocess) -> torch.Tensor:
    """(3, H, W) float32, resized (bilinear, antialiased) and normalized."""
    from PIL import Image

    h, w = pre.size
    resized = image.resize((w, h), Image.BILINEAR)
    arr = np.asarray(resized, dtype=np.float32) / 255.0
    t = torch.from_numpy(arr).permute(2, 0, 1)
    mean = torch.tensor(pre.mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(pre.std, dtype=torch.float32).view(3, 1, 1)
    return (t - mean) / std


Loaded = Tuple[Optional[torch.Tensor], Tuple[int, int], Optional[str]]


def load(path: str, pre: Preprocess, exif_transpose: bool = True) -> Loaded:
    """(tensor or None, original (width, height), error or None)."""
    try:
        image = read_rgb(path, exif_transpose)
    except ImageError as exc:
        return None, (0, 0), str(exc)
    return to_tensor(image, pre), image.size, None


def load_bytes(data: bytes, pre: Preprocess, exif_transpose: bool = True) -> Loaded:
    """:func:`load` for encoded bytes in memory."""
    try:
        image = decode_rgb(data, exif_transpose)
    except ImageError as exc:
        return None, (0, 0), str(exc)
    return to_tensor(image, pre), image.size, None


def normalize_on_device(images: torch.Tensor, pre: Preprocess) -> torch.Tensor:
    """uint8 (N, 3, H, W) already on the device -> normalized float32 (GPU-decoded batches)."""
    mean = torch.tensor(pre.mean, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(pre.std, device=images.device).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std
