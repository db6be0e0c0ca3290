"""Which files of an output folder flexvae wrote: the record that lets a mode replace its own
earlier outputs and nothing else.

A mode that writes into a folder the user names (``-i``, ``-e``, ``-d``, ``-eval``, ``-pics``,
...) opens it with ``writing_into(folder)``. While it is open, every atomic write under that
folder (``files.atomic_path``) first asks it whether the target may be replaced: a missing
target may always be written; an existing one only when ``.flexvae-written.jsonl`` in the
folder records that exact content (its SHA-256) for that path. A file the user put there, a
file of ours the user then edited, a symbolic link or a folder in its place is foreign, and
the write is refused (``ForeignFiles``, one line naming the first paths and the count)
unless the folder was opened with ``replace=True`` (the CLI's ``--overwrite``).

The record is append-only, one JSON object per line after a header line; a line is added
before each rename, so a crash between the two leaves a record of content that never
arrived (harmless) rather than an unrecorded file of ours. A record that does not begin with
our header is not ours: nothing in the folder is taken as ours then, and the record is never
appended to. Hashes are checked, not trusted: a forged line naming a user's file with any
other content does not make it ours. The size, modification time and inode recorded beside the
hash let an unchanged file skip the hashing (as git's index does).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat as stat_module
import threading
from pathlib import Path

from .errors import DataError

RECORD = ".flexvae-written.jsonl"
HEADER = {"flexvae": "files written by flexvae into this folder; a file is flexvae's while its "
                     "SHA-256 is recorded here for its path", "version": 1}
_SHOWN = 3  # conflicting paths named in the error line
MAX_RECORD_BYTES = 1 << 30  # about seven million writes

_ACTIVE: list["OutputFolder"] = []  # open folders, innermost last; shared with writer threads
_ACTIVE_LOCK = threading.Lock()


class ForeignFiles(DataError):
    """Writing would replace files flexvae did not write (or that were changed since)."""


def file_digest(path, chunk: int = 1 << 22) -> str:
    """SHA-256 of a file's content, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def _stat_key(info: os.stat_result) -> list[int]:
    return [info.st_size, info.st_mtime_ns, info.st_ino]


