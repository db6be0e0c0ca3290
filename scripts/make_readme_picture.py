"""Make docs/img/default_run.png: the default run's sample grids at steps 200 and 600 (its
last, drawn from the prior fitted at the end of the run), stacked and enlarged three times.

    python scripts/make_readme_picture.py [RUN]    # RUN: a finished default run (default runs/default)

Train the run first with `python train.py -t` (the README's first command).
"""

from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    run = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "runs" / "default"
    grids = [Image.open(run / "samples" / f"step_{step:08d}.png").convert("RGB") for step in (200, 600)]
    gap = 2
    width = max(g.width for g in grids)
    picture = Image.new("RGB", (width, sum(g.height for g in grids) + gap), "white")
    picture.paste(grids[0], (0, 0))
    picture.paste(grids[1], (0, grids[0].height + gap))
    picture = picture.resize((picture.width * 3, picture.height * 3), Image.NEAREST)
    out = ROOT / "assets" / "readme" / "default_run.png"
    picture.save(out)
    print(f"wrote {out} ({picture.width} x {picture.height})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
