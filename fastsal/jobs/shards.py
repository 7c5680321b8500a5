"""Tar shards in the WebDataset layout, read with the standard library's ``tarfile``.

A shard is a plain (uncompressed) tar whose members are grouped by *key*: the member's path
up to the first dot of its file name (``train/n0144_17.jpg`` and ``train/n0144_17.cls``
share the key ``train/n0144_17``). A sample's image is its first member, in the order
jpg, jpeg, png, webp; an optional ``.cls`` member holds its integer label; anything else
(``.json``, ...) is ignored. As in WebDataset, the members of one key are adjacent; a key
that comes back later in the shard is a duplicate and is skipped. A job's result key for a
sample is ``<shard file>/<key>`` (``shard-000123.tar/n0144_17``).

Why ``tarfile`` and not the ``webdataset`` package: a job needs to know exactly which
member failed and which were lost when a shard is damaged, and to skip (not decode) the
samples of batches already written when it resumes; WebDataset's iterators hand back
samples and exceptions without that accounting. Nothing is extracted to disk: members are
read into memory one sample at a time, in file order, and the members of done or unwanted
samples are seeked over.

Listing a shard reads its headers (512 bytes per member; the data is seeked over) plus the
small ``.cls`` members, so a job knows all its samples before it starts: progress, resume
by batch and the ``--target label`` check work as for folders.
"""

from __future__ import annotations

import os
import re
import tarfile
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # in the order a sample's image is chosen
LABEL_EXT = "cls"


class ShardError(Exception):
    """A shard that cannot be listed at all (not a tar, unreadable)."""


def split_name(name: str) -> Tuple[str, str]:
    """``dir/base.ext.more`` -> (``dir/base``, ``ext.more``); the extension is lower-cased and
    a leading ``./`` (``tar -C dir -cf x.tar .``) dropped."""
    while name.startswith("./"):
        name = name[2:]
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    key = f"{folder}/{stem}" if folder else stem
    return key, ext.lower() if dot else ""


