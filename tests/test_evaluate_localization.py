"""fastsal.evaluate.localization and .faithfulness on hand-computed cases."""

import numpy as np
import pytest
import torch
from torch import nn

from fastsal.evaluate.faithfulness import auc, blur, deletion_insertion
from fastsal.evaluate.localization import (
    box_iou,
    mass_in_box,
    point_hits,
    pointing_game,
    pointing_game_maps,
    points,
    scaled_tolerance,
    weak_box_iou,
)


def spike(h, w, x, y, n=1):
    m = np.zeros((n, h, w), np.float32)
    m[:, y, x] = 1.0
    return m


# ----------------------------------------------------------------------------------------------
# pointing game


def test_scaled_tolerance_is_torchray_15px_at_224():
    assert scaled_tolerance(224, 224) == 15
    assert scaled_tolerance(64, 64) == 4  # round(4.29)
    assert scaled_tolerance(300, 448) == 30


def test_smoothed_spike_stays_the_point():
    assert points(spike(64, 64, 10, 20))[0].tolist() == [10, 20]
    assert points(spike(64, 48, 0, 63))[0].tolist() == [0, 63]  # a corner, zero padding


def test_peak_inside_and_outside_box():
    maps = spike(64, 64, 10, 20, n=2)
    boxes = [[5, 15, 15, 25], [40, 40, 60, 60]]
    r = pointing_game_maps(maps, boxes=boxes)
    assert r.tolerance == 4 and r.sigma == pytest.approx(0.02 * 64)
    assert r.saliency.hits.tolist() == [True, False]
    assert r.saliency_exact.hits.tolist() == [True, False]
    assert r.saliency.accuracy == 0.5 and r.n == 2 and r.n_excluded == 0


@pytest.mark.parametrize("d, hit", [(3, True), (4, False), (5, False)])
def test_tolerance_boundary_is_strict_like_torchray(d, hit):
    # the point is (30, 30); the box's nearest pixel is d px to the right: a hit iff d < tol = 4
    box = [[30 + d, 28, 30 + d + 5, 33]]
    hits = point_hits([[30, 30]], np.asarray(_box_mask(box, 64, 64)), 4)
    assert hits.tolist() == [hit]
    r = pointing_game_maps(spike(64, 64, 30, 30), boxes=box, smooth=0)
    assert r.saliency.hits.tolist() == [hit] and not r.saliency_exact.hits[0]


def test_tolerance_is_euclidean():
    truth = _box_mask([[33, 33, 40, 40]], 64, 64)  # nearest pixel (33, 33): distance sqrt(18) = 4.24
    assert point_hits([[30, 30]], truth, 4).tolist() == [False]
    assert point_hits([[30, 30]], truth, 5).tolist() == [True]


def test_zero_tolerance_and_half_open_boxes():
    box = [[10, 10, 20, 20]]  # columns 10..19
    r_in = pointing_game_maps(spike(64, 64, 19, 15), boxes=box, smooth=0)
    r_out = pointing_game_maps(spike(64, 64, 20, 15), boxes=box, smooth=0)
    assert r_in.saliency_exact.hits[0] and r_in.saliency.hits[0]
    assert not r_out.saliency_exact.hits[0] and r_out.saliency.hits[0]  # 1 px away: within tolerance


def test_class_averaged_accuracy_on_imbalanced_set():
    maps = spike(64, 64, 10, 10, n=5)
    inside, outside = [5, 5, 15, 15], [40, 40, 50, 50]
    boxes = [inside, inside, inside, inside, outside]
    r = pointing_game_maps(maps, labels=[0, 0, 0, 0, 1], boxes=boxes)
    assert r.saliency.class_accuracy == {0: 1.0, 1: 0.0}
    assert r.saliency.accuracy == pytest.approx(0.5)  # TorchRay: mean of per-class accuracies
    assert r.saliency.accuracy_overall == pytest.approx(0.8)


def test_centre_baseline():
    maps = spike(64, 64, 0, 0, n=3)
    # the centre is (32, 32); tolerance 4
    boxes = [[30, 30, 35, 35], [0, 0, 30, 30], [0, 0, 30, 33]]
    r = pointing_game_maps(maps, boxes=boxes)
    assert r.centre.hits.tolist() == [True, False, True]  # (29, 29) is 4.24 px away, (29, 32) is 3 px
    assert r.centre_exact.hits.tolist() == [True, False, False]
    assert r.saliency.hits.tolist() == [False, True, True]
    assert r.summary()["centre"]["accuracy"] == pytest.approx(2 / 3)


