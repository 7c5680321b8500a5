"""Where a job's images come from: a folder, an ImageFolder-style tree, or a list file."""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from typing import List, Optional, Tuple

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
LIST_EXTENSIONS = (".txt", ".csv", ".tsv")


@dataclass(frozen=True)
class Item:
    """One image of a job: ``key`` names it in the results (relative to SRC)."""

    key: str
    path: str
    label: Optional[int]


@dataclass(frozen=True)
class Source:
    items: List[Item]
    class_names: Optional[List[str]]  # ImageFolder subfolder names, in label order
    skipped: List[str]  # files found but not images by their extension
    kind: str  # "folder", "imagefolder" or "list"


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def discover(src: str) -> Source:
    """Find the images of ``src``; raises FileNotFoundError/ValueError with what to do."""
    if not os.path.exists(src):
        raise FileNotFoundError(f"SRC {src!r} does not exist: give a folder of images or a .txt/.csv list of paths")
    if os.path.isfile(src):
        if not src.lower().endswith(LIST_EXTENSIONS):
            raise ValueError(f"SRC {src!r} is a file but not a .txt/.csv/.tsv list of image paths")
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
