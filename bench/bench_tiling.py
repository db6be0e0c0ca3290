"""Are tile seams visible? Tiled against untiled output, cross-faded and exact.

1. Two local models (the shipped small structures without their attention blocks, and without
   GroupNorm too; random weights, seeded) reconstructs 128 px images (the
   bundled photos, upscaled) whole and in 64 px tiles: cross-faded with 8 and 16 px overlap,
   and exact (the overlap chosen from the receptive field, GroupNorm statistics over the whole
   image). For each: mean |tiled - whole|, the mean over the columns at inner tile borders and
   the ratio of the worst column to the median column (a seam shows as a spike).
2. A trained checkpoint (``--ckpt``, default runs/default if it exists), which has attention:
   approximate whichever way; the same figures, plus the error against the input in bands
   2 px wide around inner tile borders against elsewhere.

    python bench/bench_tiling.py [--ckpt runs/default] [--tile 64] [--images 16] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import common

ROOT = Path(__file__).resolve().parents[1]


def border_columns(size: int, tile: int, overlap: int, width: int = 2) -> torch.Tensor:
    from flexvae.inference.tiling import tile_starts

    mask = torch.zeros(size, dtype=torch.bool)
    for start in tile_starts(size, tile, overlap):
        for edge in (start, start + tile):
            if 0 < edge < size:
                mask[max(0, edge - width):edge + width] = True
    return mask


def seam_figures(tiled: torch.Tensor, whole: torch.Tensor, columns: torch.Tensor) -> str:
    diff = (tiled - whole).abs()
    per_column = diff.mean(dim=(0, 1, 2))  # (W,)
    median = per_column.median().item()
    spike = per_column.max().item() / median if median > 0 else float("nan")
    return (f"mean |tiled - whole| {diff.mean().item():.2e}, max {diff.max().item():.2e}, at tile-border columns "
            f"{per_column[columns].mean().item():.2e}, worst column / median column {spike:.1f}")


def photos(size: int) -> torch.Tensor:
    from flexvae.data import ImageFolder

    folder = ImageFolder(ROOT / "assets" / "photos", channels=3, image_size=32)
    x = torch.stack([folder[i]["image"] for i in range(len(folder))])
    return F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False).clamp(-1, 1)


def local_model(norms: bool = True):
    """The small structures without attention; ``norms`` False: also without GroupNorm (each
    residual block becomes conv3x3 + SiLU), the purely convolutional case."""
    from flexvae.build import build_vae

    def local(name):
        tokens = [t for t in json.loads((ROOT / "structures" / name).read_text()) if not t.startswith("VAEA")]
        if norms:
            return tokens
        out = []
        for token in tokens:
            if token.startswith("VAERB"):
                out += [f"C2d_?_{token.split('_')[2]}_3_1_1", "SiLU"]
            elif not token.startswith("GN"):
                out.append(token)
        return out

    torch.manual_seed(0)
    return build_vae(local("small_encoder.json"), local("small_decoder.json"), (3, 32, 32)).eval(), 4


def compare(vae, x, factor: int, tile: int, label: str) -> None:
    from flexvae.inference.tiling import reconstruct_tiled, resolve_tiling

    with torch.no_grad():
        whole = vae.reconstruct(x)
    tiling = resolve_tiling(vae, (3, 32, 32), tile, None)
    runs = [(f"cross-faded, overlap {o:2d}", o, False) for o in (8, 16)]
    if all(tiling.exact.values()):
        runs.append((f"exact, overlap {tiling.overlap:2d}", tiling.overlap, None))
    else:
        print(f"  ({label}: {tiling.note})")
    for name, overlap, exact in runs:
        with torch.no_grad():
            tiled = reconstruct_tiled(vae, x, tile, overlap, factor, exact)
        print(f"{label}, tile {tile}, {name}: {seam_figures(tiled, whole, border_columns(x.shape[-1], tile, overlap))}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", default=str(ROOT / "runs" / "default"))
    parser.add_argument("--tile", type=int, default=64)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    began = time.perf_counter()
    common.start("bench_tiling", args.threads)
    x = photos(args.size)[:args.images]
    print(f"{len(x)} images of {args.size} px")
    for norms, label in ((False, "convolutions only"), (True, "convolutions + GroupNorm + residual blocks")):
        vae, factor = local_model(norms)
        compare(vae, x, factor, args.tile, label)
    if Path(args.ckpt).exists():
        from flexvae.checkpoint import load_run
        from flexvae.inference.tiling import downsampling_factor

        model = load_run(args.ckpt)
        compare(model.vae, x, downsampling_factor(model.vae, model.data_shape), args.tile,
                f"{Path(args.ckpt).name} (step {model.step})")
    common.finish(began)


if __name__ == "__main__":
    main()