def test_empty_ground_truth_is_excluded_and_counted():
    maps = spike(32, 32, 5, 5, n=4)
    masks = np.zeros((4, 32, 32), bool)
    masks[0, 4:7, 4:7] = True
    masks[2, 20:25, 20:25] = True  # image 1 has an empty mask: excluded
    r = pointing_game_maps(maps, masks=masks, boxes=[[0, 0, 0, 0]] * 3 + [[0, 0, 5, 5]])
    assert r.n_excluded == 1 and r.n == 3
    assert r.valid.tolist() == [True, False, True, True]
    assert r.saliency.hits.tolist() == [True, False, False, True]  # (4, 4) is within tol = 2 px of (5, 5)
    assert r.tolerance == 2 and not r.saliency_exact.hits[3]
    assert r.saliency.accuracy_overall == pytest.approx(2 / 3)
    assert r.centre.hits[1] == False  # noqa: E712 - never a hit


def test_all_excluded_gives_nan():
    r = pointing_game_maps(spike(8, 8, 1, 1), boxes=[[3, 3, 3, 6]])
    assert r.n == 0 and r.n_excluded == 1 and np.isnan(r.saliency.accuracy)


@pytest.mark.parametrize(
    "box",
    [[5, 5, 4, 10], [5, 5, 10, 4], [-1, 0, 5, 5], [0, 0, 65, 10], [0, 0, 10, 65], [0, 0, 2.5, 3]],
)
def test_bad_boxes_raise(box):
    with pytest.raises(ValueError, match="box"):
        pointing_game_maps(spike(64, 64, 1, 1), boxes=[box])


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        pointing_game_maps(spike(8, 8, 1, 1), boxes=[[0, 0, 1]])
    with pytest.raises(ValueError, match="ground truth"):
        pointing_game_maps(spike(8, 8, 1, 1))
    with pytest.raises(ValueError, match="reduce the channels"):
        pointing_game_maps(np.zeros((1, 3, 8, 8)), boxes=[[0, 0, 1, 1]])


def test_maps_are_resized_to_the_image():
    small = spike(16, 16, 12, 4)  # a 16x16 map of a 64x64 image
    masks = np.zeros((1, 64, 64), bool)
    masks[0, 16:20, 48:52] = True
    r = pointing_game_maps(small, masks=masks, smooth=0.02)
    x, y = r.points[0]
    assert 48 <= x <= 51 and 16 <= y <= 19 and r.saliency_exact.hits[0]


class PixelPicker(nn.Module):
    """Class c's logit is 5 times channel 0 at pixel PIXELS[c]: its gradient map peaks there."""

    PIXELS = ((4, 3), (12, 12))  # (x, y)

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3 * 16 * 16, 2)
        with torch.no_grad():
            w = torch.full((2, 3, 16, 16), 0.01)
            for c, (x, y) in enumerate(self.PIXELS):
                w[c, 0, y, x] = 5.0
            self.fc.weight.copy_(w.view(2, -1))
            self.fc.bias.zero_()

    def forward(self, x):
        return self.fc(torch.flatten(x, 1))


@pytest.mark.parametrize("method", ["gradient", "guided", "deconvnet"])
def test_pointing_game_end_to_end(method):
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    boxes = [[2, 1, 6, 5], [10, 10, 14, 14]]  # around (4, 3) and (12, 12)
    r = pointing_game(PixelPicker(), x, labels=[0, 1], boxes=boxes, method=method)
    assert r.points.tolist() == [[4, 3], [12, 12]]
    assert r.saliency_exact.hits.all() and r.saliency.accuracy == 1.0
    swapped = pointing_game(PixelPicker(), x, labels=[1, 0], boxes=boxes, method=method)
    assert not swapped.saliency.hits.any()


# ----------------------------------------------------------------------------------------------
# mass in box, weak-box IoU


