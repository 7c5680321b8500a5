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


def read_rgb(path: str):
    """Decode ``path`` to an RGB PIL image, or raise ImageError saying why not."""
    from PIL import Image, UnidentifiedImageError

    try:
        if os.path.getsize(path) == 0:
            raise ImageError("empty file")
        with Image.open(path) as im:
            im.load()
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                # transparent pixels over white, as a viewer shows them
                rgba = im.convert("RGBA")
                background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                return Image.alpha_composite(background, rgba).convert("RGB")
            return im.convert("RGB")
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError("file not found") from None
    except UnidentifiedImageError:
        raise ImageError("not an image Pillow can read (corrupt or unknown format)") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageError(f"unreadable image: {exc}") from None


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


def load(path: str, pre: Preprocess) -> Tuple[Optional[torch.Tensor], Tuple[int, int], Optional[str]]:
    """(tensor or None, original (width, height), error or None)."""
    try:
        image = read_rgb(path)
    except ImageError as exc:
        return None, (0, 0), str(exc)
    return to_tensor(image, pre), image.size, None


def normalize_on_device(images: torch.Tensor, pre: Preprocess) -> torch.Tensor:
    """uint8 (N, 3, H, W) already on the device -> normalized float32 (GPU-decoded batches)."""
    mean = torch.tensor(pre.mean, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(pre.std, device=images.device).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std
