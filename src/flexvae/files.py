"""Writing files so that a reader never sees half of one: the one atomic-write helper.

Every file flexvae writes (checkpoints, configs, metrics, images, latents, manifests) goes
through ``atomic_path``: the content is written to a temporary file beside the target,
flushed to disk, and renamed over the target, and the folder entry is synced. A failure or
an interruption leaves the previous file as it was and removes the temporary one. A new
file gets the permissions the umask gives; a replaced file keeps its own. Inside an output
folder opened with ``outputs.writing_into``, only files that folder's record lists as
flexvae's are replaced.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import stat
from pathlib import Path

# Temporary files are named ".<target name>.<8 hex digits>.tmp".
TEMP_NAME = re.compile(r"\..+\.[0-9a-f]{8}\.tmp")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")


def fsync_path(path: Path) -> None:
    """Flush a file's data to disk (opened writable: some platforms only sync those)."""
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def fsync_dir(directory: Path) -> None:
    """Make a rename durable; not every platform can open a folder."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def as_os_error(exc: Exception, path) -> OSError | None:
    """An OSError for ``path`` from a library error that wraps one (safetensors writes "... No
    space left on device (os error 28)"), or None when ``exc`` names no OS error."""
    found = _OS_ERROR.search(str(exc))
    if found is None:
        return None
    code = int(found.group(1))
    error = OSError(code, os.strerror(code), str(path))
    error.__cause__ = exc
    return error


@contextlib.contextmanager
def atomic_path(path, sync_dir: bool = True):
    """Yield a temporary path to write to; on success it replaces ``path``. ``sync_dir=False``
    leaves making the rename durable (``fsync_dir``) to the caller, who may do it once for
    many files of one folder."""
    from .outputs import folder_for

    path = Path(path)
    output = folder_for(path)  # an output folder the user named: replace only flexvae's own files
    if output is not None:
        output.claim(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        try:
            yield tmp
        except OSError:
            raise
        except Exception as exc:  # a writer's own error type for a failed write (safetensors' SafetensorError)
            raise as_os_error(exc, path) or exc
        fsync_path(tmp)
        if output is not None:
            output.claim(path)  # the user may have put a file there while this one was written
            output.record(path, tmp)
        try:
            mode = stat.S_IMODE(os.stat(path).st_mode)  # a replaced file keeps its permissions
        except FileNotFoundError:
            mode = 0o666 & ~_umask()  # what open() gives a new file (some writers make 0600 files)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if sync_dir:
        fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_open(path, mode: str = "w", sync_dir: bool = True, **kwargs):
    """``open`` for writing, atomically: ``with atomic_open(p) as fh: fh.write(...)``."""
    if not mode.startswith("w"):
        raise ValueError(f"atomic_open writes a whole file; mode must start with 'w', got {mode!r}")
    if "b" not in mode:
        kwargs.setdefault("encoding", "utf-8")
    with atomic_path(path, sync_dir) as tmp:
        with open(tmp, mode, **kwargs) as fh:
            yield fh


def write_text(path, text: str) -> Path:
    with atomic_open(path, "w", newline="\n") as fh:
        fh.write(text)
    return Path(path)


def write_bytes(path, data: bytes) -> Path:
    with atomic_open(path, "wb") as fh:
        fh.write(data)
    return Path(path)


def read_small_file(path, limit: int, what: str, error) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes; ``error`` (a FlexVAEError class)
    for a missing, special (FIFO, device), oversized or unreadable file. Never blocks on a FIFO."""
    from .errors import shown_path

    shown = shown_path(path)
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise error(f"{what} not found: {shown}") from None
    except OSError as exc:
        raise error(f"cannot read {what} {shown}: {exc.strerror or exc}") from None
    except ValueError:  # a NUL character: no file can have that name
        raise error(f"{what} {shown!r} is not a file name (it holds a NUL character)") from None
    if stat.S_ISDIR(info.st_mode):
        raise error(f"{what} {shown} is a folder, not a file") from None
    if not stat.S_ISREG(info.st_mode):
        raise error(f"{what} {shown} is not a regular file (a FIFO, socket or device?)")
    if info.st_size > limit:
        raise error(f"{what} {shown} is {info.st_size:,} bytes; at most {limit:,} are read")
    try:
        with open(path, "rb") as fh:
            data = fh.read(limit + 1)
    except OSError as exc:
        raise error(f"cannot read {what} {shown}: {exc.strerror or exc}") from None
    if len(data) > limit:
        raise error(f"{what} {shown} is larger than {limit:,} bytes")
    return data


class RunLock:
    """An exclusive lock on a folder, held while one process works in it: ``<folder>/.flexvae.lock``
    with the holder's PID. The OS releases it when the process ends, however it ends, so a
    killed run never blocks the next one. Without fcntl (Windows) nothing is locked."""

    NAME = ".flexvae.lock"

    def __init__(self, folder):
        self.path = Path(folder) / self.NAME
        self._fh = None

    def acquire(self) -> "RunLock":
        """Take the lock, or raise BlockingIOError whose ``holder`` names the other process."""
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not on this platform
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            fh.seek(0)
            exc.holder = fh.read().strip() or "unknown"
            fh.close()
            raise
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        self._fh = fh
        return self

    def release(self) -> None:
        if self._fh is not None:
            self._fh.close()  # closing the descriptor drops the lock
            self._fh = None
