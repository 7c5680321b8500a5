"""The results folder of a job: readable with numpy and the standard library alone.

    DIR/manifest.json         the configuration, versions, class names, errors found while listing
                              SRC (and for tar shards their sizes and times, to reuse the listing)
    DIR/items.tsv             key <TAB> label: every image of the job, in batch order
    DIR/shards/batch-K.npz    the results of batch K (written once, atomically)
    DIR/errors.tsv            key <TAB> reason, for the files that could not be used
    DIR/items.parquet         one row per item (see TABLE_COLUMNS), written at the end of a
                              complete job when pyarrow is installed (atomically)
    DIR/summary.json          counts and throughput of the last run

Batch K holds fixed items of items.tsv whichever rank or run computes it (loose files:
items [K*B, (K+1)*B); tar shards: the same, except that a batch never crosses a shard), so
a resumed or multi-rank job computes exactly the batches a single uninterrupted run would.
A batch is done when its shard exists: shards are written to a temporary name and renamed,
so a kill at any moment leaves either the whole shard or nothing. items.parquet is only a
compaction of the shards, rewritten whole at the end of a run: a killed job leaves the
previous complete table or none, never a partial one (``Results.table()`` reads the
shards when the table is missing or older than them).

A shard's arrays: ``keys`` (str), ``labels`` (int64, -1 when unknown), ``preds``,
``targets`` (int64), ``scores`` (float32 softmax probability of ``preds``), ``maps``
(N x H x W at the model's input resolution: float16, or with ``--map-dtype uint8`` uint8
scaled by each map's own maximum, with ``map_scales`` (float32 N) such that
map = maps * map_scales), ``boxes`` (int32 N x 4, x0 y0 x1 y1 in original-image pixels, -1
for none), ``sizes`` (int32 N x 2 original width, height, after EXIF orientation),
``err_keys`` / ``err_msgs`` (str), and with ``--save-original-size`` one ``orig_<i>`` map
per image at its original size (same dtype; uint8 ones with ``orig_scales``).
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Dict, Iterator, List, Mapping, Optional, Tuple

import numpy as np

FORMAT_VERSION = 1
SHARD_DIR = "shards"
TABLE = "items.parquet"
MAP_DTYPES = ("float16", "uint8")
# items.parquet, one row per item of items.tsv in its order. label: the data set's label
# (items.tsv's), pred: the predicted class, target: the class the map explains; x0..y1 the
# box in original-image pixels (null: none); map_file/map_row: where the map is
# (np.load(DIR/map_file)["maps"][map_row]); error: why the item has no result (null: it has one).
TABLE_COLUMNS = ("key", "label", "pred", "pred_name", "score", "target", "x0", "y0", "x1", "y1",
                 "width", "height", "map_file", "map_row", "map_scale", "error")
_COLUMN_TYPES = {"key": "string", "label": "int64", "pred": "int64", "pred_name": "string", "score": "float32",
                 "target": "int64", "x0": "int32", "y0": "int32", "x1": "int32", "y1": "int32", "width": "int32",
                 "height": "int32", "map_file": "string", "map_row": "int32", "map_scale": "float32", "error": "string"}


def encode_maps(maps: np.ndarray, dtype: str) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """(stored maps, per-map scales or None) for float32 maps ``(N, H, W)``.

    uint8 keeps ``round(255 * m / max(m))`` and the scale ``max(m) / 255``; a map with a
    negative or non-finite value cannot be stored so (its scale is NaN, and so is the map
    read back), an all-zero map has scale 0.
    """
    if dtype == "float16":
        return maps.astype(np.float16), None
    if dtype != "uint8":
        raise ValueError(f"map dtype must be one of {', '.join(MAP_DTYPES)}, got {dtype!r}")
    flat = maps.reshape(maps.shape[0], -1)
    bad = ~np.isfinite(flat).all(axis=1) | (flat < 0).any(axis=1)
    top = np.where(bad, 0.0, flat.max(axis=1, initial=0.0)).astype(np.float64)
    scale = top / 255.0
    safe = np.where(scale > 0, scale, 1.0)
    q = np.where(bad[:, None, None], 0, np.round(np.nan_to_num(maps) / safe[:, None, None]))
    scales = np.where(bad, np.nan, scale).astype(np.float32)
    return np.clip(q, 0, 255).astype(np.uint8), scales


def decode_map(stored: np.ndarray, scale: Optional[float]) -> np.ndarray:
    """A stored map as floats: float16 as it is, uint8 times its scale (float32)."""
    if stored.dtype == np.uint8:
        return stored.astype(np.float32) * np.float32(scale)
    return stored


def atomic_write_bytes(path: str, data: bytes) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def shard_name(batch: int) -> str:
    return f"batch-{batch:07d}.npz"


class ConfigMismatch(Exception):
    pass


class ResultStore:
    """Writes and inspects one job's results folder."""

    def __init__(self, root: str):
        self.root = root
        self.shard_dir = os.path.join(root, SHARD_DIR)

    # -- setting up ------------------------------------------------------------------------
    def manifest(self) -> Optional[dict]:
        path = os.path.join(self.root, "manifest.json")
        if not os.path.exists(path):
            return None
        with open(path) as fh:
            return json.load(fh)

    def prepare(self, config: dict, items: List[Tuple[str, Optional[int]]], extra: dict, overwrite: bool) -> bool:
        """Create the folder, or check it holds this very job. Returns True when resuming."""
        existing = self.manifest()
        if existing is not None:
            same = existing.get("config") == config
            stored_items = self.items() if same else None
            if same and stored_items != items:
                if not overwrite:
                    raise ConfigMismatch(
                        f"{self.root} holds results for a different list of images "
                        f"({len(stored_items)} stored, {len(items)} now): the source changed since the job started. "
                        "Use --overwrite to start again, or another --out"
                    )
            elif not same and not overwrite:
                diff = sorted(k for k in set(config) | set(existing.get("config", {}))
                              if config.get(k) != existing.get("config", {}).get(k))
                raise ConfigMismatch(
                    f"{self.root} holds results of a different configuration (differs in: {', '.join(diff)}). "
                    "Use --overwrite to replace them, or another --out"
                )
            if same and stored_items == items:
                self.clean_temporaries()
                return True
            self.clear()
        elif os.path.isdir(self.root) and os.listdir(self.root) and not overwrite:
            if not os.path.exists(os.path.join(self.root, "manifest.json")):
                raise ConfigMismatch(
                    f"{self.root} exists, is not empty and is not a fastsal results folder; "
                    "choose an empty or new --out (or --overwrite to use it anyway)"
                )
        os.makedirs(self.shard_dir, exist_ok=True)
        lines = "".join(f"{k}\t{'' if lab is None else lab}\n" for k, lab in items)
        atomic_write_bytes(os.path.join(self.root, "items.tsv"), lines.encode())
        atomic_write_json(os.path.join(self.root, "manifest.json"),
                          {"format": FORMAT_VERSION, "config": config, **extra})
        return False

    def clear(self) -> None:
        for name in (SHARD_DIR,):
            shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)
        for name in ("manifest.json", "items.tsv", "errors.tsv", "summary.json", TABLE):
            path = os.path.join(self.root, name)
            if os.path.exists(path):
                os.unlink(path)

    def clean_temporaries(self) -> None:
        """Remove files a killed run left half-written."""
        for folder in (self.shard_dir, self.root):
            if os.path.isdir(folder):
                for name in os.listdir(folder):
                    if name.startswith(".tmp-"):
                        os.unlink(os.path.join(folder, name))

    def items(self) -> List[Tuple[str, Optional[int]]]:
        out = []
        with open(os.path.join(self.root, "items.tsv")) as fh:
            for line in fh:
                key, _, label = line.rstrip("\n").rpartition("\t")
                out.append((key, int(label) if label else None))
        return out

    # -- progress --------------------------------------------------------------------------
    def done_batches(self) -> set:
        if not os.path.isdir(self.shard_dir):
            return set()
        return {int(n[6:13]) for n in os.listdir(self.shard_dir) if n.startswith("batch-") and n.endswith(".npz")}

    def write_shard(self, batch: int, arrays: Dict[str, np.ndarray]) -> None:
        import io

        buf = io.BytesIO()
        np.savez(buf, **arrays)
        atomic_write_bytes(os.path.join(self.shard_dir, shard_name(batch)), buf.getvalue())

    def shard_paths(self) -> List[str]:
        if not os.path.isdir(self.shard_dir):
            return []
        return sorted(os.path.join(self.shard_dir, n) for n in os.listdir(self.shard_dir)
                      if n.startswith("batch-") and n.endswith(".npz"))

    def collect_errors(self) -> Dict[str, str]:
        errors: Dict[str, str] = dict((self.manifest() or {}).get("source_errors") or {})
        for path in self.shard_paths():
            with np.load(path, allow_pickle=False) as z:
                errors.update(zip(z["err_keys"].tolist(), z["err_msgs"].tolist()))
        return errors

    def write_errors(self, errors: Mapping[str, str]) -> None:
        lines = "".join(f"{k}\t{errors[k]}\n" for k in sorted(errors))
        atomic_write_bytes(os.path.join(self.root, "errors.tsv"), lines.encode())

    # -- the table -------------------------------------------------------------------------
    def table_columns(self) -> Dict[str, list]:
        """TABLE_COLUMNS as lists, one row per item of items.tsv (read from the shards)."""
        manifest = self.manifest() or {}
        names = manifest.get("class_names") or None
        rows: Dict[str, tuple] = {}
        errors: Dict[str, str] = {}
        for path in self.shard_paths():
            rel = f"{SHARD_DIR}/{os.path.basename(path)}"
            with np.load(path, allow_pickle=False) as z:
                # each z[name] reads the array from the zip again: read each once
                a = {k: z[k].tolist() for k in ("keys", "preds", "scores", "targets", "boxes", "sizes",
                                                 "err_keys", "err_msgs")}
                scales = z["map_scales"].tolist() if "map_scales" in z.files else None
            for r, key in enumerate(a["keys"]):
                box, pred, size = a["boxes"][r], a["preds"][r], a["sizes"][r]
                rows[key] = (pred, names[pred] if names and 0 <= pred < len(names) else None,
                             a["scores"][r], a["targets"][r], *(box if box[0] >= 0 else [None] * 4),
                             size[0], size[1], rel, r, None if scales is None else scales[r])
            errors.update(zip(a["err_keys"], a["err_msgs"]))
        cols: Dict[str, list] = {c: [] for c in TABLE_COLUMNS}
        empty = (None,) * (len(TABLE_COLUMNS) - 3)
        for key, label in self.items():
            row = rows.get(key, empty)
            cols["key"].append(key)
            cols["label"].append(label)
            for name, value in zip(TABLE_COLUMNS[2:-1], row):
                cols[name].append(value)
            cols["error"].append(errors.get(key) if key not in rows else None)
        return cols

    def write_table(self) -> str:
        """Compact the shards into DIR/items.parquet (atomically); needs pyarrow."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        cols = self.table_columns()
        table = pa.table({c: pa.array(cols[c], type=getattr(pa, _COLUMN_TYPES[c])()) for c in TABLE_COLUMNS})
        path = os.path.join(self.root, TABLE)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".tmp-", suffix=TABLE)
        os.close(fd)
        try:
            pq.write_table(table, tmp)
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return path


@dataclass(frozen=True)
class Record:
    """One image's result."""

    map: np.ndarray  # 2-D saliency map at the model's input resolution (float16; float32 if stored as uint8)
    box: Optional[Tuple[int, int, int, int]]  # x0, y0, x1, y1 in original-image pixels
    label: int  # the predicted class
    score: float  # its softmax probability
    target: int  # the class the map explains
    true_label: Optional[int]  # from the ImageFolder tree or the list file
    size: Tuple[int, int]  # original (width, height), as seen after EXIF orientation (unless --no-exif-transpose)
    map_original: Optional[np.ndarray] = None  # the map resized to the original image, if saved