class OutputFolder:
    """The record of one output folder; see the module's doc. ``replace``: foreign files may be
    replaced (the user said so)."""

    def __init__(self, root, replace: bool = False, flag: str = "--output"):
        self.root = Path(root)
        self.absolute = os.path.abspath(self.root)
        self.record_path = self.root / RECORD
        self.replace = bool(replace)
        self.flag = flag
        self._hashes: dict[str, set[str]] | None = None  # relative path -> recorded SHA-256s
        self._stats: dict[str, set[tuple]] = {}  # relative path -> recorded (size, mtime_ns, inode)
        self._foreign_record = False
        self._running: dict[str, "hashlib._Hash"] = {}  # files being appended to: their hash so far
        self._record = None  # the record's file, open for appending
        self._lock = threading.Lock()

    # ---------------------------------------------------------------- reading the record
    def _load(self) -> None:
        if self._hashes is not None:
            return
        self._hashes = {}
        path = self.record_path
        if path.is_symlink() or (path.exists() and not path.is_file()):
            self._foreign_record = True
            return
        try:
            if os.path.getsize(path) > MAX_RECORD_BYTES:  # not one flexvae wrote: never read whole
                self._foreign_record = True
                return
            with open(path, "rb") as fh:
                lines = fh.read().splitlines()
        except FileNotFoundError:
            return
        if not lines or _parse(lines[0]) != HEADER:
            self._foreign_record = True  # the user's file of that name: trust nothing, append nothing
            return
        for raw in lines[1:]:  # a torn last line (a crash mid-append) or a garbled one is skipped
            entry = _parse(raw)
            if not (isinstance(entry, dict) and isinstance(entry.get("path"), str)
                    and isinstance(entry.get("sha256"), str) and len(entry["sha256"]) == 64):
                continue
            self._hashes.setdefault(entry["path"], set()).add(entry["sha256"])
            stat = entry.get("stat")
            if isinstance(stat, list) and len(stat) == 3 and all(type(v) is int for v in stat):
                self._stats.setdefault(entry["path"], set()).add((*stat, entry["sha256"]))

    def relative(self, path) -> str | None:
        """``path`` relative to the folder (POSIX separators), or None when it lies outside."""
        absolute = os.path.abspath(path)
        if absolute == self.absolute or not absolute.startswith(self.absolute.rstrip(os.sep) + os.sep):
            return None
        return Path(os.path.relpath(absolute, self.absolute)).as_posix()

    def is_ours(self, path) -> bool:
        """True when ``path`` is missing or holds content this folder's record lists for it."""
        rel = self.relative(path)
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            return True
        except OSError:
            return False
        if rel is None or rel == RECORD:
            return False
        if not stat_module.S_ISREG(info.st_mode):
            return False  # a link, a folder, a FIFO: never replaced
        with self._lock:
            self._load()
            if self._foreign_record:
                return False
            recorded = self._hashes.get(rel)
            if not recorded:
                return False
            key = tuple(_stat_key(info))
            if any(entry[:3] == key and entry[3] in recorded for entry in self._stats.get(rel, ())):
                return True
        try:
            return file_digest(path) in recorded
        except OSError:
            return False

    # ---------------------------------------------------------------- refusing
    def check(self, paths) -> None:
        """Refuse, in one line, to go on when any of ``paths`` would replace a foreign file
        (nothing is written then); a no-op with ``replace``."""
        if self.replace:
            return
        conflicts = [Path(p) for p in paths if not self.is_ours(p)]
        if conflicts:
            raise self._refusal(conflicts)

    def _refusal(self, conflicts: list[Path]) -> ForeignFiles:
        shown = ", ".join(str(self.relative(p) or p) for p in conflicts[:_SHOWN])
        more = f" and {len(conflicts) - _SHOWN} more" if len(conflicts) > _SHOWN else ""
        one = len(conflicts) == 1
        count = "1 file" if one else f"{len(conflicts)} files"
        them, they = ("it", "it") if one else ("them", "they")
        why = ("its record " + RECORD + " is not flexvae's" if self._foreign_record
               else f"flexvae did not write {them}, or {they} changed since")
        what = "is not flexvae's output" if one else "are not flexvae's outputs"
        return ForeignFiles(f"{self.root}: {count} would be replaced that {what} ({why}): "
                            f"{shown}{more}; choose another {self.flag}, or add --overwrite to replace {them}")

    def claim(self, path) -> None:
        """Before writing ``path``: refuse (ForeignFiles) when it would replace a foreign file."""
        if not self.replace and not self.is_ours(path):
            raise self._refusal([Path(path)])

    # ---------------------------------------------------------------- recording
    def record(self, path, written) -> None:
        """Record that ``path`` will hold the content of the file ``written`` (the temporary file
        about to be renamed onto it); one appended line."""
        rel = self.relative(path)
        if rel is None:
            return
        digest = file_digest(written)
        stat_key = _stat_key(os.stat(written))  # a rename keeps the inode and the modification time
        with self._lock:
            self._running.pop(rel, None)
            self._add(rel, digest, stat_key)

    def adopt(self, paths) -> int:
        """Record the present content of ``paths`` (the existing regular files among them) as
        flexvae's: for a folder an earlier version of flexvae wrote without a record (a run
        directory whose config.toml says it is flexvae's). Returns how many were recorded."""
        count = 0
        for path in paths:
            rel = self.relative(path)
            try:
                info = os.lstat(path)
            except OSError:
                continue
            if rel is None or not stat_module.S_ISREG(info.st_mode):
                continue
            with self._lock:
                self._add(rel, file_digest(path), _stat_key(info))
            count += 1
        return count

    def append(self, path, data: bytes, durable: bool = True) -> None:
        """Append ``data`` to ``path`` (a journal such as -e's manifest; fsync'd unless not
        ``durable``) and record the grown file; refused like a replacement when ``path`` is foreign."""
        rel = self.relative(path)
        with self._lock:
            running = self._running.get(rel)
        if running is None:
            self.claim(path)
            running = hashlib.sha256()
            if os.path.exists(path):
                with open(path, "rb") as fh:
                    for block in iter(lambda: fh.read(1 << 20), b""):
                        running.update(block)
        with open(path, "ab") as fh:
            fh.write(data)
            fh.flush()
            if durable:
                os.fsync(fh.fileno())
            info = os.fstat(fh.fileno())
        running.update(data)
        if rel is not None:
            with self._lock:
                self._running[rel] = running
                self._add(rel, running.hexdigest(), _stat_key(info))

    def close(self) -> None:
        """Close the record's file (``writing_into`` does, when the folder's last user is done)."""
        with self._lock:
            if self._record is not None:
                self._record.close()
                self._record = None

    def start_record(self) -> None:
        """Create the record (its header) now, before any file is written: where several
        processes write into one folder, one of them does this before the others start."""
        with self._lock:
            self._open_record()

    def _open_record(self) -> bool:
        """Open the record for appending (the lock held), writing its header when it is new;
        False when the folder's record is not ours."""
        self._load()
        if self._foreign_record:
            return False
        if self._record is None:  # opened once for the folder's lifetime (closed by writing_into)
            fresh = not self.record_path.exists()
            self.root.mkdir(parents=True, exist_ok=True)
            self._record = open(self.record_path, "a", encoding="utf-8", newline="\n")
            if fresh:
                self._record.write(json.dumps(HEADER) + "\n")
                self._record.flush()
        return True

    def _add(self, rel: str, digest: str, stat_key: list[int]) -> None:
        """One line of the record (the lock held)."""
        if not self._open_record():
            return  # not ours to append to; the files stay unrecorded (foreign) to a later run
        self._record.write(json.dumps({"path": rel, "sha256": digest, "stat": stat_key}) + "\n")
        self._record.flush()
        self._hashes.setdefault(rel, set()).add(digest)
        self._stats.setdefault(rel, set()).add((*stat_key, digest))


def _parse(raw: bytes):
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None


@contextlib.contextmanager
def writing_into(root, replace: bool = False, flag: str = "--output"):
    """Open ``root`` as an output folder for the block: atomic writes under it replace only
    files recorded as flexvae's (all files with ``replace``). Yields the OutputFolder. A folder
    opened again inside the block (the CLI, then the library) is the same record."""
    absolute = os.path.abspath(root)
    with _ACTIVE_LOCK:
        folder = next((f for f in _ACTIVE if f.absolute == absolute), None) or OutputFolder(root, replace, flag)
        _ACTIVE.append(folder)
        was = folder.replace
        folder.replace = was or bool(replace)
    try:
        yield folder
    finally:
        with _ACTIVE_LOCK:
            folder.replace = was
            _ACTIVE.remove(folder)
            if folder not in _ACTIVE:
                folder.close()


def folder_for(path) -> OutputFolder | None:
    """The innermost open output folder that holds ``path``, or None."""
    with _ACTIVE_LOCK:
        active = list(_ACTIVE)
    best = None
    for folder in active:
        if folder.relative(path) is not None and (best is None or len(folder.absolute) > len(best.absolute)):
            best = folder
    return best
