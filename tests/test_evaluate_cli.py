"""``fastsal eval``: a small run on the embedded model, a CSV source with boxes, and the clear errors."""

import csv
import json
import os

import pytest

pytest.importorskip("skimage")
pytest.importorskip("PIL")
pytest.importorskip("tqdm")

from PIL import Image  # noqa: E402

from fastsal.cli import main  # noqa: E402
from fastsal.evaluate.command import CSV_COLUMNS  # noqa: E402

N_LAYERS = 13  # the embedded model: 6 conv + 6 BN + 1 linear


def _rows(out):
    with open(os.path.join(out, "results.csv"), newline="") as fh:
        reader = csv.DictReader(fh)
        return reader.fieldnames, list(reader)


def _pairs(rows):
    return {(r["check"], r["method"]) for r in rows}


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("eval") / "out")
    rc = main(["eval", "--out", out, "--n", "8", "--methods", "gradient", "--steps", "4", "--batch-size", "8",
               "--quiet"])
    return rc, out


def test_small_run_writes_results_csv_json(small_run, capsys):
    rc, out = small_run
    assert rc == 0
    header, rows = _rows(out)
    assert tuple(header) == CSV_COLUMNS
    pairs = _pairs(rows)
    for check in ("mprt-cascading", "random-logit", "pointing", "deletion", "insertion", "mass-in-box", "box-iou"):
        assert (check, "gradient") in pairs, check
    assert ("pointing", "centre") in pairs
    mprt = [r for r in rows if r["check"] == "mprt-cascading"]
    assert {r["metric"] for r in mprt} == {"rank_abs", "rank_noabs", "ssim", "hog"}
    assert len({r["step"] for r in mprt}) == N_LAYERS
    assert mprt[0]["step"] == "classifier"  # output layer first
    assert all(r["n"] == "8" for r in mprt)
    aucs = [r for r in rows if r["metric"] == "auc"]
    assert {r["check"] for r in aucs} == {"deletion", "insertion"}
    assert all(0.0 <= float(r["mean"]) <= 1.0 for r in aucs)
    pointing = {r["metric"]: float(r["mean"]) for r in rows if r["check"] == "pointing" and r["method"] == "gradient"}
    assert {"accuracy", "accuracy_exact"} <= set(pointing)

    with open(os.path.join(out, "results.json")) as fh:
        res = json.load(fh)
    proto = res["protocol"]
    assert proto["n"] == 8 and proto["seed"] == 0 and proto["convention"] == "adebayo"
    assert proto["pointing"]["tolerance_px"] == 4 and proto["pointing"]["sigma_px"] == pytest.approx(1.28)
    assert "default" in res["model"] and res["data"]["labels"] == "true"
    assert len(res["rows"]) == len(rows)
    assert len(res["checks"]["mprt-cascading"]["steps"]) == N_LAYERS


def test_small_run_draws_the_pictures(small_run):
    _, out = small_run
    with Image.open(os.path.join(out, "mprt_grid.png")) as im:
        w, h = im.size
        # one row (gradient) of 64 px cells at scale 2; columns: input, original and 13 layers
        assert w > 15 * 128 and 128 < h < 2 * 128 + 60
    for name in ("mprt_curves.png", "deletion_insertion.png"):
        with Image.open(os.path.join(out, name)) as im:
            im.load()
            assert im.size[0] >= 800 and im.size[1] >= 300
    assert os.path.getsize(os.path.join(out, "summary.md")) > 0


def test_csv_source_with_boxes(tmp_path, capsys):
    from fastsal.default_model.synthetic import write_dataset

    labels_csv = write_dataset(str(tmp_path / "data"), 6, split="val")
    out = str(tmp_path / "out")
    rc = main(["eval", "--data", labels_csv, "--checks", "pointing,random-logit", "--methods", "gradient,guided",
               "--out", out, "--quiet"])
    assert rc == 0, capsys.readouterr().err
    header, rows = _rows(out)
    assert tuple(header) == CSV_COLUMNS
    pairs = _pairs(rows)
    for check in ("pointing", "random-logit"):
        for method in ("gradient", "guided"):
            assert (check, method) in pairs
    assert ("pointing", "centre") in pairs
    assert not {r["check"] for r in rows} & {"mprt-cascading", "deletion", "insertion"}
    with open(os.path.join(out, "results.json")) as fh:
        res = json.load(fh)
    assert res["data"]["n"] == 6 and res["data"]["boxes"] is True
    assert "pointing game" in capsys.readouterr().out  # the summary table


def _error(argv, capsys):
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2
    assert "Traceback" not in err
    assert err.startswith("fastsal eval: ")
    return err


