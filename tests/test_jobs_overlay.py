"""Pictures people can read: overlays at least 256 px on the long side, the map upsampled
smoothly, boxes at display scale, a legend strip (``fastsal demo``'s overlay sizes are checked
in tests/test_jobs.py::test_demo_runs_offline)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastsal import viz

pytest.importorskip("PIL")


def test_overlay_image_is_readable_size_with_box_at_display_scale():
    img = np.full((48, 64, 3), 40, np.uint8)  # H 48, W 64: 4x to reach 256
    m = torch.zeros(16, 16)
    m[4:8, 4:8] = 1.0
    out = viz.overlay_image(img, m, boxes=[((8, 4, 40, 30), (0, 255, 0))], legend=False)
    assert out.dtype == np.uint8 and out.shape == (192, 256, 3)
    s = 4
    # the outline sits on the box's edges at display scale, 4 px wide
    assert out[4 * s + 10, 8 * s].tolist() == [0, 255, 0] and out[30 * s - 1, 8 * s + 20].tolist() == [0, 255, 0]
    assert out[4 * s + 10, 8 * s + 6].tolist() != [0, 255, 0]  # inside the box, no line
    # the map is upsampled smoothly: many distinct heat values, not 16x16 flat blocks
    with_legend = viz.overlay_image(img, m)
    assert with_legend.shape[0] > 192 and with_legend.shape[1] == 256
    row = with_legend[72, :, 0].astype(int)  # through the blob (map rows 4-8 = display rows 48-96)
    assert len(np.unique(row)) > 12  # nearest-neighbour blocks would give 2 values


def test_overlay_image_keeps_large_images_and_rejects_batches():
    big = np.zeros((300, 400, 3), np.uint8)
    assert viz.overlay_image(big, torch.rand(10, 10), legend=False).shape == (300, 400, 3)
    with pytest.raises(ValueError, match="one 2-D map"):
        viz.overlay_image(big, torch.rand(2, 10, 10))
    assert viz.enlarge(np.zeros((10, 20, 3), np.uint8)).shape == (128, 256, 3)
