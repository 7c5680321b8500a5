"""Where a job's images come from: a folder, an ImageFolder-style tree, a list file, or tar
shards in the WebDataset layout.

A source has two halves: :func:`discover` lists the items of SRC once (rank 0, before the
job starts), and a reader (:func:`open_reader`) hands the encoded bytes of given items to
the loader. :func:`plan_batches` cuts the item list into batches and says which batches
are read together (a *group*: one tar shard, or one batch of loose files); ranks and loader
workers split the work by group. The runner and the results store see only item indices,
bytes and errors: they do not know where the bytes come from.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from fastsal.jobs import shards as tar_shards

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
LIST_EXTENSIONS = (".txt", ".csv", ".tsv")


@dataclass(frozen=True)
class Item:
    """One image of a job: ``key`` names it in the results (relative to SRC; for tar shards
    ``<shard>.tar/<key>``). Read its bytes through :func:`open_reader`, not ``path``."""

    key: str
    path: str  # the image file; for a tar-shard item, the shard that holds it
    label: Optional[int]


@dataclass(frozen=True)
class Source:
    items: List[Item]
    class_names: Optional[List[str]]  # ImageFolder subfolder names, in label order
    skipped: List[str]  # files found but not images by their extension (tar: samples with no image)
    kind: str  # "folder", "imagefolder", "list" or "tar"
    problems: Dict[str, str] = field(default_factory=dict)  # key -> reason, found while listing (tar)


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def discover(src: str) -> Source:
    """Find the images of ``src``; raises FileNotFoundError/ValueError with what to do."""
    if tar_shards.is_shard_source(src):
        return _from_shards(src)
    if not os.path.exists(src):
        raise FileNotFoundError(f"SRC {src!r} does not exist: give a folder of images, a .txt/.csv list of paths, "
                                "a .tar shard, a folder of .tar shards or a pattern like data/shard-{000..099}.tar")
    if os.path.isfile(src):
        if not src.lower().endswith(LIST_EXTENSIONS):
            raise ValueError(f"SRC {src!r} is a file but neither a .tar shard nor a .txt/.csv/.tsv list of image paths")
        return _from_list(src)
    return _from_folder(src)


def _from_folder(root: str) -> Source:
    files: List[str] = []
    skipped: List[str] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            rel = os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/")
            (files if is_image_name(name) else skipped).append(rel)
    files.sort()
    # ImageFolder: every image sits exactly one folder below SRC, in at least two classes
    # (one folder alone is just a folder of images)
    top = {f.split("/")[0] for f in files}
    if files and all(f.count("/") == 1 for f in files) and len(top) >= 2:
        classes = sorted(top)
        index = {c: i for i, c in enumerate(classes)}
        items = [Item(f, os.path.join(root, f), index[f.split("/")[0]]) for f in files]
        return Source(items, classes, skipped, "imagefolder")
    return Source([Item(f, os.path.join(root, f), None) for f in files], None, skipped, "folder")


def _from_list(list_path: str) -> Source:
    """Lines ``path`` or ``path,label`` (a header ``path,label`` is allowed); relative paths
    are relative to the list file's folder."""
    base = os.path.dirname(os.path.abspath(list_path))
    delimiter = "\t" if list_path.lower().endswith(".tsv") else ","
    items: List[Item] = []
    seen = set()
    with open(list_path, newline="") as fh:
        for lineno, row in enumerate(csv.reader(fh, delimiter=delimiter), start=1):
            row = [c.strip() for c in row]
            if not row or not row[0] or row[0].startswith("#"):
                continue
            if lineno == 1 and row[0].lower() in ("path", "file", "filename", "image"):
                continue
            key = row[0]
            label: Optional[int] = None
            if len(row) > 1 and row[1] != "":
                try:
                    label = int(row[1])
                except ValueError:
                    raise ValueError(f"{list_path}:{lineno}: label {row[1]!r} is not an integer class index") from None
            if key in seen:
                continue
            seen.add(key)
            path = key if os.path.isabs(key) else os.path.join(base, key)
            items.append(Item(key, path, label))
    return Source(items, None, [], "list")


def labels_of(source: Source) -> Tuple[bool, bool]:
    """(every item has a label, some item has one)."""
    have = [it.label is not None for it in source.items]
    return all(have) and bool(have), any(have)


def _from_shards(src: str) -> Source:
    """Every sample of every shard, shard by shard in name order; keys ``<shard>/<key>``."""
    _base, named, missing = tar_shards.shard_paths(src)
    items: List[Item] = []
    skipped: List[str] = []
    problems: Dict[str, str] = {name: "shard not found" for name in missing}
    for name, path in named:
        try:
            index = tar_shards.index_shard(path)
        except tar_shards.ShardError as exc:
            problems[name] = str(exc)
            continue
        items.extend(Item(f"{name}/{key}", path, label) for key, label in index.samples)
        skipped.extend(f"{name}/{what}" for what in index.skipped)
        for key, reason in index.problems:
            problems[f"{name}/{key}" if key else name] = reason
    return Source(items, None, skipped, "tar", problems)


