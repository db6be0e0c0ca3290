"""``flexvae init DIR``: a starter project that trains from any folder.

DIR gets ``config.toml`` (the shipped default config, every key commented, reading images
from ``DIR/images``), ``structures/`` (copies of the default encoder and decoder, to edit)
and an empty ``images/``. Nothing that exists is overwritten.
"""

from __future__ import annotations

from pathlib import Path

from .errors import DataError
from .files import write_text
from .presets import PRESETS

STRUCTURES = ("small_encoder.json", "small_decoder.json")
HEADER = """# A flexvae project (written by `flexvae init`). Put images in images/ and run `flexvae train`
# from this folder; relative paths below are taken from this file's folder first.
"""


def write_starter_project(folder) -> Path:
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise DataError(f"{folder} exists and is not an empty folder; flexvae init writes only into a new or "
                        f"empty folder, so that nothing of yours is overwritten")
    text = (PRESETS / "configs" / "config.toml").read_text(encoding="utf-8")
    old = 'path = "assets/photos"'
    if old not in text:  # the shipped config is what this relies on; say so rather than write a wrong file
        raise DataError(f"the shipped config has no line {old!r} to point at images/")
    write_text(folder / "config.toml", HEADER + text.replace(old, 'path = "images"', 1))
    for name in STRUCTURES:
        write_text(folder / "structures" / name, (PRESETS / "structures" / name).read_text(encoding="utf-8"))
    (folder / "images").mkdir()
    return folder
