"""fastsal.evaluate against Quantus 0.6's recorded answers (tests/data/quantus_reference.json).

Quantus is too heavy for CI, so benchmarks/quantus_reference.py ran it once and recorded its
per-image answers; these tests recompute fastsal's side on every run. (With Quantus installed,
tests/test_evaluate_randomization.py and tests/test_evaluate_localization.py also compare live.)
"""

from __future__ import annotations

import importlib.util
import json
import os

import numpy as np
import pytest
import torch

pytest.importorskip("scipy")

from fastsal.evaluate import randomization as R  # noqa: E402
from fastsal.evaluate.localization import pointing_game_maps  # noqa: E402

HERE = os.path.dirname(__file__)
RECORD = os.path.join(HERE, "data", "quantus_reference.json")


def _script():
    """benchmarks/quantus_reference.py: the inputs are built by the same code that recorded the answers."""
    path = os.path.join(HERE, "..", "benchmarks", "quantus_reference.py")
    spec = importlib.util.spec_from_file_location("quantus_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def record():
    with open(RECORD) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def script():
    return _script()


@pytest.fixture(scope="module")
def inputs(script):
    return script.mprt_inputs()


def test_spearman_mprt_per_image_equals_recorded_quantus(record, script, inputs):
    rec = record["mprt"]
    model, x, labels, _ = inputs
    n = rec["n"]
    assert n >= 32
    ours = R.mprt(model, x[:n], methods=script.METHODS, convention="quantus", target=labels[:n], seed=rec["seed"],
                  similarities=("rank_abs",), batch_size=rec["batch_size"])
    for method in script.METHODS:
        theirs = rec["scores"][method]
        assert np.allclose(theirs["original"], 1.0)
        # Quantus lists the layers in the same order (output first); its first entry is the unrandomized model
        assert tuple(k for k in theirs if k != "original") == ours.steps
        for step in ours.steps:
            got = ours.score(method, step, "rank_abs")
            want = np.asarray(theirs[step], dtype=np.float64)
            assert got.shape == (n,)
            assert np.allclose(got, want, atol=1e-6, rtol=0), (method, step, float(np.abs(got - want).max()))
    # not vacuous: the scores fall well below 1 by the last layer, and the methods differ
    last = {m: float(np.mean(rec["scores"][m][ours.steps[-1]])) for m in script.METHODS}
    assert max(last.values()) < 0.6
    assert ours.summary()["guided"]["rank_abs"]["mean"][0] > ours.summary()["gradient"]["rank_abs"]["mean"][0]


def test_pointing_hits_equal_recorded_quantus_where_it_is_right(record, script, inputs):
    rec = record["pointing"]
    model, x, labels, boxes = inputs
    maps = script.guided_maps(model, x, labels)
    masks = script.box_masks(boxes, *maps.shape[1:])
    ours = pointing_game_maps(maps, masks=masks, smooth=0, tolerance=0)
    assert ours.n_excluded == 0
    assert ours.saliency_exact.hits.tolist() == rec["model_guided"]

    rmaps, rmasks = script.random_pointing_case()
    r = pointing_game_maps(rmaps, masks=rmasks, smooth=0, tolerance=0)
    assert r.saliency_exact.hits.tolist() == rec["random_maps"]
    assert 0 < sum(rec["random_maps"]) < len(rec["random_maps"])


def test_empty_mask_excluded_where_quantus_scores_a_hit(record):
    assert record["pointing"]["empty_mask_scored_as_hit"] is True  # Quantus 0.6's bug, as recorded
    maps = np.random.default_rng(1).random((2, 8, 8)).astype(np.float32)
    masks = np.zeros((2, 8, 8), bool)
    masks[1, :4, :4] = True
    r = pointing_game_maps(maps, masks=masks, smooth=0, tolerance=0)
    assert r.n_excluded == 1 and r.n == 1


def test_recorded_inputs_are_the_ones_rebuilt(script, inputs):
    # the synthetic images are a pure function of their index; the record's guided maps would not
    # match otherwise, but say it directly
    _, x, labels, boxes = inputs
    assert x.shape == (script.N_POINTING, 3, 64, 64) and len(labels) == len(boxes) == script.N_POINTING
    assert torch.isfinite(x).all()
