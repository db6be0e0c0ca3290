"""What a training run keeps in its directory, and the care taken with it: files are never
deleted (``--fresh`` moves the previous run aside), and a resumed run starts from a directory as the checkpoint
left it (metrics after the checkpoint's step cut, temporary files of a killed write gone)."""

from __future__ import annotations

import csv
import os
import re
import time
from pathlib import Path

from ..checkpoint import CHECKPOINT_DIR, list_checkpoints
from ..config import dump_toml
from ..errors import TrainingError
from ..files import TEMP_NAME, atomic_open, write_text
from ..metrics import METRICS_FILE

CONFIG_FILE = "config.toml"
CONFIG_HEADER = "# The resolved config of this flexvae run (written by flexvae; edits are overwritten)."
SAMPLE_NAME = re.compile(r"step_\d+\.png")
BOARD_DIR, BOARD_FILE = "tensorboard", re.compile(r"events\.out\.tfevents\..+")
PREVIOUS_DIR = "previous"  # where --fresh moves a previous run
OLD_TEMP_NAME = re.compile(r"step_\d+\.safetensors\.tmp-\d+")  # written by flexvae 0.1's checkpoints


def _written_by_flexvae(path: Path) -> bool:
    """Whether a run's config.toml begins as flexvae writes it."""
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            head = fh.read(4096)
    except OSError:
        return False
    # flexvae 0.1 wrote the dump without the header line; it always begins this way
    return head.startswith(CONFIG_HEADER) or head.startswith("[data]\nsource = ")


def adopt_unrecorded_run(folder, run_dir: Path) -> None:
    """A run directory that an older flexvae wrote has no record of its files (outputs.py): when
    its config.toml is flexvae's, its checkpoints, sample grids, metrics.csv and config.toml are
    recorded as they are, so that the run resumes; anything else there stays foreign."""
    from ..outputs import RECORD

    run_dir = Path(run_dir)
    if (run_dir / RECORD).exists() or not _written_by_flexvae(run_dir / CONFIG_FILE):
        return
    checkpoints = list_checkpoints(run_dir) if (run_dir / CHECKPOINT_DIR).is_dir() else []
    folder.adopt([run_dir / CONFIG_FILE, run_dir / METRICS_FILE, *filter(_is_checkpoint, checkpoints),
                  *_ours(run_dir / "samples", SAMPLE_NAME)])


