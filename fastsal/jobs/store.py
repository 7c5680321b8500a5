"""The results folder of a job: readable with numpy and the standard library alone.

    DIR/manifest.json         the configuration, versions and the class names
    DIR/items.tsv             key <TAB> label: every image of the job, in batch order
    DIR/shards/batch-K.npz    the results of batch K (written once, atomically)
    DIR/errors.tsv            key <TAB> reason, for the files that could not be used
    DIR/summary.json          counts and throughput of the last run

Batch K always holds items [K*B, (K+1)*B) of items.tsv, whichever rank or run computes it,
so a resumed or multi-rank job computes exactly the batches a single uninterrupted run
would. A batch is done when its shard exists: shards are written to a temporary name and
renamed, so a kill at any moment leaves either the whole shard or nothing.

A shard's arrays: ``keys`` (str), ``labels`` (int64, -1 when unknown), ``preds``,
``targets`` (int64), ``scores`` (float32 softmax probability of ``preds``), ``maps``
(float16, N x H x W at the model's input resolution), ``boxes`` (int32 N x 4, x0 y0 x1 y1
in original-image pixels, -1 for none), ``sizes`` (int32 N x 2 original width, height),
``err_keys`` / ``err_msgs`` (str), and with ``--save-original-size`` one ``orig_<i>``
float16 map per image at its original size.
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
        for name in ("manifest.json", "items.tsv", "errors.tsv", "summary.json"):
            path = os.path.join(self.root, name)
            if os.path.exists(path):
                os.unlink(path)

    def clean_temporaries(self) -> None:
        """Remove shard files a killed run left half-written."""
        if os.path.isdir(self.shard_dir):
            for name in os.listdir(self.shard_dir):
                if name.startswith(".tmp-"):
                    os.unlink(os.path.join(self.shard_dir, name))

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
        errors: Dict[str, str] = {}
        for path in self.shard_paths():
            with np.load(path, allow_pickle=False) as z:
                errors.update(zip(z["err_keys"].tolist(), z["err_msgs"].tolist()))
        return errors

    def write_errors(self, errors: Mapping[str, str]) -> None:
        lines = "".join(f"{k}\t{errors[k]}\n" for k in sorted(errors))
        atomic_write_bytes(os.path.join(self.root, "errors.tsv"), lines.encode())


@dataclass(frozen=True)
class Record:
    """One image's result."""

    map: np.ndarray  # 2-D float16 saliency map at the model's input resolution
    box: Optional[Tuple[int, int, int, int]]  # x0, y0, x1, y1 in original-image pixels
    label: int  # the predicted class
    score: float  # its softmax probability
    target: int  # the class the map explains
    true_label: Optional[int]  # from the ImageFolder tree or the list file
    size: Tuple[int, int]  # original (width, height)
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
        errors: Dict[str, str] = {}
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
        return Record(
            map=z["maps"][row],
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


def load_results(root: str) -> Results:
    """Open the results folder a ``fastsal run`` wrote."""
    return Results(root)