def test_mass_in_box_hand_case():
    m = np.ones((1, 4, 4))
    m[0, 0, 0] = 5.0
    m[0, 3, 3] = -2.0
    # inside the box (0, 0)-(2, 2): 5 + 1 + 1 + 1 = 8; |m| sums to 5 + 14 · 1 + 2 over the 16 cells
    r = mass_in_box(m, boxes=[[0, 0, 2, 2]])
    assert r.values[0] == pytest.approx(8 / (5 + 14 * 1 + 2))
    p = mass_in_box(m, boxes=[[0, 0, 2, 2]], mode="positive")
    assert p.values[0] == pytest.approx(8 / (5 + 14 * 1))
    assert r.mode == "abs" and r.n == 1


def test_mass_in_box_excludes_empty_boxes_and_zero_maps():
    m = np.ones((3, 4, 4))
    m[2] = 0.0
    r = mass_in_box(m, boxes=[[0, 0, 4, 2], [1, 1, 1, 3], [0, 0, 2, 2]])
    assert r.values[0] == pytest.approx(0.5)
    assert np.isnan(r.values[1]) and np.isnan(r.values[2])
    assert r.n == 1 and r.n_excluded == 2 and r.mean == pytest.approx(0.5)
    with pytest.raises(ValueError, match="mode"):
        mass_in_box(m, boxes=[[0, 0, 1, 1]] * 3, mode="signed")


def test_box_iou():
    assert box_iou((0, 0, 2, 2), (1, 1, 3, 3)) == pytest.approx(1 / 7)
    assert box_iou((0, 0, 2, 2), (0, 0, 2, 2)) == 1.0
    assert box_iou(None, (0, 0, 2, 2)) == 0.0


def test_weak_box_iou_uses_the_jobs_boxes():
    from fastsal.jobs.boxes import weak_box

    m = np.zeros((3, 48, 64), np.float32)
    m[0, 12:40, 10:30] = 1.0
    m[1, 5:10, 50:60] = 1.0
    truth = [[10, 12, 30, 40], [10, 12, 30, 40], [0, 0, 0, 5]]
    r = weak_box_iou(m, truth)
    assert r.boxes[0].tolist() == list(weak_box(m[0]))
    assert r.iou[0] > 0.6 and r.iou[1] == 0.0 and np.isnan(r.iou[2])  # map 2 is empty and its box too
    assert r.n == 2 and r.n_excluded == 1 and r.boxes[2].tolist() == [-1] * 4
    exact = weak_box_iou(m[:1], truth[:1], smooth=0.0)
    assert exact.iou[0] == 1.0
    scaled = weak_box_iou(m[:1, ::2, ::2], [[20, 24, 60, 80]], image_size=(96, 128), smooth=0.0)
    assert scaled.iou[0] == 1.0


# ----------------------------------------------------------------------------------------------
# deletion / insertion


def test_auc_of_constant_and_ramp():
    assert auc(np.full(65, 0.3)) == pytest.approx(0.3)
    assert auc(np.linspace(0, 1, 11)) == pytest.approx(0.5)
    assert auc(np.ones((2, 3)), x=[0, 0.5, 1]).tolist() == pytest.approx([1.0, 1.0])


class OnePixel(nn.Module):
    """Logits ``(10 · x[:, 0, 2, 3], 0)``: class 0 wins when that pixel is positive."""

    def forward(self, x):
        l0 = 10.0 * x[:, 0, 2, 3]
        return torch.stack([l0, torch.zeros_like(l0)], dim=1)


def _one_pixel_input():
    x = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(1)) * 0.1
    x[:, 0, 2, 3] = 1.0
    return x


def test_deletion_of_the_salient_pixel_first_drops_the_score():
    x = _one_pixel_input()
    good = torch.zeros(2, 4, 4)
    good[:, 2, 3] = 1.0  # the one pixel the model reads ranks first
    bad = -good  # ... ranks last
    p = float(torch.sigmoid(torch.tensor(10.0)))
    rg = deletion_insertion(OnePixel(), x, good, steps=16, blur_sigma=1.0)
    rb = deletion_insertion(OnePixel(), x, bad, steps=16, blur_sigma=1.0)
    assert rg.classes.tolist() == [0, 0] and rg.x.tolist() == pytest.approx(np.arange(17) / 16)
    assert rg.deletion[:, 0] == pytest.approx([p, p]) and rg.deletion[:, 1:] == pytest.approx(np.full((2, 16), 0.5))
    assert rb.deletion[:, :16] == pytest.approx(np.full((2, 16), p)) and rb.deletion[:, 16] == pytest.approx([0.5, 0.5])
    assert (rg.deletion_auc < rb.deletion_auc - 0.4).all()
    # insertion starts from the blurred image; putting the pixel back first restores the score
    b = blur(x, 1.0)[:, 0, 2, 3].double()
    start = torch.sigmoid(10.0 * b).numpy()
    assert rg.insertion[:, 0] == pytest.approx(start, rel=1e-5)
    assert rg.insertion[:, 1:] == pytest.approx(np.full((2, 16), p), rel=1e-6)
    assert rb.insertion[:, 16] == pytest.approx([p, p]) and rb.insertion[:, 15] == pytest.approx(start, rel=1e-5)
    assert (rg.insertion_auc > rb.insertion_auc).all()
    assert rg.blur_sigma == 1.0 and rg.summary()["n"] == 2


