"""fastsal.viz: the numbers behind the pictures, and PNGs that Pillow reads back."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fastsal import viz


def test_normalize_scales_by_percentile_and_clips():
    m = torch.zeros(2, 10, 10)
    m[0, 0, 0] = 1000.0  # one extreme pixel
    m[0, 1:, :] = 1.0
    out = viz.normalize(m, percentile=90)
    assert out.shape == (2, 10, 10) and out.dtype == np.float32
    assert out[0, 0, 0] == 1.0  # clipped
    assert np.allclose(out[0, 1:], 1.0)  # the 90th percentile is 1, so ordinary pixels are not crushed
    assert np.all(out[1] == 0.0)  # an all-zero map stays zero, no division by zero
    signed = viz.normalize(torch.tensor([[-2.0, 0.0, 2.0]]), percentile=100, symmetric=True)
    assert np.allclose(signed, [[0.0, 0.5, 1.0]])


def test_normalize_rejects_bad_input():
    with pytest.raises(ValueError, match="NaN or Inf"):
        viz.normalize(torch.tensor([[float("nan"), 1.0]]))
    with pytest.raises(ValueError, match=r"\(H, W\) or \(N, H, W\)"):
        viz.normalize(torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="percentile"):
        viz.normalize(torch.zeros(4, 4), percentile=0)


def test_heatmap_uses_the_colormap_ends():
    m = torch.tensor([[0.0, 1.0]])
    rgb = viz.heatmap(m, cmap="gray", percentile=100)
    assert rgb.dtype == np.uint8 and rgb.shape == (1, 2, 3)
    assert rgb[0, 0].tolist() == [0, 0, 0] and rgb[0, 1].tolist() == [255, 255, 255]
    inferno = viz.heatmap(m, percentile=100)
    assert inferno[0, 0].tolist() == [0, 0, 4] and inferno[0, 1].tolist() == [252, 255, 164]
    with pytest.raises(ValueError, match="colormap"):
        viz.heatmap(m, cmap="no-such-map")


def test_image_to_uint8_denormalizes_and_handles_gray():
    mean, std = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]
    img = torch.zeros(3, 2, 2)  # normalized zeros are the mean: mid-gray
    out = viz.image_to_uint8(img, mean, std)
    assert out.shape == (2, 2, 3) and np.all(out == 128)
    gray = viz.image_to_uint8(torch.linspace(-1, 1, 4).reshape(1, 2, 2))
    assert gray.shape == (2, 2, 3) and gray[0, 0].tolist() == [0, 0, 0] and gray[1, 1].tolist() == [255] * 3
    with pytest.raises(ValueError, match="C = 1 or 3"):
        viz.image_to_uint8(torch.zeros(2, 4, 4))


def test_overlay_leaves_zero_saliency_pixels_unchanged():
    img = torch.rand(3, 8, 8)
    m = torch.zeros(8, 8)
    m[4, 4] = 1.0
    out = viz.overlay(img, m, alpha=0.5)
    base = viz.image_to_uint8(img)
    same = np.ones((8, 8), bool)
    same[4, 4] = False
    assert np.array_equal(out[same], base[same])
    assert not np.array_equal(out[4, 4], base[4, 4])
    with pytest.raises(ValueError, match="same"):
        viz.overlay(img, torch.zeros(4, 4))


def test_gradient_rgb_zero_is_mid_gray_and_signs_survive():
    g = torch.zeros(2, 3, 4, 4)
    g[0, 0, 0, 0] = 1.0
    g[0, 2, 1, 1] = -1.0
    out = viz.gradient_rgb(g, percentile=100)
    assert out.shape == (2, 4, 4, 3) and out.dtype == np.uint8
    assert out[0, 0, 0].tolist() == [255, 128, 128]
    assert out[0, 1, 1].tolist() == [128, 128, 0]
    assert np.all(out[1] == 128)


def test_grid_and_png_round_trip(tmp_path):
    cell = np.full((5, 6, 3), 200, np.uint8)
    pic = viz.grid([[cell, cell], [cell, cell]], labels=["a", "b"], pad=2, scale=2)
    assert pic.size == (2 * 12 + 3 * 2, 2 * 10 + 3 * 2 + 14)
    path = tmp_path / "grid.png"
    viz.save_png(pic, path)
    back = Image.open(path)
    assert back.format == "PNG" and back.size == pic.size
    with pytest.raises(TypeError, match="uint8"):
        viz.to_pil(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="same number"):
        viz.grid([[cell, cell], [cell]])


def test_method_grid_from_a_real_run(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(6 * 8 * 8, 4),
    ).eval()
    images = torch.rand(2, 3, 16, 16)
    path = tmp_path / "grid.png"
    pic = viz.method_grid(model, images, path=path, scale=2, mean=[0.0] * 3, std=[1.0] * 3)
    # 2 rows, 4 columns (input + three methods) of 32x32 cells, 4 px padding, 14 px of labels
    assert pic.size == (4 * 32 + 5 * 4, 2 * 32 + 3 * 4 + 14)
    back = np.asarray(Image.open(path).convert("RGB"))
    assert back.shape == (pic.size[1], pic.size[0], 3)
    # the input cell holds the input image, scaled 2x
    first = back[14 + 4 : 14 + 4 + 32 : 2, 4 : 4 + 32 : 2]
    assert np.array_equal(first, viz.image_to_uint8(images[0]))
    # the guided cell is the RGB picture of the guided gradient of the predicted class
    import fastsal

    grads = fastsal.saliency(model, images, method="guided", reduce=None)
    guided = back[14 + 4 : 14 + 4 + 32 : 2, 4 + 3 * 36 : 4 + 3 * 36 + 32 : 2]
    assert np.array_equal(guided, viz.gradient_rgb(grads)[0])
    with pytest.raises(ValueError, match="style"):
        viz.method_grid(model, images, style="sketch")
