"""``fastsal run`` end to end: odd files, resume, kill -9, torchrun, refusals, load_results."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from fastsal.jobs import runner
from fastsal.jobs.boxes import weak_box
from fastsal.jobs.sources import discover
from fastsal.jobs.store import load_results

pytest.importorskip("PIL")
pytest.importorskip("scipy")
from PIL import Image  # noqa: E402

from job_results import assert_same_results, job_env, kill_after_first_batch, read_records  # noqa: E402




def _fastsal(*args, check=True, timeout=300):
    cmd = [sys.executable, "-m", "fastsal", *args]
    proc = subprocess.run(cmd, env=job_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def _make_folder(root, n_good=12):
    """An ImageFolder tree with the files a real data set has: odd sizes, grayscale, RGBA,
    a corrupt JPEG, an empty PNG, and a text file."""
    rng = np.random.default_rng(0)
    for cls in ("cats", "dogs"):
        os.makedirs(os.path.join(root, cls), exist_ok=True)
    for i in range(n_good):
        cls = ("cats", "dogs")[i % 2]
        h, w = 20 + 3 * i, 30 + 2 * i
        arr = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        if i % 4 == 1:
            Image.fromarray(arr[..., 0], mode="L").save(os.path.join(root, cls, f"gray{i:02d}.png"))
        elif i % 4 == 2:
            rgba = np.concatenate([arr, rng.integers(0, 255, (h, w, 1), dtype=np.uint8)], axis=2)
            Image.fromarray(rgba, mode="RGBA").save(os.path.join(root, cls, f"rgba{i:02d}.png"))
        else:
            Image.fromarray(arr).save(os.path.join(root, cls, f"img{i:02d}.jpg"), quality=90)
    with open(os.path.join(root, "cats", "corrupt.jpg"), "wb") as fh:
        fh.write(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    open(os.path.join(root, "dogs", "empty.png"), "wb").close()
    with open(os.path.join(root, "dogs", "notes.txt"), "w") as fh:
        fh.write("not an image")
    return root


RUN = ["--model", "job_models:tiny", "--size", "32", "--batch-size", "4", "--workers", "0", "--quiet",
       "--loader-probe", "0"]




@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return _make_folder(str(tmp_path_factory.mktemp("images")))


@pytest.fixture(scope="module")
def reference_run(folder, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ref") / "out")
    _fastsal("run", folder, "--out", out, *RUN)
    return out


def test_discover_imagefolder_and_list(folder, tmp_path):
    src = discover(folder)
    assert src.kind == "imagefolder" and src.class_names == ["cats", "dogs"]
    assert len(src.items) == 14 and src.skipped == ["dogs/notes.txt"]
    assert {it.label for it in src.items} == {0, 1}
    listing = tmp_path / "list.csv"
    listing.write_text("path,label\n" + "".join(f"{os.path.join(folder, it.key)},{it.label}\n" for it in src.items[:3]))
    lst = discover(str(listing))
    assert lst.kind == "list" and [it.label for it in lst.items] == [it.label for it in src.items[:3]]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        discover(str(tmp_path / "missing"))


def test_every_good_image_has_a_result_and_bad_files_are_errors(folder, reference_run):
    records, errors = read_records(reference_run)
    assert set(errors) == {"cats/corrupt.jpg", "dogs/empty.png"}
    assert errors["dogs/empty.png"] == "empty file"
    assert len(records) == 12
    for key, rec in records.items():
        w, h = Image.open(os.path.join(folder, key)).size
        assert rec.size == (w, h)
        assert rec.map.shape == (32, 32) and rec.map.dtype == np.float16
        assert rec.box is not None, key
        x0, y0, x1, y1 = rec.box
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h, (key, rec.box, (w, h))
        assert 0 <= rec.label < 5 and 0.0 < rec.score <= 1.0 and rec.target == rec.label
        assert rec.true_label == (0 if key.startswith("cats") else 1)
    with open(os.path.join(reference_run, "errors.tsv")) as fh:
        lines = fh.read().splitlines()
    assert [line.split("\t")[0] for line in lines] == ["cats/corrupt.jpg", "dogs/empty.png"]
    assert "unreadable image" in lines[0] or "not an image" in lines[0]


def test_rerun_recomputes_nothing(folder, reference_run):
    shards = os.path.join(reference_run, "shards")
    before = {n: os.stat(os.path.join(shards, n)).st_mtime_ns for n in os.listdir(shards)}
    proc = _fastsal("run", folder, "--out", reference_run, *RUN)
    after = {n: os.stat(os.path.join(shards, n)).st_mtime_ns for n in os.listdir(shards)}
    assert before == after
    assert "this run: 0 images" in proc.stdout


def test_other_configuration_is_refused_unless_overwrite(folder, tmp_path, reference_run):
    proc = _fastsal("run", folder, "--out", reference_run, *RUN, "--method", "gradient", check=False)
    assert proc.returncode == 2 and "different configuration" in proc.stderr and "method" in proc.stderr
    out = str(tmp_path / "copy")
    _fastsal("run", folder, "--out", out, *RUN)
    _fastsal("run", folder, "--out", out, *RUN, "--method", "gradient", "--overwrite")
    assert load_results(out).manifest["config"]["method"] == "gradient"


def test_kill_9_then_rerun_gives_identical_results(folder, tmp_path, reference_run):
    out = str(tmp_path / "killed")
    slow = [a if a != "job_models:tiny" else "job_models:slow_tiny" for a in RUN]
    # the slow model is the same network, so its results must equal the reference run's
    cmd = [sys.executable, "-m", "fastsal", "run", folder, "--out", out, *slow]
    done = kill_after_first_batch(cmd, out)
    assert 1 <= len(done) < 4, f"the job should have been killed mid-way, had {done}"
    _fastsal("run", folder, "--out", out, *slow)
    killed, errors = read_records(out)
    ref, ref_errors = read_records(reference_run)
    assert_same_results(killed, ref)
    assert errors == ref_errors
    assert not [n for n in os.listdir(os.path.join(out, "shards")) if n.startswith(".tmp-")]


def test_torchrun_two_cpu_ranks_equal_a_single_process(folder, tmp_path, reference_run):
    out = str(tmp_path / "ranks")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "fastsal", "run", folder, "--out", out, *RUN, "--device", "cpu"]
    proc = subprocess.run(cmd, env=job_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "on 2 process(es)" in proc.stdout
    ranks, errors = read_records(out)
    ref, ref_errors = read_records(reference_run)
    assert_same_results(ranks, ref)
    assert errors == ref_errors


def test_bad_source_and_target_errors(tmp_path, folder):
    proc = _fastsal("run", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), *RUN, check=False)
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(flat / "a.png")
    proc = _fastsal("run", str(flat), "--out", str(tmp_path / "o2"), *RUN, "--target", "label", check=False)
    assert proc.returncode == 2 and "needs a label" in proc.stderr
    proc = _fastsal("run", str(flat), "--out", str(tmp_path / "o3"), *RUN, "--model", "no_such_model", check=False)
    assert proc.returncode == 2 and "unknown model" in proc.stderr


def test_weak_box():
    m = np.zeros((10, 20), np.float32)
    m[2:5, 3:9] = 1.0  # the larger blob
    m[7, 15] = 0.9  # a smaller one
    assert weak_box(m, 0.5, smooth=0) == (3, 2, 9, 5)
    assert weak_box(m, 0.5, image_size=(40, 20), smooth=0) == (6, 4, 18, 10)
    assert weak_box(np.zeros((4, 4)), 0.5) is None
    # smoothing joins a fragmented object (two halves one pixel apart) into one box
    frag = np.zeros((32, 32), np.float32)
    frag[10:20, 5:10] = 1.0
    frag[10:20, 11:16] = 1.0
    assert weak_box(frag, 0.5, smooth=0) in ((5, 10, 10, 20), (11, 10, 16, 20))
    x0, y0, x1, y1 = weak_box(frag, 0.2)
    assert x0 <= 5 and x1 >= 16 and y0 <= 10 and y1 >= 20
    with pytest.raises(ValueError):
        weak_box(m, 0.0)


def test_demo_runs_offline(tmp_path):
    import json

    out = tmp_path / "demo"
    _fastsal("demo", "--out", str(out), "--images", "6")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == 6
    # the embedded model is right on these easy synthetic images; the maps peak on the object
    assert summary["accuracy"] >= 5 / 6 and summary["pointing_game"] >= 5 / 6
    assert summary["mean_box_iou"] > 0.4
    assert (out / "methods.png").stat().st_size > 1000
    assert len(list(out.glob("overlay_*.png"))) == 6
    for path in out.glob("overlay_*.png"):
        with Image.open(path) as im:
            assert min(im.size) >= 256  # drawn for people, not at the 64 px of the image
    with Image.open(out / "methods.png") as im:
        assert im.size[0] > im.size[1] / 3  # four columns: input and the three methods
        assert im.size[0] >= 4 * 256  # cells enlarged to 256 px


def test_topk_grid(folder, tmp_path):
    out = tmp_path / "top.png"
    proc = _fastsal("topk", folder, "--layer", "features.3", "--channel", "2", "--k", "3", "--out", str(out),
                    "--model", "job_models:tiny", "--size", "32")
    lines = [line for line in proc.stdout.splitlines() if line.startswith(" ")]
    values = [float(line.split()[0]) for line in lines]
    assert len(values) == 3 and values == sorted(values, reverse=True)
    with Image.open(out) as im:
        assert im.size[1] > im.size[0]  # three rows of (image, projection)
        assert im.size[0] >= 2 * 256 and im.size[1] >= 3 * 256  # cells enlarged to >= 256 px
    bad = _fastsal("topk", folder, "--layer", "nope", "--channel", "0", "--out", str(out),
                   "--model", "job_models:tiny", "--size", "32", check=False)
    assert bad.returncode == 2 and "not a module of the model" in bad.stderr and "Traceback" not in bad.stderr
    bad = _fastsal("topk", folder, "--layer", "features.3", "--channel", "99", "--out", str(out),
                   "--model", "job_models:tiny", "--size", "32", check=False)
    assert bad.returncode == 2 and "out of range" in bad.stderr


class _Stop(Exception):
    """Raised by the stand-in init_process_group: the test needs nothing after it."""


@pytest.fixture
def torchrun_on_4_gpus(monkeypatch):
    """Rank 2 of 4 under torchrun on a node with 4 (pretend) GPUs; records set_device and init."""
    calls = []
    for name, value in (("WORLD_SIZE", "4"), ("RANK", "2"), ("LOCAL_RANK", "2"), ("LOCAL_WORLD_SIZE", "4")):
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: calls.append(("set_device", index)))
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)

    def init_process_group(backend, **kwargs):
        calls.append(("init", backend, kwargs.get("device_id")))
        raise _Stop

    monkeypatch.setattr(torch.distributed, "init_process_group", init_process_group)
    return calls


@pytest.mark.parametrize("device, index", [("cuda:1", 1), ("cuda:0", 0), ("cuda", 2), ("auto", 2)])
def test_torchrun_binds_nccl_to_the_device_it_runs_on(torchrun_on_4_gpus, tmp_path, device, index):
    # an explicit cuda:N wins over LOCAL_RANK (2), and NCCL is bound to that same device
    with pytest.raises(_Stop):
        runner.run(runner.RunOptions(src=str(tmp_path), out=str(tmp_path / "out"), device=device))
    assert torchrun_on_4_gpus == [("set_device", index), ("init", "nccl", torch.device("cuda", index))]


def test_torchrun_on_cpu_uses_gloo_and_a_missing_gpu_is_refused(torchrun_on_4_gpus, tmp_path):
    opts = dict(src=str(tmp_path), out=str(tmp_path / "out"))
    with pytest.raises(_Stop):
        runner.run(runner.RunOptions(**opts, device="cpu"))
    assert torchrun_on_4_gpus == [("init", "gloo", None)]
    torchrun_on_4_gpus.clear()
    for device, message in (("cuda:4", r"cuda:4 does not exist \(4 CUDA device"), ("cuda:x", "cuda or cuda:N"),
                            ("tpu", "cuda or cuda:N")):
        with pytest.raises(runner.JobError, match=message):
            runner.run(runner.RunOptions(**opts, device=device))
    assert torchrun_on_4_gpus == []  # refused before NCCL was touched