class Results(Mapping[str, Record]):
    """``load_results(DIR)``: image key (path relative to SRC) -> :class:`Record`.

    Shards are read on demand (the two most recent are cached), so a results folder of
    millions of images can be opened at once. ``.errors`` maps each unusable file to why.
    """

    def __init__(self, root: str):
        store = ResultStore(root)
        manifest = store.manifest()
        if manifest is None:
            raise FileNotFoundError(f"{root} is not a fastsal results folder (no manifest.json)")
        self.root = root
        self.manifest = manifest
        self.class_names = manifest.get("class_names")
        self._where: Dict[str, Tuple[str, int]] = {}
        errors: Dict[str, str] = dict(manifest.get("source_errors") or {})
        for path in store.shard_paths():
            with np.load(path, allow_pickle=False) as z:
                for row, key in enumerate(z["keys"].tolist()):
                    self._where[key] = (path, row)
                errors.update(zip(z["err_keys"].tolist(), z["err_msgs"].tolist()))
        self.errors: Dict[str, str] = dict(sorted(errors.items()))
        self._cache: "collections.OrderedDict[str, dict]" = collections.OrderedDict()

    def _shard(self, path: str) -> dict:
        if path in self._cache:
            self._cache.move_to_end(path)
            return self._cache[path]
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
        self._cache[path] = data
        while len(self._cache) > 2:
            self._cache.popitem(last=False)
        return data

    def __getitem__(self, key: str) -> Record:
        path, row = self._where[key]
        z = self._shard(path)
        box = tuple(int(v) for v in z["boxes"][row])
        label = int(z["labels"][row])
        orig = z.get(f"orig_{row}")
        if orig is not None:
            orig = decode_map(orig, z["orig_scales"][row] if "orig_scales" in z else None)
        return Record(
            map=decode_map(z["maps"][row], z["map_scales"][row] if "map_scales" in z else None),
            box=None if box[0] < 0 else box,
            label=int(z["preds"][row]),
            score=float(z["scores"][row]),
            target=int(z["targets"][row]),
            true_label=None if label < 0 else label,
            size=(int(z["sizes"][row][0]), int(z["sizes"][row][1])),
            map_original=orig,
        )

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._where))

    def __len__(self) -> int:
        return len(self._where)

    def __repr__(self) -> str:
        return f"Results({self.root!r}: {len(self)} images, {len(self.errors)} errors)"

    def table(self):
        """One row per item as a pandas DataFrame (columns: ``store.TABLE_COLUMNS``).

        Read from items.parquet when it is there and newer than every shard (pandas reads
        it through pyarrow), otherwise built from the shards, so a job still running or
        killed can be looked at too. Needs pandas.
        """
        try:
            import pandas as pd
        except ImportError:
            raise ImportError("Results.table() needs pandas: pip install 'fastsal[parquet]' (pandas and pyarrow); "
                              "without it, iterate over the results or read items.tsv and the shards "
                              "with numpy") from None
        store = ResultStore(self.root)
        path = os.path.join(self.root, TABLE)
        shards = store.shard_paths()
        if os.path.exists(path) and all(os.path.getmtime(p) <= os.path.getmtime(path) for p in shards):
            try:
                return pd.read_parquet(path, dtype_backend="numpy_nullable")
            except ImportError:
                pass  # no parquet engine: build it from the shards
        cols = store.table_columns()
        # the nullable dtypes pandas gives the Parquet file's columns
        dtype = {"string": "string", "int64": "Int64", "int32": "Int32", "float32": "Float32"}
        return pd.DataFrame({c: pd.array(cols[c], dtype=dtype[_COLUMN_TYPES[c]]) for c in TABLE_COLUMNS})


def load_results(root: str) -> Results:
    """Open the results folder a ``fastsal run`` wrote."""
    return Results(root)