def expand_braces(pattern: str) -> List[str]:
    """Expand ``{000..099}`` (zero padding kept) and ``{a,b}`` groups, left to right, as
    WebDataset's shard patterns do."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    head, body, tail = pattern[:m.start()], m.group(1), pattern[m.end():]
    rng = re.fullmatch(r"(-?\d+)\.\.(-?\d+)", body)
    if rng:
        lo, hi = rng.group(1), rng.group(2)
        width = len(lo) if lo.lstrip("-").startswith("0") and len(lo) > 1 else 0
        a, b = int(lo), int(hi)
        step = 1 if b >= a else -1
        parts = [str(v).zfill(width) for v in range(a, b + step, step)]
    elif "," in body:
        parts = body.split(",")
    else:
        raise ValueError(f"shard pattern {pattern!r}: {{{body}}} is neither a range {{000..099}} nor a list {{a,b}}")
    return [p for part in parts for p in expand_braces(head + part + tail)]


def is_shard_source(src: str) -> bool:
    """Is ``src`` a tar, a brace pattern of tars, or a folder whose files are all tars?"""
    if "{" in src and "}" in src:
        return True
    if os.path.isfile(src):
        return src.lower().endswith(".tar")
    if os.path.isdir(src):
        found = False
        for name in sorted(os.listdir(src)):
            if name.startswith("."):
                continue
            path = os.path.join(src, name)
            if os.path.isdir(path) or not name.lower().endswith(".tar"):
                return False
            found = True
        return found
    return False


def shard_paths(src: str) -> Tuple[str, List[Tuple[str, str]], List[str]]:
    """(the folder shard names are relative to, [(name, path)], [missing names]) for a
    ``.tar``, a folder of ``.tar`` files or a brace pattern."""
    if "{" in src and "}" in src:
        paths = expand_braces(src)
        base = os.path.dirname(os.path.commonprefix(paths)) if len(paths) > 1 else os.path.dirname(paths[0])
        named = [(os.path.relpath(p, base).replace(os.sep, "/") if base else p, p) for p in paths]
        missing = [n for n, p in named if not os.path.isfile(p)]
        present = [(n, p) for n, p in named if os.path.isfile(p)]
        if not present:
            raise FileNotFoundError(f"shard pattern {src!r} names {len(paths)} files and none exists "
                                    f"(first: {paths[0]})")
        return base, present, missing
    if os.path.isfile(src):
        return os.path.dirname(src), [(os.path.basename(src), src)], []
    names = sorted(n for n in os.listdir(src) if n.lower().endswith(".tar") and not n.startswith("."))
    return src, [(n, os.path.join(src, n)) for n in names], []


# -- grouping members into samples -------------------------------------------------------


@dataclass
class Sample:
    key: str
    members: Dict[str, tarfile.TarInfo] = field(default_factory=dict)  # ext -> member

    def image_ext(self) -> Optional[str]:
        return next((e for e in IMAGE_EXTS if e in self.members), None)


def _samples(tar: tarfile.TarFile) -> Iterator[Sample]:
    """Adjacent members with one key form a sample, in file order. A member that cannot be
    reached raises ``tarfile.ReadError`` (a damaged or cut-short shard)."""
    current: Optional[Sample] = None
    for info in tar:
        if not info.isfile():
            continue
        key, ext = split_name(info.name)
        if key.rpartition("/")[2].startswith(".") or not ext:
            continue
        if current is not None and key != current.key:
            yield current
            current = None
        if current is None:
            current = Sample(key)
        current.members.setdefault(ext, info)
    if current is not None:
        yield current


def _end_problem(fh, tar: tarfile.TarFile, last: Optional[str]) -> Optional[str]:
    """None when the archive ends with its end-of-archive marker (two zero blocks) right
    after the last member; else why not. ``tarfile`` stops silently at a missing or
    garbled header, so this is how a shard cut at a member boundary shows."""
    fh.seek(tar.offset)
    tail = fh.read(2 * tarfile.BLOCKSIZE)
    if len(tail) == 2 * tarfile.BLOCKSIZE and not any(tail):
        return None
    after = f"after member {last!r}" if last else "before its first member"
    if len(tail) < 2 * tarfile.BLOCKSIZE:
        return f"truncated {after} (no end-of-archive marker): the members after it, if any, are lost"
    return f"damaged {after} (an unreadable header): the members after it are lost"


@dataclass
class ShardIndex:
    """What listing one shard found."""

    samples: List[Tuple[str, Optional[int]]]  # (key, label) of the samples with an image, in file order
    skipped: List[str]  # keys with no image member, or duplicated
    problems: List[Tuple[str, str]]  # (member name, or "" for the shard itself; reason): bad labels, damage


def index_shard(path: str) -> ShardIndex:
    """List the samples of one shard (headers, plus the small ``.cls`` members)."""
    samples: List[Tuple[str, Optional[int]]] = []
    skipped: List[str] = []
    problems: List[Tuple[str, str]] = []
    seen = set()
    last = None
    try:
        with open(path, "rb") as fh:
            try:
                tar = tarfile.open(fileobj=fh, mode="r:")
            except tarfile.ReadError as exc:
                raise ShardError(f"not a readable tar file ({exc})") from None
            try:
                for sample in _samples(tar):
                    last = max(sample.members.values(), key=lambda m: m.offset).name
                    if sample.key in seen:
                        skipped.append(f"{sample.key} (duplicate key: its members are not adjacent)")
                        continue
                    seen.add(sample.key)
                    if sample.image_ext() is None:
                        skipped.append(f"{sample.key} (no {'/'.join(IMAGE_EXTS)} member)")
                        continue
                    label = None
                    cls = sample.members.get(LABEL_EXT)
                    if cls is not None:
                        try:
                            raw = tar.extractfile(cls).read()
                            label = int(raw.decode("ascii").strip())
                        except tarfile.ReadError:
                            raise
                        except (ValueError, UnicodeDecodeError):
                            problems.append((cls.name, "not an integer class index: "
                                                       "the image is explained without a label"))
                    samples.append((sample.key, label))
            except tarfile.ReadError as exc:
                # the last sample's data is cut short, or a header after it is unreadable
                problems.append(("", f"damaged or truncated after member {last!r} ({exc}): "
                                     "the members after it are lost"))
            else:
                end = _end_problem(fh, tar, last)
                if end is not None:
                    problems.append(("", end))
    except OSError as exc:
        raise ShardError(f"cannot read ({exc.strerror or exc})") from None
    return ShardIndex(samples, skipped, problems)


# -- reading samples for a job -----------------------------------------------------------


def read_samples(path: str, wanted: Sequence[str]) -> Iterator[Tuple[str, Optional[bytes], Optional[str]]]:
    """Yield ``(key, image bytes or None, error or None)`` for each key of ``wanted``, in
    the shard's order, reading the shard front to back and stopping after the last wanted
    sample. Members of other samples are seeked over, never read. If the shard cannot be
    read past some point, every wanted sample not yet yielded comes back with the reason."""
    todo = set(wanted)
    if not todo:
        return
    seen = set()
    try:
        fh = open(path, "rb")
    except OSError as exc:
        for key in wanted:
            yield key, None, f"shard unreadable ({exc.strerror or exc})"
        return
    with fh:
        failure = None
        try:
            tar = tarfile.open(fileobj=fh, mode="r:")
            for sample in _samples(tar):
                if sample.key in seen:
                    continue
                seen.add(sample.key)
                if sample.key not in todo:
                    continue
                todo.discard(sample.key)
                ext = sample.image_ext()
                if ext is None:  # the listing said it had one: the shard changed
                    yield sample.key, None, "no image member in the shard any more"
                else:
                    member = sample.members[ext]
                    try:
                        data = tar.extractfile(member).read()
                    except tarfile.ReadError as exc:
                        failure = f"shard truncated inside member {member.name!r} ({exc})"
                        todo.add(sample.key)
                        break
                    yield sample.key, data, None
                if not todo:
                    return
        except (tarfile.ReadError, OSError) as exc:
            failure = f"shard unreadable past this point ({exc})"
        reason = failure or "not found in the shard (it changed since the job started, or is truncated)"
        for key in wanted:
            if key in todo:
                yield key, None, reason


def split_key(key: str) -> Tuple[str, str]:
    """A result key ``shard.tar/sample`` -> (``shard.tar``, ``sample``)."""
    m = re.search(r"\.tar/", key, flags=re.IGNORECASE)
    if m is None:
        raise ValueError(f"{key!r} is not a tar-shard result key (<shard>.tar/<key>)")
    return key[:m.end() - 1], key[m.end():]
