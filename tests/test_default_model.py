"""The embedded default model: its synthetic data set, its shipped weights, its reproducible training."""

import csv
import hashlib
import io
import os
from importlib import resources

import numpy as np
import pytest
import torch

from fastsal.default_model import synthetic
from fastsal.default_model import train as T
from fastsal.default_model.model import (
    DEFAULT_PREPROCESS,
    WEIGHTS_FILE,
    WEIGHTS_SHA256,
    DefaultNet,
    build_default_model,
    load_state_dict_bytes,
)

# What the shipped weights reach on the first 64 held-out samples, less a margin; the full
# figures (1,000 held-out samples) are in fastsal/default_model/README.md.
MIN_ACCURACY_64 = 0.90  # 99.8 % on 1,000
MIN_GUIDED_POINTING_64 = 0.90  # 100 % on 1,000 (4 px tolerance)


def test_class_names():
    assert len(synthetic.CLASS_NAMES) == synthetic.NUM_CLASSES == len(set(synthetic.CLASS_NAMES))
    assert DEFAULT_PREPROCESS.class_names == synthetic.CLASS_NAMES
    assert DEFAULT_PREPROCESS.size == synthetic.SIZE


def test_generator_is_deterministic_whatever_the_order():
    forward = [synthetic.sample(i, "test") for i in range(6)]
    backward = [synthetic.sample(i, "test") for i in reversed(range(6))][::-1]
    for (a, la, ba), (b, lb, bb) in zip(forward, backward):
        assert a.dtype == np.uint8 and a.shape == (synthetic.SIZE, synthetic.SIZE, 3)
        assert np.array_equal(a, b) and la == lb and ba == bb
    # splits are different streams
    assert not np.array_equal(synthetic.sample(0, "train")[0], synthetic.sample(0, "test")[0])


def test_every_class_occurs():
    _, labels, _ = synthetic.batch(range(80), "val")
    assert set(labels.tolist()) == set(range(synthetic.NUM_CLASSES))


def test_boxes_are_tight_around_the_object():
    for i in range(40):
        s = synthetic.render(i, "val")
        x0, y0, x1, y1 = s.box
        assert 0 <= x0 < x1 <= synthetic.SIZE and 0 <= y0 < y1 <= synthetic.SIZE
        assert x1 - x0 >= synthetic.MIN_SIZE * 0.5 and y1 - y0 >= synthetic.MIN_SIZE * 0.5
        inside = np.zeros_like(s.mask, dtype=bool)
        inside[y0:y1, x0:x1] = True
        covered = s.mask >= 0.5
        assert not (covered & ~inside).any(), "object pixels outside the box"
        # tight: every edge row/column of the box holds object pixels
        assert covered[y0].any() and covered[y1 - 1].any()
        assert covered[:, x0].any() and covered[:, x1 - 1].any()
        # anti-aliased edge pixels only just outside the box
        assert s.mask[~inside].max(initial=0) < 0.5


def test_write_dataset(tmp_path):
    csv_path = synthetic.write_dataset(tmp_path, 5, split="demo")
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 5
    from PIL import Image

    for i, row in enumerate(rows):
        image, label, box = synthetic.sample(i, "demo")
        assert row["path"].split("/")[0] == row["class_name"] == synthetic.CLASS_NAMES[label]
        assert int(row["label"]) == label
        assert tuple(int(row[k]) for k in ("x0", "y0", "x1", "y1")) == box
        assert np.array_equal(np.asarray(Image.open(os.path.join(tmp_path, row["path"]))), image)


def test_shipped_weights_file():
    data = resources.files("fastsal.default_model").joinpath(WEIGHTS_FILE).read_bytes()
    assert len(data) <= 3 * 1024 * 1024
    assert hashlib.sha256(data).hexdigest() == WEIGHTS_SHA256
    sd = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    assert T.state_dict_sha256(sd) == T.SHIPPED_STATE_DICT_SHA256


