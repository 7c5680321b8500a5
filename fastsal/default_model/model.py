"""fastsal's embedded default model: a small plain CNN trained on the synthetic data set.

``build_default_model()`` returns it in eval mode with the shipped weights; ``DEFAULT_PREPROCESS``
says what it expects as input. Class ``i`` is ``CLASS_NAMES[i]``.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from importlib import resources
from typing import Tuple

import torch
from torch import nn

from fastsal.default_model.synthetic import CLASS_NAMES, NUM_CLASSES, SIZE

WEIGHTS_FILE = "weights.pt"

WEIGHTS_SHA256 = "ff2a9937c94e821597e914531532be6de1ff0a7e32b1b453ff48b4872267643c"
"""sha256 of the shipped ``weights.pt`` (written by ``python -m fastsal.default_model.train``)."""


@dataclass(frozen=True)
class Preprocess:
    """What the default model expects: RGB, ``size`` x ``size``, scaled to [0, 1], then normalized."""

    size: int
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    class_names: Tuple[str, ...]

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, H, W, 3) or float (N, 3, H, W) in [0, 1] -> the model's normalized input."""
        if images.dtype == torch.uint8:
            images = images.permute(0, 3, 1, 2).float().div_(255.0)
        mean = torch.tensor(self.mean, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
        return (images - mean) / std


DEFAULT_PREPROCESS = Preprocess(
    size=SIZE,
    mean=(0.5, 0.5, 0.5),
    std=(0.25, 0.25, 0.25),
    class_names=CLASS_NAMES,
)


def _conv(cin: int, cout: int):
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class DefaultNet(nn.Module):
    """64x64 RGB -> NUM_CLASSES logits. Six 3x3 conv/BN/ReLU layers, three 2x2 max-pools (each
    right after a ReLU), global average pooling over an 8x8 map and one linear layer."""

    def __init__(self, num_classes: int = NUM_CLASSES, widths=(16, 32, 64, 128)):
        super().__init__()
        w1, w2, w3, w4 = widths
        self.features = nn.Sequential(
            *_conv(3, w1), nn.MaxPool2d(2),  # 32x32
            *_conv(w1, w2), nn.MaxPool2d(2),  # 16x16
            *_conv(w2, w3), *_conv(w3, w3), nn.MaxPool2d(2),  # 8x8
            *_conv(w3, w4), *_conv(w4, w4),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(w4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def load_state_dict_bytes(data: bytes) -> dict:
    sd = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}


PERMUTED_WEIGHTS_FILE = "weights_permuted.pt"
"""The data randomization test's model: DefaultNet trained on permuted labels (README.md here)."""


def permuted_weights_path() -> str:
    """Path of the shipped permuted-label weights (Adebayo et al.'s data randomization test)."""
    path = resources.files("fastsal.default_model").joinpath(PERMUTED_WEIGHTS_FILE)
    return str(path)


def build_default_model(pretrained: bool = True) -> DefaultNet:
    """The default model in eval mode; with ``pretrained`` (the default), the shipped weights."""
    model = DefaultNet()
    if pretrained:
        data = resources.files("fastsal.default_model").joinpath(WEIGHTS_FILE).read_bytes()
        model.load_state_dict(load_state_dict_bytes(data))
    return model.eval()