def test_deletion_insertion_is_independent_of_batch_size_and_computes_maps():
    x = _one_pixel_input()
    a = deletion_insertion(OnePixel(), x, steps=8, batch_size=1000)
    b = deletion_insertion(OnePixel(), x, steps=8, batch_size=3)
    np.testing.assert_allclose(a.deletion, b.deletion, rtol=1e-6)
    np.testing.assert_allclose(a.insertion, b.insertion, rtol=1e-6)
    # the gradient map (maps=None) points only at the pixel the model reads: deletion drops at once
    assert a.deletion[:, 1] == pytest.approx([0.5, 0.5])
    assert a.blur_sigma == pytest.approx(0.05 * 4)


def test_deletion_insertion_bad_input():
    x = _one_pixel_input()
    with pytest.raises(ValueError, match="maps must have shape"):
        deletion_insertion(OnePixel(), x, torch.zeros(2, 3, 3))
    with pytest.raises(ValueError, match="steps"):
        deletion_insertion(OnePixel(), x, torch.zeros(2, 4, 4), steps=0)
    with pytest.raises(ValueError, match="modes"):
        deletion_insertion(OnePixel(), x, torch.zeros(2, 4, 4), modes=("random",))


# ----------------------------------------------------------------------------------------------
# cross-check with Quantus where it is correct (unique maximum, non-empty mask)


def test_pointing_hits_match_quantus():
    quantus = pytest.importorskip("quantus")
    rng = np.random.default_rng(0)
    n, h, w = 16, 20, 20
    maps = rng.random((n, h, w)).astype(np.float32)  # continuous: a unique maximum
    masks = np.zeros((n, h, w), bool)
    for i in range(n):
        x0, y0 = rng.integers(0, 12, 2)
        masks[i, y0:y0 + 8, x0:x0 + 8] = True
    for i in range(0, n, 2):  # put the maximum inside the mask for half of them
        ys, xs = np.nonzero(masks[i])
        maps[i, ys[3], xs[3]] = 2.0
    metric = quantus.PointingGame(normalise=False, abs=False, disable_warnings=True)
    theirs = metric(model=None, x_batch=np.zeros((n, 3, h, w), np.float32), y_batch=np.zeros(n, int),
                    a_batch=maps[:, None], s_batch=masks[:, None].astype(np.float32), channel_first=True)
    ours = pointing_game_maps(maps, masks=masks, smooth=0).saliency_exact.hits
    assert np.asarray(theirs, dtype=bool).tolist() == ours.tolist()
    assert 0 < ours.sum() < n


def _box_mask(boxes, h, w):
    out = np.zeros((len(boxes), h, w), bool)
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        out[i, y0:y1, x0:x1] = True
    return out


def test_default_model_smoke():
    # the whole pipeline on the embedded model and 8 synthetic test images (guided: TorchRay-style
    # pointing accuracy 1.0 on the first 64; the centre baseline 0.75)
    from fastsal.default_model import DEFAULT_PREPROCESS, build_default_model, synthetic

    imgs, labels, boxes = synthetic.batch(range(8), split="test")
    x = DEFAULT_PREPROCESS.normalize(torch.from_numpy(imgs))
    model = build_default_model().eval()
    r = pointing_game(model, x, labels, boxes=boxes, method="guided")
    assert r.n == 8 and r.n_excluded == 0 and r.tolerance == 4
    assert r.saliency.accuracy >= 0.75
    c = deletion_insertion(model, x[:4], method="guided", steps=8)
    assert c.deletion.shape == (4, 9) and (c.deletion_auc < c.insertion_auc).all()
