"""Are tile seams visible? Tiled reconstruction error along tile borders against elsewhere.

The bundled 32 px photos, upscaled 3x (bicubic) to 96 px images, are reconstructed by a
trained checkpoint whole and in tiles (``--tile`` px, with and without overlap). For each,
the mean absolute error against the input is measured in bands 2 px wide on either side of
every inner tile border and everywhere else; a ratio band / elsewhere near 1 means the seams
add no error (goal: no larger than elsewhere). The same bands are measured on the untiled
reconstruction as a reference for what those positions cost anyway.

    python bench/bench_tiling.py [--ckpt runs/default] [--tile 32] [--overlap 16] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]


def border_mask(size: int, tile: int, overlap: int, width: int = 2) -> torch.Tensor:
    from flexvae.inference.tiling import tile_starts

    mask = torch.zeros(size, dtype=torch.bool)
    for start in tile_starts(size, tile, overlap):
        for edge in (start, start + tile):
            if 0 < edge < size:
                mask[max(0, edge - width):edge + width] = True
    return mask[:, None] | mask[None, :]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", default=str(ROOT / "runs" / "default"))
    parser.add_argument("--tile", type=int, default=32)
    parser.add_argument("--overlap", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from flexvae.checkpoint import load_run
    from flexvae.data import ImageFolder
    from flexvae.inference.tiling import downsampling_factor, reconstruct_tiled

    model = load_run(args.ckpt)
    vae = model.vae
    folder = ImageFolder(ROOT / "assets" / "photos", channels=3, image_size=32)
    x = torch.stack([folder[i]["image"] for i in range(len(folder))])
    x = F.interpolate(x, scale_factor=3, mode="bicubic", align_corners=False).clamp(-1, 1)
    factor = downsampling_factor(vae, model.data_shape)
    size = x.shape[-1]
    print(f"{model.path} (step {model.step}); {len(x)} images of {size} px; {args.threads} threads, "
          f"load {os.getloadavg()[0]:.2f}")
    with torch.no_grad():
        whole = vae.reconstruct(x)
    for overlap in sorted({0, args.overlap}):
        with torch.no_grad():
            tiled = reconstruct_tiled(vae, x, args.tile, overlap, factor)
        band = border_mask(size, args.tile, overlap)
        for name, recon in (("tiled", tiled), ("whole", whole)):
            error = (recon - x).abs().mean(1)  # (B, H, W)
            inside, outside = error[:, band].mean().item(), error[:, ~band].mean().item()
            print(f"tile {args.tile}, overlap {overlap:2d}, {name:5s}: mean |error| at tile borders {inside:.4f}, "
                  f"elsewhere {outside:.4f}, ratio {inside / outside:.3f}")
        print(f"  tiled vs whole: mean |difference| {(tiled - whole).abs().mean().item():.4f}")


if __name__ == "__main__":
    main()
