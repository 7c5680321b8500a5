"""``fastsal run`` over tar shards (WebDataset layout): listing, labels from .cls, a corrupt
member, a truncated shard, equality with the same images as loose files, loader workers,
resume after kill -9, and two torchrun ranks."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest

from fastsal.jobs import shards
from fastsal.jobs.runner import JobError, RunOptions, run
from fastsal.jobs.sources import discover, plan_batches
from fastsal.jobs.store import load_results

pytest.importorskip("PIL")
pytest.importorskip("scipy")
from PIL import Image  # noqa: E402

from job_results import assert_same_results, job_env, kill_after_first_batch, read_records  # noqa: E402

TESTS = os.path.dirname(__file__)
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)  # job_models, for in-process runs



def _encode(arr, fmt):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


def _make_shards(root):
    """Three shards of 5, 5 and 4 samples; shard 1 has a corrupt JPEG member and a sample
    with no image; shard 2 is cut short inside its last sample's image. Also writes each
    good image as a loose file under root/loose/<shard>/<key>.<ext>, the same bytes."""
    rng = np.random.default_rng(0)
    os.makedirs(os.path.join(root, "tars"))
    truth = {}  # result key -> (label, bytes, ext)
    for s, n in enumerate((5, 5, 4)):
        name = f"shard-{s:06d}.tar"
        path = os.path.join(root, "tars", name)
        with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
            for i in range(n):
                key = f"sub/s{s}_{i:02d}"
                h, w = 20 + 3 * i, 26 + 2 * s
                arr = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
                ext = ("jpg", "png", "webp")[i % 3]
                data = _encode(arr, {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[ext])
                if s == 1 and i == 2:
                    data = b"\xff\xd8\xff\xe0 not really a jpeg"
                    ext = "jpg"
                label = (s + i) % 5
                _add(tar, f"{key}.{ext}", data)
                _add(tar, f"{key}.cls", str(label).encode())
                _add(tar, f"{key}.json", json.dumps({"i": i}).encode())
                truth[f"{name}/{key}"] = (label, data, ext)
            if s == 1:
                _add(tar, "sub/no_image.json", b"{}")
        if s == 2:
            # cut the last sample's image member in the middle of its data
            with tarfile.open(path) as tar:
                member = tar.getmember("sub/s2_03.jpg")
            with open(path, "r+b") as fh:
                fh.truncate(member.offset_data + member.size // 2)
            for k in [k for k in truth if k.startswith(name + "/sub/s2_03")]:
                del truth[k]
    for key, (_, data, ext) in truth.items():
        file = os.path.join(root, "loose", f"{key}.{ext}")
        os.makedirs(os.path.dirname(file), exist_ok=True)
        with open(file, "wb") as fh:
            fh.write(data)
    return os.path.join(root, "tars"), truth


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return _make_shards(str(tmp_path_factory.mktemp("shards")))


OPTS = dict(model="job_models:tiny", size=32, batch_size=2, workers=0, device="cpu", loader_probe=0, progress=False)
RUN = ["--model", "job_models:tiny", "--size", "32", "--batch-size", "2", "--workers", "0", "--quiet",
       "--loader-probe", "0"]




@pytest.fixture(scope="module")
def tar_run(data, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("tar") / "out")
    run(RunOptions(src=data[0], out=out, **OPTS))
    return out


@pytest.fixture(scope="module")
def reference_run(data, tmp_path_factory):
    """A separate process with one thread, as torchrun's ranks run."""
    out = str(tmp_path_factory.mktemp("ref") / "out")
    proc = subprocess.run([sys.executable, "-m", "fastsal", "run", data[0], "--out", out, *RUN], env=job_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_brace_patterns():
    assert shards.expand_braces("d/s-{008..011}.tar") == ["d/s-008.tar", "d/s-009.tar", "d/s-010.tar", "d/s-011.tar"]
    assert shards.expand_braces("{a,b}-{1..2}.tar") == ["a-1.tar", "a-2.tar", "b-1.tar", "b-2.tar"]
    with pytest.raises(ValueError, match="neither a range"):
        shards.expand_braces("s-{x}.tar")
    assert shards.split_name("dir/n01.seg.PNG") == ("dir/n01", "seg.png")
    assert shards.split_name("./n01.jpg") == ("n01", "jpg")
    assert shards.split_key("train/shard-1.tar/sub/k.1") == ("train/shard-1.tar", "sub/k.1")


def test_discover_lists_samples_labels_and_damage(data):
    src, truth = data
    source = discover(src)
    assert source.kind == "tar"
    listed = {it.key: it.label for it in source.items}
    # the corrupt member is listed (it fails when decoded); the cut sample is not there at all
    assert listed == {k: lab for k, (lab, _, _) in truth.items()}
    assert source.skipped == ["shard-000001.tar/sub/no_image (no jpg/jpeg/png/webp member)"]
    assert list(source.problems) == ["shard-000002.tar"]
    assert "truncated" in source.problems["shard-000002.tar"] and "s2_02" in source.problems["shard-000002.tar"]
    # a brace pattern and a single shard name the same samples
    pattern = discover(os.path.join(src, "shard-{000000..000002}.tar"))
    assert [it.key for it in pattern.items] == [it.key for it in source.items]
    one = discover(os.path.join(src, "shard-000001.tar"))
    assert [it.key for it in one.items] == [it.key for it in source.items if it.key.startswith("shard-000001")]
    missing = discover(os.path.join(src, "shard-{000001..000003}.tar"))
    assert missing.problems["shard-000003.tar"] == "shard not found"
    with pytest.raises(FileNotFoundError, match="none exists"):
        discover(os.path.join(src, "nope-{0..3}.tar"))


def test_batches_stay_inside_a_shard():
    keys = [f"a.tar/{i}" for i in range(5)] + [f"b.tar/{i}" for i in range(3)]
    plan = plan_batches("tar", keys, 2)
    assert [b.items for b in plan] == [[0, 1], [2, 3], [4], [5, 6], [7]]
    assert [b.group for b in plan] == [0, 0, 0, 1, 1] and [b.index for b in plan] == list(range(5))
    folder = plan_batches("folder", keys, 3)
    assert [b.items for b in folder] == [[0, 1, 2], [3, 4, 5], [6, 7]] and [b.group for b in folder] == [0, 1, 2]


def test_tar_results_equal_loose_files_and_damage_is_recorded(data, tar_run, tmp_path):
    src, truth = data
    records, errors = read_records(tar_run)
    corrupt = "shard-000001.tar/sub/s1_02"
    assert set(records) == set(truth) - {corrupt}
    assert set(errors) == {corrupt, "shard-000002.tar"}
    assert "not an image" in errors[corrupt] or "unreadable" in errors[corrupt]
    assert "truncated" in errors["shard-000002.tar"]
    with open(os.path.join(tar_run, "errors.tsv")) as fh:
        assert [line.split("\t")[0] for line in fh.read().splitlines()] == sorted(errors)
    for key, rec in records.items():
        assert rec.true_label == truth[key][0]  # from the .cls member
        with Image.open(io.BytesIO(truth[key][1])) as im:
            assert rec.size == im.size
    # the same bytes as loose files give the same maps, boxes and classes
    loose = str(tmp_path / "loose")
    run(RunOptions(src=os.path.join(os.path.dirname(src), "loose"), out=loose, **OPTS))
    lrec, lerr = read_records(loose)
    ext = {k: e for k, (_, _, e) in truth.items()}
    assert_same_results(records, {k: lrec[f"{k}.{ext[k]}"] for k in records})
    assert set(lerr) == {f"{corrupt}.jpg"}


def test_target_label_from_cls_and_workers_split_by_shard(data, tar_run, tmp_path):
    src, truth = data
    out = str(tmp_path / "labels")
    run(RunOptions(src=src, out=out, target="label", **{**OPTS, "workers": 2}))
    records, _ = read_records(out)
    assert all(rec.target == truth[k][0] for k, rec in records.items())
    # two loader workers (one shard each at a time) compute what one process computed
    out2 = str(tmp_path / "workers")
    run(RunOptions(src=src, out=out2, **{**OPTS, "workers": 2}))
    assert_same_results(read_records(out2)[0], read_records(tar_run)[0])


def test_target_label_needs_a_cls_for_every_sample(tmp_path):
    path = tmp_path / "one.tar"
    with tarfile.open(path, "w") as tar:
        _add(tar, "a.png", _encode(np.zeros((8, 8, 3), np.uint8), "PNG"))
    with pytest.raises(JobError, match=r"\.cls member per sample \(no label: one\.tar/a"):
        run(RunOptions(src=str(path), out=str(tmp_path / "o"), target="label", **OPTS))


def test_shard_damaged_after_listing_costs_the_rest_of_that_shard(data, tmp_path):
    """A shard cut short between listing and reading: the samples it no longer has are errors."""
    src, truth = data
    copy = tmp_path / "copy.tar"
    with open(os.path.join(src, "shard-000000.tar"), "rb") as fh:
        copy.write_bytes(fh.read())
    with tarfile.open(copy) as tar:
        cut = tar.getmember("sub/s0_03.jpg")
    got = list(shards.read_samples(str(copy), ["sub/s0_01", "sub/s0_03", "sub/s0_04"]))
    assert [k for k, _, e in got] == ["sub/s0_01", "sub/s0_03", "sub/s0_04"] and all(e is None for _, _, e in got)
    with open(copy, "r+b") as fh:
        fh.truncate(cut.offset_data + 10)
    got = dict((k, e) for k, _, e in shards.read_samples(str(copy), ["sub/s0_01", "sub/s0_03", "sub/s0_04"]))
    assert got["sub/s0_01"] is None
    assert "truncated" in got["sub/s0_03"] or "unreadable" in got["sub/s0_03"]
    assert got["sub/s0_04"] is not None


def test_kill_9_over_shards_then_rerun_gives_identical_results(data, tmp_path, reference_run):
    out = str(tmp_path / "killed")
    slow = [a if a != "job_models:tiny" else "job_models:slow_tiny" for a in RUN]
    cmd = [sys.executable, "-m", "fastsal", "run", data[0], "--out", out, *slow]
    done = kill_after_first_batch(cmd, out)
    assert 1 <= len(done) < 8, f"the job should have been killed mid-way, had {done}"
    assert not os.path.exists(os.path.join(out, "items.parquet"))
    proc = subprocess.run(cmd, env=job_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    killed, errors = read_records(out)
    ref, ref_errors = read_records(reference_run)
    assert_same_results(killed, ref)
    assert errors == ref_errors
    assert not [n for n in os.listdir(os.path.join(out, "shards")) if n.startswith(".tmp-")]


def test_torchrun_two_ranks_over_shards_equal_one(data, tmp_path, reference_run):
    out = str(tmp_path / "ranks")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "fastsal", "run", data[0], "--out", out, *RUN, "--device", "cpu"]
    proc = subprocess.run(cmd, env=job_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "on 2 process(es)" in proc.stdout
    ranks, errors = read_records(out)
    ref, ref_errors = read_records(reference_run)
    assert_same_results(ranks, ref)
    assert errors == ref_errors


def test_a_resumed_job_does_not_list_unchanged_shards_again(data, tmp_path, monkeypatch):
    src = str(tmp_path / "tars")
    os.makedirs(src)
    for name in ("shard-000000.tar", "shard-000001.tar"):
        with open(os.path.join(data[0], name), "rb") as fh, open(os.path.join(src, name), "wb") as out:
            out.write(fh.read())
    out = str(tmp_path / "out")
    first = run(RunOptions(src=src, out=out, **OPTS))
    listed = []
    real = shards.index_shard
    monkeypatch.setattr(shards, "index_shard", lambda path: listed.append(path) or real(path))
    again = run(RunOptions(src=src, out=out, **OPTS))
    assert listed == [] and again["this_run"]["images"] == 0 and again["this_run"]["resumed"]
    assert again["skipped_non_image_files"] == first["skipped_non_image_files"] == 1
    assert list(load_results(out).errors) == ["shard-000001.tar/sub/s1_02"]
    # a shard that changed (here: only its time stamp) is listed again
    os.utime(os.path.join(src, "shard-000001.tar"), ns=(1, 1))
    run(RunOptions(src=src, out=out, **OPTS))
    assert len(listed) == 2


def test_a_label_the_model_does_not_have_is_a_clear_error(tmp_path):
    path = tmp_path / "one.tar"
    with tarfile.open(path, "w") as tar:
        _add(tar, "a.png", _encode(np.zeros((8, 8, 3), np.uint8), "PNG"))
        _add(tar, "a.cls", b"7")  # job_models:tiny has 5 classes
    with pytest.raises(JobError, match=r"out of range.*labels of SRC \(\.cls members"):
        run(RunOptions(src=str(path), out=str(tmp_path / "o"), target="label", **OPTS))