def _is_checkpoint(path: Path) -> bool:
    """Whether a file's safetensors header carries flexvae's checkpoint metadata (the header only)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            return "flexvae" in (fh.metadata() or {})
    except Exception:  # not a safetensors file at all
        return False


def save_run_config(cfg, run_dir: Path, folder=None) -> None:
    """Write ``config.toml``, refusing to replace one that flexvae did not write; with the run
    directory's open output ``folder``, first refuse a metrics.csv or sample grids not of its
    record (a run would append to or replace them)."""
    metrics = Path(run_dir) / METRICS_FILE
    if folder is not None:
        folder.check([metrics, *_ours(Path(run_dir) / "samples", SAMPLE_NAME)])
        if folder.replace and metrics.is_file() and not folder.is_ours(metrics):
            write_text(metrics, "")  # --overwrite: the run starts a metrics.csv of its own in its place
    path = Path(run_dir) / CONFIG_FILE
    if path.exists():
        ours = _written_by_flexvae(path)
        if not ours:
            raise TrainingError(
                f"{path} exists and was not written by flexvae; train.out_dir = {run_dir} would overwrite it. "
                "Choose another train.out_dir (a folder for this run's checkpoints, samples and metrics)")
    write_text(path, f"{CONFIG_HEADER}\n{dump_toml(cfg)}")


def _ours(folder: Path, pattern: re.Pattern) -> list[Path]:
    if not folder.is_dir():
        return []
    return [p for p in folder.iterdir() if p.is_file() and pattern.fullmatch(p.name)]


def set_aside_run_outputs(run_dir: Path) -> str:
    """``--fresh``: move the checkpoints, samples, metrics, TensorBoard events and config of a
    previous run into ``<run>/previous/<date-time>/`` (nothing is deleted; other files stay
    where they are). Says what moved where, or "" when there was nothing."""
    run_dir = Path(run_dir)
    checkpoints = list_checkpoints(run_dir) if (run_dir / CHECKPOINT_DIR).is_dir() else []
    samples = _ours(run_dir / "samples", SAMPLE_NAME)
    events = _ours(run_dir / BOARD_DIR, BOARD_FILE)
    singles = [run_dir / name for name in (METRICS_FILE, CONFIG_FILE) if (run_dir / name).is_file()]
    moving = checkpoints + samples + events + singles
    if not (checkpoints or samples or events or (run_dir / METRICS_FILE).is_file()):
        return ""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = run_dir / PREVIOUS_DIR / stamp
    n = 1
    while target.exists():
        n += 1
        target = run_dir / PREVIOUS_DIR / f"{stamp}-{n}"
    for path in moving:
        destination = target / path.relative_to(run_dir)
        destination.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, destination)
    for name in (CHECKPOINT_DIR, "samples", BOARD_DIR):
        folder = run_dir / name
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
    parts = [f"{len(checkpoints)} checkpoint(s)" if checkpoints else "", f"{len(samples)} sample grid(s)" if samples
             else "", "metrics.csv" if (target / METRICS_FILE).is_file() else "",
             f"{len(events)} TensorBoard file(s)" if events else ""]
    return f"{', '.join(p for p in parts if p)} to {target}"


def tidy_resumed_run(run_dir: Path, step: int) -> None:
    """Before a resumed run goes on from ``step``: cut metrics.csv rows logged after it (a
    killed run logged steps its checkpoint does not hold) and remove temporary files that a
    killed write left behind."""
    run_dir = Path(run_dir)
    for folder in (run_dir, run_dir / CHECKPOINT_DIR, run_dir / "samples"):
        for path in _ours(folder, TEMP_NAME) + _ours(folder, OLD_TEMP_NAME):
            path.unlink(missing_ok=True)
    metrics = run_dir / METRICS_FILE
    if not metrics.is_file():
        return
    with open(metrics, newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    if not rows or rows[0][:1] != ["step"]:
        return
    kept = [rows[0]] + [r for r in rows[1:] if r and _step_of(r[0]) is not None and _step_of(r[0]) <= step]
    if len(kept) != len(rows):
        with atomic_open(metrics, "w", newline="") as fh:
            csv.writer(fh).writerows(kept)


def _step_of(text: str) -> int | None:
    try:
        return int(float(text))
    except ValueError:
        return None


def resume_lines(run_dir: Path, checkpoint: Path, step: int, stored: dict, config: dict) -> list[str]:
    """What a resumed run says first: where it goes on from (the weights of --import-weights at
    step 0), then a note for each setting that differs from the checkpoint's (metadata: untrusted)."""
    imported = stored.get("imported_from")
    if step == 0 and isinstance(imported, dict) and isinstance(imported.get("file"), str):
        layout = imported.get("layout") if isinstance(imported.get("layout"), str) else "unknown"
        lines = [f"starting from the imported weights in {checkpoint} (from {imported['file'][:200]}, "
                 f"{layout[:40]} layout)"]
    else:
        lines = [f"resuming {run_dir} from step {step} ({checkpoint.name})"]
    return lines + [f"note: {line}" for line in changed_settings(stored.get("config"), config)]


# Settings whose change on resume is expected and says nothing
_UNREMARKABLE = {("train", "out_dir"), ("train", "device"), ("data", "num_workers")}


def changed_settings(stored, current: dict, limit: int = 12) -> list[str]:
    """One line for each setting that differs from the config a checkpoint was trained with
    (``stored``: its metadata, untrusted), e.g. 'resuming with train.lr = 0.001 (the checkpoint
    was trained with 0.002)'; at most ``limit`` lines, then a count."""
    if not isinstance(stored, dict):
        return []
    lines = []
    for section, values in current.items():
        old_section = stored.get(section)
        if not isinstance(values, dict) or not isinstance(old_section, dict):
            continue
        for key, value in values.items():
            if (section, key) in _UNREMARKABLE or key not in old_section or old_section[key] == value:
                continue
            if isinstance(value, (list, tuple)) and list(value) == old_section[key]:
                continue
            lines.append(f"resuming with {section}.{key} = {_short(value)} (the checkpoint was trained with "
                         f"{_short(old_section[key])})")
    return lines if len(lines) <= limit else lines[:limit] + [f"and {len(lines) - limit} more changed settings"]


def _short(value) -> str:
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= 60 else text[:50] + "..."


def check_resumable(run_dir: Path, checkpoint: Path, stored: dict, now: dict) -> None:
    """A run directory's last checkpoint (metadata ``stored``) must be of the model the config
    builds now (``now``): the same classes, structures and data shape."""
    if stored.get("classes") != now.get("classes"):
        raise TrainingError(
            f"{run_dir} holds a run trained on {len(stored.get('classes') or [])} label classes "
            f"({checkpoint.name}), but data.labels now gives {len(now.get('classes') or [])}"
            + (f" ({', '.join(now['classes'][:10])})" if now.get("classes") else "")
            + "; use --fresh to start over or choose another train.out_dir")
    for key in ("encoder", "decoder", "data_shape"):
        if stored.get(key) != now[key]:
            raise TrainingError(
                f"{run_dir} holds a run with a different {key.replace('_', ' ')} "
                f"({checkpoint.name}); use --fresh to start over or choose another train.out_dir")
