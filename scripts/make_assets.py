"""Cut the bundled sample photographs in ``assets/photos/`` out of scikit-image.

The crops give examples, tests and quick experiments a few dozen real
photographs without a download. Only pictures that scikit-image ships inside
the package (no fetch needed) and documents as CC0 are used; see
``assets/photos/SOURCES.md``.

Run from the repository root:

    python scripts/make_assets.py

The output is deterministic: each source is downscaled so its shorter side is
``SHORT_SIDE`` pixels, then cut on a fixed overlapping grid; crops that are
nearly flat (little contrast, e.g. plain background) are left out.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data as skdata

SOURCES = ("chelsea", "coffee")  # skimage.data function names, both CC0
SHORT_SIDE = 176  # downscale target: a 64 px crop shows roughly a third of the scene
CROP = 64
STRIDE = 32
MIN_STD = 12.0  # grey-level standard deviation below which a crop counts as flat

OUT = Path(__file__).resolve().parent.parent / "assets" / "photos"


def downscale(picture: np.ndarray) -> Image.Image:
    img = Image.fromarray(picture).convert("RGB")
    scale = SHORT_SIDE / min(img.size)
    size = (round(img.width * scale), round(img.height * scale))
    return img.resize(size, Image.Resampling.LANCZOS)


def crops(img: Image.Image):
    for top in range(0, img.height - CROP + 1, STRIDE):
        for left in range(0, img.width - CROP + 1, STRIDE):
            piece = img.crop((left, top, left + CROP, top + CROP))
            if np.asarray(piece.convert("L"), dtype=np.float32).std() >= MIN_STD:
                yield piece


def main() -> None:
    total = 0
    for name in SOURCES:
        folder = OUT / name
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob("*.png"):
            old.unlink()
        count = 0
        for count, piece in enumerate(crops(downscale(getattr(skdata, name)())), start=1):
            piece.save(folder / f"{count:03d}.png", optimize=True)
        print(f"{name}: {count} crops")
        total += count
    size = sum(p.stat().st_size for p in OUT.rglob("*.png"))
    print(f"{total} crops, {size / 1024:.0f} KiB in {OUT.name}/")


if __name__ == "__main__":
    main()
