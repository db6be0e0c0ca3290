"""Small generated image folders and the tiny config's command-line arguments."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny_test.toml"


def make_images(root: Path, n: int = 6) -> Path:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(root / f"{i}.png")
    return root


def tiny(images: Path, run: Path, *extra) -> list:
    return ["-c", TINY, "--set", f"train.out_dir={run}", "--set", f"data.path={images}",
            "--set", "data.num_workers=0", "--set", "train.device=cpu", *extra]
