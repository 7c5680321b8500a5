"""items.parquet and ``load_results(...).table()``: the same rows as items.tsv, the errors and
the maps; ``--map-dtype uint8`` maps read back as floats within half a step of the scale;
a failed table write leaves no partial table."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

from fastsal.jobs import store as store_mod
from fastsal.jobs.runner import RunOptions, run
from fastsal.jobs.store import ResultStore, load_results

pytest.importorskip("PIL")
pytest.importorskip("scipy")
pd = pytest.importorskip("pandas")
pytest.importorskip("pyarrow")
from PIL import Image  # noqa: E402

TESTS = os.path.dirname(__file__)
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)

OPTS = dict(model="job_models:tiny", size=32, batch_size=4, workers=0, device="cpu", loader_probe=0, progress=False)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(1)
    for cls in ("a", "b"):
        (root / cls).mkdir()
    for i in range(9):
        arr = rng.integers(0, 255, (18 + i, 25 + 2 * i, 3), dtype=np.uint8)
        Image.fromarray(arr).save(root / ("a", "b")[i % 2] / f"im{i}.png")
    (root / "a" / "bad.jpg").write_bytes(b"garbage")
    return str(root)


@pytest.fixture(scope="module")
def runs(folder, tmp_path_factory):
    base = tmp_path_factory.mktemp("runs")
    out = {}
    for dtype in ("float16", "uint8"):
        out[dtype] = str(base / dtype)
        run(RunOptions(src=folder, out=out[dtype], map_dtype=dtype, save_original_size=True, **OPTS))
    return out


def test_parquet_equals_items_tsv_errors_and_maps(runs):
    out = runs["float16"]
    table = pd.read_parquet(os.path.join(out, "items.parquet"))
    assert list(table.columns) == list(store_mod.TABLE_COLUMNS)
    items = ResultStore(out).items()
    assert table["key"].tolist() == [k for k, _ in items]  # one row per item, in items.tsv order
    assert table["label"].tolist() == [lab for _, lab in items]
    res = load_results(out)
    assert table.loc[table["error"].notna(), "key"].tolist() == list(res.errors) == ["a/bad.jpg"]
    good = table[table["error"].isna()]
    assert len(good) == len(res) == 9
    for row in good.itertuples():
        rec = res[row.key]
        with np.load(os.path.join(out, row.map_file)) as z:
            assert np.array_equal(z["maps"][int(row.map_row)], rec.map)
        assert (row.pred, row.target, row.width, row.height) == (rec.label, rec.target) + rec.size
        assert row.score == pytest.approx(rec.score) and row.pred_name is None  # a factory model has no names
        assert (row.x0, row.y0, row.x1, row.y1) == rec.box
    # the DataFrame from load_results is the same table, with or without items.parquet
    frame = res.table()
    assert frame["key"].tolist() == table["key"].tolist()
    assert np.allclose(frame["score"].to_numpy(float, na_value=np.nan), table["score"].to_numpy(float), equal_nan=True)
    assert str(frame["map_row"].dtype) == "Int32"  # nullable ints stay ints in table()
    os.rename(os.path.join(out, "items.parquet"), os.path.join(out, "moved.parquet"))
    try:
        built = res.table()
    finally:
        os.rename(os.path.join(out, "moved.parquet"), os.path.join(out, "items.parquet"))
    pd.testing.assert_frame_equal(built, frame)


def test_uint8_maps_are_floats_within_half_a_step(runs):
    f16, u8 = load_results(runs["float16"]), load_results(runs["uint8"])
    assert sorted(f16) == sorted(u8)
    for key in f16:
        a, b = f16[key], u8[key]
        assert b.map.dtype == np.float32 and b.map_original.dtype == np.float32
        top = float(a.map.astype(np.float32).max())
        step = top / 255
        # half a step of the uint8 scale, plus float16's own rounding of the reference
        assert np.abs(b.map - a.map.astype(np.float32)).max() <= 0.5 * step + 1e-3 * top + 1e-12, key
        assert b.map.max() == pytest.approx(top, rel=1e-3)
        assert b.box == a.box  # boxes come from the float32 maps before storage: identical
    z = np.load(os.path.join(runs["uint8"], "shards", "batch-0000000.npz"))
    assert z["maps"].dtype == np.uint8 and z["map_scales"].dtype == np.float32
    assert z["maps"].nbytes * 2 == np.load(os.path.join(runs["float16"], "shards", "batch-0000000.npz"))["maps"].nbytes


def test_encode_maps_edge_cases():
    maps = np.zeros((3, 2, 2), np.float32)
    maps[1] = [[0.0, 1.0], [2.0, 4.0]]
    maps[2, 0, 0] = np.nan
    stored, scales = store_mod.encode_maps(maps, "uint8")
    assert stored[1].tolist() == [[0, 64], [128, 255]] and scales[0] == 0.0 and np.isnan(scales[2])
    assert np.all(store_mod.decode_map(stored[0], scales[0]) == 0)
    assert np.all(np.isnan(store_mod.decode_map(stored[2], scales[2])))  # not silently zero
    with pytest.raises(ValueError, match="float16, uint8"):
        store_mod.encode_maps(maps, "int4")


def test_a_failed_table_write_leaves_the_old_table(runs, monkeypatch):
    import pyarrow.parquet as pq

    out = runs["float16"]
    path = os.path.join(out, "items.parquet")
    before = open(path, "rb").read()

    def broken(table, where, **kwargs):
        with open(where, "wb") as fh:
            fh.write(b"PAR1 half a table")
        raise OSError("disk full")

    monkeypatch.setattr(pq, "write_table", broken)
    with pytest.raises(OSError, match="disk full"):
        ResultStore(out).write_table()
    assert open(path, "rb").read() == before
    assert not [n for n in os.listdir(out) if n.startswith(".tmp-")]


def test_table_without_pandas_says_what_to_install(runs, monkeypatch):
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(ImportError, match=r"fastsal\[parquet\]"):
        load_results(runs["float16"]).table()