def fingerprint(src: str) -> Optional[List[list]]:
    """Tar sources: ``[[shard name, size, mtime_ns], ...]`` (cheap: one stat per shard), so a
    resumed job can skip listing shards that did not change; None for other sources."""
    if not tar_shards.is_shard_source(src):
        return None
    _base, named, missing = tar_shards.shard_paths(src)
    out = []
    for name, path in named:
        st = os.stat(path)
        out.append([name, st.st_size, st.st_mtime_ns])
    return out + [[name, None, None] for name in missing]


def relisted(src: str, items: Sequence[Tuple[str, Optional[int]]], manifest: dict) -> Source:
    """The Source a previous run of this job listed (its items.tsv and manifest), for a tar
    source whose :func:`fingerprint` has not changed since."""
    base = tar_shards.shard_paths(src)[0]
    listed = [Item(k, os.path.join(base, tar_shards.split_key(k)[0]), lab) for k, lab in items]
    skipped = list(manifest.get("source_skipped") or [])
    return Source(listed, None, skipped, "tar", dict(manifest.get("source_errors") or {}))


def labels_missing(source: Source, limit: int = 3) -> List[str]:
    """The first keys without a label (for the --target label message)."""
    return [it.key for it in source.items if it.label is None][:limit]


# -- batches and readers -------------------------------------------------------------------


@dataclass(frozen=True)
class Batch:
    index: int  # batch K of the job: its results file is named for it
    items: List[int]  # indices into the job's item list (items.tsv)
    group: int  # batches of one group are read together, by one loader worker of one rank


def plan_batches(kind: str, keys: Sequence[str], batch_size: int) -> List[Batch]:
    """The job's batches, the same on every rank and every run. Loose files: batch K is
    items [K*B, (K+1)*B), each batch its own group. Tar shards: a batch never crosses a
    shard, and a shard's batches form one group (a shard is read front to back once)."""
    if kind != "tar":
        return [Batch(k, list(range(s, min(s + batch_size, len(keys)))), k)
                for k, s in enumerate(range(0, len(keys), batch_size))]
    batches: List[Batch] = []
    group, start, current = -1, 0, None
    for i in range(len(keys) + 1):
        shard = tar_shards.split_key(keys[i])[0] if i < len(keys) else None
        if shard != current:
            for s in range(start, i, batch_size):
                batches.append(Batch(len(batches), list(range(s, min(s + batch_size, i))), group))
            group, start, current = group + 1, i, shard
    return batches


Raw = Tuple[int, Optional[bytes], Optional[str]]  # (item index, encoded bytes or None, error or None)


class FileReader:
    """Loose files: item i is the file ``root/key``."""

    def __init__(self, root: str, keys: Sequence[str]):
        self.paths = [k if os.path.isabs(k) else os.path.join(root, k) for k in keys]

    def read(self, indices: Sequence[int]) -> Iterator[Raw]:
        for i in indices:
            try:
                with open(self.paths[i], "rb") as fh:
                    data = fh.read()
            except FileNotFoundError:
                yield i, None, "file not found"
                continue
            except OSError as exc:
                yield i, None, f"unreadable file ({exc.strerror or exc})"
                continue
            yield i, data, None if data else "empty file"


class TarReader:
    """Tar shards: the samples of one shard, read front to back."""

    def __init__(self, root: str, keys: Sequence[str]):
        self.root = root
        self.keys = keys

    def read(self, indices: Sequence[int]) -> Iterator[Raw]:
        by_shard: Dict[str, List[Tuple[str, int]]] = {}
        for i in indices:
            shard, key = tar_shards.split_key(self.keys[i])
            by_shard.setdefault(shard, []).append((key, i))
        for shard, wanted in by_shard.items():
            path = shard if os.path.isabs(shard) else os.path.join(self.root, shard)
            index_of = dict(wanted)
            for key, data, error in tar_shards.read_samples(path, [k for k, _ in wanted]):
                if error is None and not data:
                    error = "empty member"
                yield index_of[key], data, error


def open_reader(src: str, kind: str, keys: Sequence[str]):
    """The reader of a job's items; ``keys`` as stored in items.tsv."""
    if kind == "tar":
        return TarReader(tar_shards.shard_paths(src)[0], keys)
    root = os.path.abspath(src)
    return FileReader(root if os.path.isdir(root) else os.path.dirname(root), keys)
