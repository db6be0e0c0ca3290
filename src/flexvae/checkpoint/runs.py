"""A run directory's checkpoints: names, listing, the latest, pruning."""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import CheckpointError, shown_path

CHECKPOINT_DIR = "checkpoints"
_NAME_RE = re.compile(r"step_(\d+)\.safetensors")


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}.safetensors"


def run_directory(path: str | os.PathLike) -> Path:
    """The run directory of a checkpoint file, of its ``checkpoints`` folder, or itself."""
    path = Path(path)
    if path.is_file():
        return path.parent.parent if path.parent.name == CHECKPOINT_DIR else path.parent
    return path.parent if path.name == CHECKPOINT_DIR else path


def _checkpoint_dir(run_dir: Path) -> Path:
    """``<run_dir>/checkpoints``, or ``run_dir`` itself when given that folder."""
    sub = run_dir / CHECKPOINT_DIR
    return sub if sub.is_dir() else run_dir


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Checkpoint files of a run, oldest (lowest step) first."""
    folder = _checkpoint_dir(Path(run_dir))
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = _NAME_RE.fullmatch(p.name)
        if m and p.is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint file itself, or the latest checkpoint of a run directory."""
    path = Path(path)
    try:
        exists, folder = path.exists(), path.is_dir()
    except (OSError, ValueError) as exc:  # a name no file can have
        cause = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not a usable path"
        raise CheckpointError(f"{shown_path(path)}: {cause}") from None
    if not exists:
        raise CheckpointError(f"{shown_path(path)}: no such checkpoint file or run directory")
    if not folder:
        return path
    found = list_checkpoints(path)
    if not found and any((folder / "config.json").is_file() for folder in (path, path / "vae")):
        raise CheckpointError(f"{path} looks like a diffusers model folder, not a flexvae run; convert it once with "
                              f"`python train.py --import-weights {path} --output runs/NAME`, then use --ckpt runs/NAME")
    if not found:
        raise CheckpointError(
            f"no checkpoint found in {path} (looked for {CHECKPOINT_DIR}/step_*.safetensors)"
        )
    return found[-1]


def prune_checkpoints(run_dir: str | os.PathLike, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` checkpoints; returns the deleted files."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be at least 1, got {keep_last}")
    from ..outputs import folder_for

    doomed = list_checkpoints(run_dir)[:-keep_last]
    # in an open run directory, only checkpoints of its record (never a file someone put there)
    doomed = [p for p in doomed if (folder := folder_for(p)) is None or folder.is_ours(p)]
    for p in doomed:
        p.unlink(missing_ok=True)
    return doomed