def test_shipped_weights_accuracy_and_pointing():
    torch.manual_seed(0)
    model = build_default_model()
    assert not model.training
    images, labels, boxes = synthetic.batch(range(64), "test")
    x = DEFAULT_PREPROCESS.normalize(torch.from_numpy(images))
    y = torch.from_numpy(labels)
    with torch.no_grad():
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    assert accuracy >= MIN_ACCURACY_64
    maps = T.saliency(model, x, y, "guided")
    assert maps.shape == (64, synthetic.SIZE, synthetic.SIZE)
    pointing = T.pointing_hits(maps, torch.from_numpy(boxes)).float().mean().item()
    assert pointing >= MIN_GUIDED_POINTING_64


def test_guided_rule_differs_from_gradient_and_leaves_model_alone():
    model = build_default_model()
    images, labels, _ = synthetic.batch(range(2), "test")
    x = DEFAULT_PREPROCESS.normalize(torch.from_numpy(images))
    y = torch.from_numpy(labels)
    g = T.saliency(model, x, y, "gradient")
    gb = T.saliency(model, x, y, "guided")
    assert not torch.equal(g, gb)
    assert torch.equal(T.saliency(model, x, y, "gradient"), g)  # the model was not rewritten


def test_short_training_is_bit_for_bit_reproducible():
    threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    a = T.train(steps=T.SHORT_STEPS, batch_size=T.SHORT_BATCH_SIZE)
    b = T.train(steps=T.SHORT_STEPS, batch_size=T.SHORT_BATCH_SIZE)
    assert list(a) == list(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert T.state_dict_sha256(a) == T.state_dict_sha256(b)
    assert T.state_dict_bytes(a) == T.state_dict_bytes(b)
    # the training context put the global settings back
    assert (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()) == (threads, det)

    env = T.environment()
    if (env["torch"], env["cpu_capability"]) != (T.RECORDED_ON["torch"], T.RECORDED_ON["cpu_capability"]):
        pytest.skip(
            f"recorded hash is for torch {T.RECORDED_ON['torch']} / {T.RECORDED_ON['cpu_capability']}; "
            f"this is torch {env['torch']} / {env['cpu_capability']} (other float kernels may be chosen)"
        )
    assert T.state_dict_sha256(a) == T.SHORT_RUN_SHA256


def test_permuted_labels_keep_the_class_counts_and_break_the_relation():
    images, true = T.training_set(64)
    images_p, permuted = T.training_set(64, permute_labels=True)
    assert np.array_equal(images, images_p)
    assert sorted(true.tolist()) == sorted(permuted.tolist())
    assert (true != permuted).mean() > 0.5  # 8 classes: ~7/8 differ
    assert np.array_equal(permuted, T.training_set(64, permute_labels=True)[1])  # seeded


def test_short_permuted_label_training_is_reproducible_and_differs_from_the_true_one():
    kw = dict(steps=T.SHORT_STEPS, batch_size=T.SHORT_BATCH_SIZE, unique=32, augment=False)
    a = T.train(permute_labels=True, **kw)
    b = T.train(permute_labels=True, **kw)
    c = T.train(permute_labels=False, **kw)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_shipped_permuted_weights_memorized_their_labels():
    from fastsal.default_model.model import PERMUTED_WEIGHTS_FILE

    data = resources.files("fastsal.default_model").joinpath(PERMUTED_WEIGHTS_FILE).read_bytes()
    sd = load_state_dict_bytes(data)
    # the recipe's training set with its shuffled labels is fitted far above chance (1/8) ...
    assert T.training_accuracy(sd, T.PERMUTED_UNIQUE, permute_labels=True) > 0.5
    # ... and held-out accuracy on the true labels stays near chance
    images, labels, _ = synthetic.batch(range(200), split="test")
    model = DefaultNet()
    model.load_state_dict(sd)
    with torch.no_grad():
        acc = (model.eval()(T._inputs(images)).argmax(1).numpy() == labels).mean()
    assert acc < 0.3
