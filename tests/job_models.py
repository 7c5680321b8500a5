"""Tiny models for the job tests, importable as ``job_models:tiny`` by ``fastsal run --model``."""

import time

import torch
from torch import nn


class Tiny(nn.Module):
    def __init__(self, delay: float = 0.0):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
        )
        self.head = nn.Linear(16, 5)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        self.delay = delay

    def forward(self, x):
        if self.delay:
            time.sleep(self.delay)
        return self.head(self.features(x).mean(dim=(2, 3)))


def tiny():
    return Tiny().eval()


def slow_tiny():
    """The same model, 0.3 s per forward: slow enough to be killed mid-job."""
    return Tiny(delay=0.3).eval()


class Bright(nn.Module):
    """Saliency where the image is bright: relu(mean of RGB - 0.5) pooled. Its guided map is
    nonzero exactly on the bright pixels, so its box is where a bright object is."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 1, 1)
        self.head = nn.Linear(1, 2)
        with torch.no_grad():
            self.conv.weight.fill_(1.0 / 3.0)
            self.conv.bias.fill_(-0.5)
            self.head.weight.copy_(torch.tensor([[1.0], [-1.0]]))
            self.head.bias.zero_()

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def bright():
    """Input normalization is ImageNet's for a factory: 0.5 after it is a bright pixel."""
    return Bright().eval()
