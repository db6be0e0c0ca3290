"""Write scikit-learn's 8x8 handwritten digits as a labelled image folder (no download).

scikit-learn ships the 1797 digits (UCI optical recognition set) inside the package, so
this works offline. Each image is scaled from grey levels 0..16 to 0..255, upscaled to
``--size`` pixels and written as ``OUT/<digit>/<index>.png``; with ``--holdout F`` a
stratified fraction F goes to ``OUT/test/<digit>/`` and the rest to ``OUT/train/<digit>/``,
so a VAE can be trained on ``train`` and probed with ``--input OUT/train --input2 OUT/test``.

    python scripts/make_digits.py data/digits --holdout 0.25
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

FILTERS = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
           "bicubic": Image.Resampling.BICUBIC}


def holdout_mask(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """True for the test images: the same fraction of every class, chosen at random."""
    rng = np.random.default_rng(seed)
    test = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels):
        index = np.flatnonzero(labels == label)
        rng.shuffle(index)
        test[index[: round(fraction * len(index))]] = True
    return test


def write_digits(out: Path, size: int = 16, holdout: float = 0.0, seed: int = 0, resample: str = "bilinear") -> dict:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise SystemExit('scripts/make_digits.py needs scikit-learn: pip install "flexvae[probe]"') from None
    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    labels = digits.target
    test = holdout_mask(labels, holdout, seed) if holdout > 0 else np.zeros(len(labels), dtype=bool)
    counts = {"train": 0, "test": 0}
    for index, (image, label, is_test) in enumerate(zip(images, labels, test)):
        split = "test" if is_test else "train"
        folder = out / split / str(label) if holdout > 0 else out / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        picture = Image.fromarray(image)  # 2-D uint8: grey (L)
        if size != 8:
            picture = picture.resize((size, size), FILTERS[resample])
        picture.save(folder / f"{index:04d}.png")
        counts[split] += 1
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="output folder")
    parser.add_argument("--size", type=int, default=16, help="side length in pixels (default 16)")
    parser.add_argument("--holdout", type=float, default=0.0,
                        help="fraction per class written to OUT/test (default 0: one folder, no split)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the holdout split")
    parser.add_argument("--resample", choices=sorted(FILTERS), default="bilinear", help="upscaling filter")
    args = parser.parse_args()
    counts = write_digits(args.out, args.size, args.holdout, args.seed, args.resample)
    where = f"{args.out}/train and {args.out}/test" if args.holdout > 0 else str(args.out)
    print(f"wrote {counts['train']} + {counts['test']} digit images ({args.size} px) to {where}")


if __name__ == "__main__":
    main()
