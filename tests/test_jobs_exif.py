"""EXIF orientation: a phone JPEG stored sideways (orientation tag 6) gets the box of the
picture people see; ``--no-exif-transpose`` keeps raw pixels; the GPU decode path's
tensor turn equals Pillow's ``exif_transpose`` for all eight orientations."""

from __future__ import annotations

import io
import os
import sys

import numpy as np
import pytest
import torch

from fastsal.jobs import images as imgs
from fastsal.jobs.boxes import box_iou
from fastsal.jobs.runner import RunOptions, run
from fastsal.jobs.store import load_results

pytest.importorskip("scipy")
PIL = pytest.importorskip("PIL")
from PIL import Image, ImageOps  # noqa: E402

TESTS = os.path.dirname(__file__)
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)

# the picture as seen: 40 wide, 64 high, a white square near the bottom left
VISIBLE_W, VISIBLE_H = 40, 64
SQUARE = (4, 40, 16, 56)  # x0, y0, x1, y1


def _visible():
    arr = np.full((VISIBLE_H, VISIBLE_W, 3), 30, np.uint8)
    x0, y0, x1, y1 = SQUARE
    arr[y0:y1, x0:x1] = 255
    return Image.fromarray(arr)


def _exif(orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """phone/sideways.jpg: the raw pixels turned 90 degrees, tag 6 says how to turn them
    back; ref/upright.png: exactly the pixels Pillow shows for it, losslessly."""
    root = tmp_path_factory.mktemp("exif")
    (root / "phone").mkdir()
    (root / "ref").mkdir()
    raw = _visible().transpose(Image.ROTATE_90)  # stored sideways: 64 wide, 40 high
    path = root / "phone" / "sideways.jpg"
    raw.save(path, quality=95, subsampling=0, exif=_exif(6))
    with Image.open(path) as im:
        assert im.size == (VISIBLE_H, VISIBLE_W) and im.getexif()[0x0112] == 6
        shown = ImageOps.exif_transpose(im)
        shown.save(root / "ref" / "upright.png")
    return root


OPTS = dict(model="job_models:bright", size=32, batch_size=2, workers=0, device="cpu", loader_probe=0,
            progress=False, box_smooth=0.0, box_threshold=0.5)


def _one(out):
    res = load_results(out)
    (key,) = list(res)
    return res[key], res.manifest


def test_box_is_in_the_coordinates_people_see(photos, tmp_path):
    rec, manifest = _one(_run(photos / "phone", tmp_path / "on"))
    assert manifest["config"]["exif_transpose"] is True
    assert rec.size == (VISIBLE_W, VISIBLE_H)
    assert box_iou(rec.box, SQUARE) > 0.75, rec.box
    # the same pixels without EXIF (a PNG of what Pillow shows) give the same map and box
    ref, _ = _one(_run(photos / "ref", tmp_path / "ref"))
    assert ref.box == rec.box and np.array_equal(ref.map, rec.map)


def test_no_exif_transpose_keeps_raw_pixels(photos, tmp_path):
    rec, manifest = _one(_run(photos / "phone", tmp_path / "off", exif_transpose=False))
    assert manifest["config"]["exif_transpose"] is False
    assert rec.size == (VISIBLE_H, VISIBLE_W)  # the stored, sideways size
    # the square is where the raw pixels have it: turned, so not at SQUARE
    x0, y0, x1, y1 = SQUARE
    raw_square = (y0, VISIBLE_W - x1, y1, VISIBLE_W - x0)
    assert box_iou(rec.box, raw_square) > 0.75 and box_iou(rec.box, SQUARE) < 0.2, rec.box


def _run(src, out, **extra):
    run(RunOptions(src=str(src), out=str(out), **{**OPTS, **extra}))
    return str(out)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_gpu_path_turn_equals_pillow(orientation):
    """``decode_jpeg`` on CUDA ignores EXIF; the runner reads the tag from the header and turns
    the decoded tensor. Checked on a PNG (decoded exactly by both) for each orientation."""
    io_mod = pytest.importorskip("torchvision.io")
    arr = np.random.default_rng(orientation).integers(0, 255, (5, 7, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", exif=_exif(orientation))
    data = buf.getvalue()
    assert imgs.exif_orientation(data) == orientation
    decoded = io_mod.decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), apply_exif_orientation=False)
    turned = imgs.apply_orientation(decoded, imgs.exif_orientation(data))
    expected = np.asarray(imgs.decode_rgb(data))
    assert np.array_equal(turned.permute(1, 2, 0).numpy(), expected)


def test_orientation_of_bytes_without_exif_is_1():
    buf = io.BytesIO()
    Image.new("RGB", (3, 2)).save(buf, format="JPEG")
    assert imgs.exif_orientation(buf.getvalue()) == 1 and imgs.exif_orientation(b"junk") == 1


def test_raw_jpeg_path_turns_and_sizes_like_pillow(photos):
    """The ``--decode gpu`` path (raw bytes from the loader, ``decode_jpeg`` batch, EXIF turn,
    resize, normalize), run with the CPU as its device: same size and nearly the same input
    tensor as the Pillow path (two JPEG decoders and two resizers: not bit-equal)."""
    pytest.importorskip("torchvision")
    from fastsal.jobs import runner
    from fastsal.jobs.sources import FileReader, plan_batches

    root = str(photos / "phone")
    reader = FileReader(root, ["sideways.jpg"])
    pre = imgs.Preprocess((32, 32), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    groups = [[b] for b in plan_batches("folder", ["sideways.jpg"], 1)]
    (_, raw_samples), = list(runner._BatchStream(reader, groups, pre, True, raw_jpeg=True))
    assert raw_samples[0][4] is not None and raw_samples[0][5] == 6  # raw bytes and the tag, not decoded
    (_, cpu_samples), = list(runner._BatchStream(reader, groups, pre, True, raw_jpeg=False))
    decoded = runner._decode_on_gpu(raw_samples, pre, True, torch.device("cpu"))
    assert decoded[0][2] == cpu_samples[0][2] == (VISIBLE_W, VISIBLE_H)
    assert (decoded[0][1] - cpu_samples[0][1]).abs().mean() < 0.1