def test_unknown_check_or_method_lists_the_allowed_ones(tmp_path, capsys):
    err = _error(["eval", "--out", str(tmp_path / "o"), "--checks", "mprt,pointng"], capsys)
    assert "'pointng'" in err and "random-logit" in err and "mprt-independent" in err
    err = _error(["eval", "--out", str(tmp_path / "o"), "--methods", "gradient,lrp"], capsys)
    assert "'lrp'" in err and "deconvnet" in err and "guided" in err
    assert not (tmp_path / "o").exists()


def test_pointing_without_boxes_fails_before_any_work(tmp_path, capsys):
    from fastsal.default_model.synthetic import write_dataset

    labels_csv = write_dataset(str(tmp_path / "data"), 2, split="val")
    listing = tmp_path / "list.csv"
    with open(labels_csv) as fh:
        rows = list(csv.reader(fh))[1:]
    listing.write_text("path,label\n" + "".join(f"data/{r[0]},{r[1]}\n" for r in rows))
    out = tmp_path / "o"
    err = _error(["eval", "--data", str(listing), "--checks", "pointing", "--out", str(out)], capsys)
    assert "pointing" in err and "boxes" in err and "x0,y0,x1,y1" in err
    assert not out.exists()
    err = _error(["eval", "--data", str(tmp_path / "data"), "--out", str(out)], capsys)  # a folder: no boxes
    assert "boxes" in err


def test_box_outside_the_image_names_the_file(tmp_path, capsys):
    from fastsal.default_model.synthetic import write_dataset

    labels_csv = write_dataset(str(tmp_path / "data"), 2, split="val")
    with open(labels_csv) as fh:
        rows = list(csv.reader(fh))
    rows[2][5] = "70"  # x1 of the second image, beyond its 64 px width
    with open(labels_csv, "w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    err = _error(["eval", "--data", labels_csv, "--checks", "pointing", "--out", str(tmp_path / "o")], capsys)
    assert rows[2][0] in err and "outside" in err and "64x64" in err


def test_model_without_data_is_refused(tmp_path, capsys):
    err = _error(["eval", "--model", "resnet18", "--out", str(tmp_path / "o")], capsys)
    assert "--data" in err


def test_data_randomization_with_the_shipped_permuted_twin(tmp_path, capsys):
    from fastsal.default_model.model import permuted_weights_path

    assert os.path.isfile(permuted_weights_path())
    out = str(tmp_path / "out")
    rc = main(["eval", "--out", out, "--n", "8", "--checks", "data-randomization", "--methods", "gradient,guided",
               "--batch-size", "8", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    _, rows = _rows(out)
    got = {(r["check"], r["method"], r["step"], r["metric"]) for r in rows}
    for m in ("gradient", "guided"):
        for metric in ("rank_abs", "rank_noabs", "ssim", "hog"):
            assert ("data-randomization", m, "permuted-labels", metric) in got
    means = [float(r["mean"]) for r in rows if r["metric"] == "rank_abs"]
    assert all(-1.0 <= v < 0.999 for v in means)  # a different model: not the same maps
    with open(os.path.join(out, "results.json")) as fh:
        assert "data-randomization" in json.load(fh)["checks"]


def test_data_randomization_of_a_user_model_needs_its_permuted_weights(tmp_path, capsys):
    rc = main(["eval", "--out", str(tmp_path / "o"), "--model", "resnet18", "--weights", "random",
               "--data", str(tmp_path), "--checks", "data-randomization", "--quiet"])
    assert rc == 2
    assert "--permuted-weights" in capsys.readouterr().err


def test_tar_shard_source(tmp_path, capsys):
    import io
    import tarfile

    from fastsal.default_model import synthetic

    shard = tmp_path / "shard-000000.tar"
    with tarfile.open(shard, "w") as tar:
        for i in range(4):
            image, label, _box = synthetic.sample(i, "test")
            buf = io.BytesIO()
            Image.fromarray(image).save(buf, format="PNG")
            for name, data in ((f"k{i}.png", buf.getvalue()), (f"k{i}.cls", str(int(label)).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    out = str(tmp_path / "out")
    rc = main(["eval", "--out", out, "--data", str(shard), "--n", "4", "--checks", "random-logit",
               "--methods", "gradient", "--batch-size", "4", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    with open(os.path.join(out, "results.json")) as fh:
        res = json.load(fh)
    assert res["data"]["n"] == 4 and res["data"]["labels"] == "true"
    assert res["data"]["accuracy"] >= 0.75  # the embedded model on its own kind of images
