"""Tar shards in the webdataset layout as a random-access dataset (``data.source = "webdataset"``).

A shard is an uncompressed tar file whose members are grouped into samples by key: the
member path up to the first dot of its file name (``part1/000042.jpg`` and
``part1/000042.cls`` are sample ``part1/000042``). Each sample's image member (an image
file extension) is what is read; a ``cls`` member holding an integer is its label.

``data.path`` names one shard, a folder of ``.tar`` files, or a brace pattern
(``shards/train-{000000..000127}.tar``, ``{a,b}``). Every shard is indexed once when the
dataset opens (tar headers only: the offset and size of each member), after which sample
``i`` is one seek and one read. Being a map-style dataset, it takes the same stream sampler
as a folder: DDP ranks and loader workers split it the same way, and a resumed run reads
exactly the samples an uninterrupted one would have read next. (The webdataset package's
streaming reader cannot start at a stream position, which exact resume needs.)
"""

from __future__ import annotations

import io
import os
import re
import tarfile
from pathlib import Path
from typing import Any

from PIL import Image

from ..errors import DataError
from .images import IMAGE_EXTENSIONS, open_image

MAX_EXPANDED = 1_000_000
_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """``a{1..3}b`` -> a1b a2b a3b (zero-padded as written: {000..010}); ``{x,y}`` -> both."""
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    body, head, tail = match.group(1), pattern[:match.start()], pattern[match.end():]
    numeric = re.fullmatch(r"(-?\d+)\.\.(-?\d+)", body)
    if numeric:
        first, last = numeric.group(1), numeric.group(2)
        width = len(first) if first.startswith("0") and len(first) > 1 else 0
        low, high = int(first), int(last)
        if abs(high - low) >= MAX_EXPANDED:
            raise DataError(f"data.path: the range {{{body}}} names more than {MAX_EXPANDED:,} shards")
        step = 1 if high >= low else -1
        choices = [str(n).zfill(width) for n in range(low, high + step, step)]
    else:
        choices = body.split(",")
    return [name for choice in choices for name in expand_braces(head + choice + tail)]


def shard_paths(path_or_pattern) -> list[Path]:
    """The shard files a ``data.path`` names (checked to exist)."""
    text = str(path_or_pattern)
    path = Path(text)
    if "{" not in text and path.is_dir():
        found = sorted(p for p in path.iterdir() if p.suffix == ".tar" and p.is_file())
        if not found:
            raise DataError(f"no .tar shards in {path}")
        return found
    paths = [Path(p) for p in expand_braces(text)]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise DataError(f"data.path: shard not found: {missing[0]}{more}")
    return paths


def _key_and_extension(name: str) -> tuple[str, str]:
    folder, _, base = name.rpartition("/")
    stem, dot, extension = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), (extension.lower() if dot else "")


def index_shard(path: Path) -> tuple[list[dict], list[tuple[str, str]]]:
    """(samples in member order: key, image member offset/size/extension, label member; samples
    without an image member, with reasons)."""
    try:
        archive = tarfile.open(path, "r:")
    except tarfile.ReadError as exc:
        raise DataError(f"{path}: not an uncompressed tar shard ({exc}); shards must be plain .tar files, "
                        "which can be read at random") from None
    samples: dict[str, dict] = {}
    with archive:
        for member in archive:
            if not member.isfile():
                continue
            key, extension = _key_and_extension(member.name)
            sample = samples.setdefault(key, {"key": key})
            if extension.rsplit('.', 1)[-1] in IMAGE_EXTENSIONS and "image" not in sample:
                sample["image"] = (member.offset_data, member.size, extension)
            elif extension == "cls":
                sample["cls"] = (member.offset_data, member.size)
    good = [s for s in samples.values() if "image" in s]
    bad = [(f"{path.name}/{s['key']}", "no image member in this sample") for s in samples.values() if "image" not in s]
    return good, bad


class ShardDataset:
    """Mixin body for datasets.WebDatasetImages: the index and the reading of one sample."""

    def _index(self, path_or_pattern) -> None:
        self.shards = shard_paths(path_or_pattern)
        self.samples: list[tuple[int, dict]] = []
        self.excluded: list[tuple[str, str]] = []
        for number, shard in enumerate(self.shards):
            good, bad = index_shard(shard)
            self.samples += [(number, sample) for sample in good]
            self.excluded += bad
        if not self.samples:
            raise DataError(f"no samples with an image in {len(self.shards)} shard(s) named by {path_or_pattern}")
        self.relpaths = [f"{self.shards[n].name}/{s['key']}.{s['image'][2]}" for n, s in self.samples]
        self._files: dict[int, Any] = {}

    def _bytes(self, shard: int, offset: int, size: int) -> bytes:
        descriptor = self._files.get(shard)
        if descriptor is None:
            descriptor = self._files[shard] = os.open(self.shards[shard], os.O_RDONLY)
        # pread: no shared file position, so forked loader workers can read the same descriptor
        data = os.pread(descriptor, size, offset)
        if len(data) != size:
            raise OSError(f"{self.shards[shard]}: truncated shard")
        return data

    def _read_sample(self, index: int) -> tuple[Image.Image, dict[str, Any]]:
        shard, sample = self.samples[index]
        offset, size, _ = sample["image"]
        image = open_image(io.BytesIO(self._bytes(shard, offset, size)))
        extra = {}
        if "cls" in sample:
            text = self._bytes(shard, *sample["cls"]).decode("utf-8", "replace").strip()
            if re.fullmatch(r"\d{1,9}", text):
                extra["label"] = int(text)
        return image, extra

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_files"] = {}  # descriptors stay with the process that opened them
        return state
