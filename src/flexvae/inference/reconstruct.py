"""-i: reconstruct every image with PSNR/SSIM per image."""

from __future__ import annotations

import csv
import json

import numpy as np
import torch

from ..checkpoint import LoadedModel
from ..data import SkipLog, save_image
from ..errors import DataError
from ..files import atomic_open, write_text
from ..metrics import psnr, ssim
from .paths import check_folders, folder_loader, input_root, output_names, safe_output_path


@torch.no_grad()
def reconstruct_folder(ctx: LoadedModel, input_dir, output_dir, *, batch_size=16, num_workers=0,
                       side_by_side=False, device="cpu", progress=True) -> dict:
    """Reconstruct every image; write PNGs with the same relative paths and a metrics CSV."""
    from tqdm import tqdm

    out_root = check_folders(input_dir, output_dir)
    root, single = input_root(input_dir)
    dataset, loader = folder_loader(ctx, root, batch_size, num_workers, device, paths=single)
    out_root.mkdir(parents=True, exist_ok=True)
    names = output_names(dataset.relpaths, ".png")
    skips = SkipLog()
    skips.add(dataset.excluded)
    rows = []
    for batch in tqdm(loader, disable=not progress, desc="reconstruct"):
        skips.add(batch.failures)
        if batch.images is None:
            continue
        images = batch.images.to(device)
        recon = ctx.vae.reconstruct(images)
        scores = psnr(recon, images).tolist()
        ssims = ssim(recon, images).tolist()
        for rel, original, output, p, s in zip(batch.paths, images, recon, scores, ssims):
            target = safe_output_path(out_root, names[rel])
            save_image(torch.cat([original, output], dim=-1) if side_by_side else output, target)
            rows.append({"path": rel, "psnr": p, "ssim": s})
    write_text(out_root / "made_by.json", json.dumps(ctx.provenance(), indent=2) + "\n")  # all redone each run
    with atomic_open(out_root / "metrics.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["path", "psnr", "ssim"])
        writer.writeheader()
        writer.writerows({"path": r["path"], "psnr": f"{r['psnr']:.4f}", "ssim": f"{r['ssim']:.5f}"} for r in rows)
        if rows:
            writer.writerow({"path": "MEAN", "psnr": f"{np.mean([r['psnr'] for r in rows]):.4f}",
                             "ssim": f"{np.mean([r['ssim'] for r in rows]):.5f}"})
    if not rows:
        raise DataError(f"not one of the {len(dataset) + len(dataset.excluded)} image files under {input_dir} "
                        f"could be read ({skips.count} skipped, listed above)")
    return {
        "images": len(rows), "skipped": skips.count,
        "psnr": float(np.mean([r["psnr"] for r in rows])) if rows else float("nan"),
        "ssim": float(np.mean([r["ssim"] for r in rows])) if rows else float("nan"),
    }
