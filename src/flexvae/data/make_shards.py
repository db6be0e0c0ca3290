"""``flexvae shard``: a folder of images -> tar shards in the webdataset layout, for
``data.source = "webdataset"`` (shards.py reads them).

Image ``i`` of the folder (sorted by relative path, as training reads a folder) goes into shard
``i // shard_size`` as the sample ``<i:09d>``: its file's bytes unchanged (``.png``, ``.jpg``,
...), its label (``.cls``, the class index, when ``--labels`` gives one) and its path in the
folder (``.src``). An image that cannot be decoded is left out and listed in the manifest.

Shards are written in parallel, one worker process per shard, each under a hidden temporary
name and renamed when whole, so a shard on disk is always complete. ``manifest.json`` (written
after each finished shard) records, per shard, its file, image count, labelled count and size
in bytes, plus the whole folder's image list digest, class names and failures. A run that
stops is resumed by running the same command again: shards the manifest lists with their size
are kept, the others are written; a manifest of another folder, shard size or labelling is
refused rather than mixed with.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

from ..errors import DataError

MANIFEST = "manifest.json"
FORMAT = "flexvae-shards-1"


def shard_name(number: int) -> str:
    return f"shard-{number:06d}.tar"


def _partial(out: Path, number: int) -> Path:
    return out / f".{shard_name(number)}.partial-{os.getpid()}"


def write_shard(out: str, number: int, items: list) -> dict:
    """One shard from ``items`` = [(index, path, relative path, label or -1)], written to a hidden
    temporary file in ``out``; returns its entry (with the temporary file's name)."""
    from PIL import Image

    out = Path(out)
    partial = _partial(out, number)
    count = labelled = 0
    failed = []
    with tarfile.open(partial, "w") as archive:
        for index, path, rel, label in items:
            try:
                data = Path(path).read_bytes()
                with Image.open(io.BytesIO(data)) as image:
                    image.verify()
            except Exception as exc:  # unreadable or not an image: reported, the others go on
                failed.append({"path": rel, "reason": str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__})
                continue
            key = f"{index:09d}"
            members = [(f"{key}{Path(rel).suffix.lower()}", data), (f"{key}.src", rel.encode("utf-8"))]
            if label >= 0:
                members.append((f"{key}.cls", str(label).encode("ascii")))
                labelled += 1
            for name, payload in members:
                info = tarfile.TarInfo(name)
                info.size, info.mtime = len(payload), 0  # no clock in the file: the same folder, the same bytes
                archive.addfile(info, io.BytesIO(payload))
            count += 1
    with open(partial, "rb") as fh:
        os.fsync(fh.fileno())
    return {"file": shard_name(number), "partial": partial.name, "first": items[0][0], "count": count,
            "labelled": labelled, "bytes": partial.stat().st_size, "failed": failed}


def _listing(root: Path, labels: str | None):
    from .images import find_images
    from .labels import read_labels

    paths = find_images(root)
    relpaths = [p.relative_to(root).as_posix() for p in paths]
    found = None
    if labels not in (None, "none"):
        found = read_labels(labels, relpaths, root, csv_path=None if labels == "folders" else Path(labels))
    indices = [-1] * len(paths) if found is None else [int(i) for i in found.indices]
    classes = list(found.classes) if found is not None else []
    digest = hashlib.sha256("\n".join(relpaths).encode("utf-8")).hexdigest()
    return paths, relpaths, indices, classes, digest


def make_shards(input_dir, out_dir, shard_size: int = 10000, workers: int = 2, labels: str | None = None,
                log=print) -> dict:
    """Write the shards of ``input_dir`` into ``out_dir`` (an open output folder); the manifest."""
    from ..files import atomic_path, write_text

    root, out = Path(input_dir), Path(out_dir)
    if shard_size < 1 or workers < 1:
        raise DataError(f"--shard-size and --workers must be at least 1, got {shard_size} and {workers}")
    paths, relpaths, indices, classes, digest = _listing(root, labels)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"format": FORMAT, "source": str(root), "images": len(paths), "list_sha256": digest,
                "shard_size": shard_size, "labels": labels or "none", "classes": classes}
    manifest = _resume(out, settings)
    for stale in out.glob(".shard-*.tar.partial-*"):  # a stopped run's unfinished shards (ours by name)
        stale.unlink(missing_ok=True)
    done = {entry["file"] for entry in manifest["shards"]}
    todo = [n for n in range((len(paths) + shard_size - 1) // shard_size) if shard_name(n) not in done]
    if len(done):
        log(f"resuming: {len(done)} shard(s) already written, {len(todo)} to write")

    def items(number):
        span = range(number * shard_size, min(len(paths), (number + 1) * shard_size))
        return [(i, str(paths[i]), relpaths[i], indices[i]) for i in span]

    def finish(entry):
        partial = out / entry.pop("partial")
        with atomic_path(out / entry["file"]) as tmp:
            os.replace(partial, tmp)
        manifest["shards"].append(entry)
        manifest["shards"].sort(key=lambda e: e["file"])
        write_text(out / MANIFEST, json.dumps(manifest, indent=1) + "\n")

    try:
        if workers == 1 or len(todo) <= 1:
            for number in todo:
                finish(write_shard(str(out), number, items(number)))
        else:
            with ProcessPoolExecutor(min(workers, len(todo)), mp_context=get_context("spawn")) as pool:
                futures = [pool.submit(write_shard, str(out), number, items(number)) for number in todo]
                for future in as_completed(futures):
                    finish(future.result())
    finally:
        for stale in out.glob(".shard-*.tar.partial-*"):
            stale.unlink(missing_ok=True)
    return manifest


def _resume(out: Path, settings: dict) -> dict:
    """The manifest to extend: a fresh one, or the one already in ``out`` when it describes the
    same folder, shard size and labels (its shards whose size on disk matches are kept)."""
    path = out / MANIFEST
    if not path.exists():
        return {**settings, "shards": []}
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable shard manifest ({exc}); choose another --output") from None
    if not isinstance(old, dict) or old.get("format") != FORMAT:
        raise DataError(f"{path}: not a flexvae shard manifest; choose another --output")
    changed = [key for key in settings if old.get(key) != settings[key]]
    if changed:
        raise DataError(f"{path}: these shards were made with another {', '.join(changed)} "
                        f"(was {old.get(changed[0])!r}, now {settings[changed[0]]!r}); choose another --output")
    kept = []
    for entry in old.get("shards", []):
        if not isinstance(entry, dict):
            continue
        shard = out / str(entry.get("file", ""))
        if shard.parent == out and shard.is_file() and shard.stat().st_size == entry.get("bytes"):
            kept.append(entry)
    return {**settings, "shards": kept}


def describe(manifest: dict) -> str:
    shards = manifest["shards"]
    images = sum(e["count"] for e in shards)
    failed = [f for e in shards for f in e["failed"]]
    size = sum(e["bytes"] for e in shards)
    text = f"{images:,} images in {len(shards)} shard(s), {size / 1e6:.1f} MB"
    if manifest["classes"]:
        text += f", {sum(e['labelled'] for e in shards):,} labelled ({len(manifest['classes'])} classes)"
    if failed:
        text += f"; {len(failed)} left out (first: {failed[0]['path']}: {failed[0]['reason']})"
    return text
