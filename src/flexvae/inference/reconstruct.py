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
from ..fits import refuse_unless_fits
from .paths import folder_loader, in_output_folder, input_root, native_batches, output_names, safe_output_path


def reconstruct_folder(ctx: LoadedModel, input_dir, output_dir, *, overwrite: bool = False, **options) -> dict:
    """Reconstruct every image; write PNGs with the same relative paths and a metrics CSV.
    Files in ``output_dir`` that flexvae did not write are never replaced (the call stops before
    writing anything), unless ``overwrite`` (outputs.py). ``options``: see ``_reconstruct``."""
    return in_output_folder(_reconstruct, ctx, input_dir, output_dir, overwrite, options)


@torch.no_grad()
def _reconstruct(ctx: LoadedModel, input_dir, out_root, folder, *, batch_size=16, num_workers=0,
                 side_by_side=False, device="cpu", progress=True, native_size=False,
                 tile: int | None = None, overlap: int | None = None) -> dict:
    """The work of ``reconstruct_folder`` inside its opened output folder.

    ``native_size``: each image at its own resolution, one at a time (centre-cropped to the
    nearest size the model takes, e.g. a multiple of its downsampling), for fully
    convolutional models; a model that cannot take another size is a DataError.
    ``tile``: each image at its own resolution (cropped to a multiple of the model's
    downsampling), encoded and decoded in overlapping tiles (tiling.py)."""
    from tqdm import tqdm

    root, single = input_root(input_dir)
    dataset, loader = folder_loader(ctx, root, batch_size, num_workers, device, paths=single)
    names = output_names(dataset.relpaths, ".png")
    refuse_unless_fits(ctx.plan, min(batch_size, len(dataset)), device, training=False, hint="lower encode.batch_size")
    folder.check([out_root / "made_by.json", out_root / "metrics.csv",
                  *(safe_output_path(out_root, name) for name in names.values())])
    out_root.mkdir(parents=True, exist_ok=True)
    skips = SkipLog()
    skips.add(dataset.excluded)
    rows = []
    if tile is not None:
        from .tiling import prepare_tiling, tiled_batches, tiled_reconstructor

        tiling = prepare_tiling(ctx, tile, overlap)
        batches = tiled_batches(ctx, dataset, tiling.factor)
        run = tiled_reconstructor(ctx.vae, tiling.tile, tiling.overlap, tiling.factor, tiling.exact)
    else:
        from .tiling import FallBackToTiles

        batches = _native_batches(ctx, dataset) if native_size else loader
        run = FallBackToTiles(ctx, ctx.vae.reconstruct, "a batch")
    per_image = native_size or tile is not None
    for batch in tqdm(batches, disable=not progress, desc="reconstruct", total=len(dataset) if per_image else None):
        skips.add(batch.failures)
        if batch.images is None:
            continue
        images = batch.images.to(device)
        recon = run(images) if batch.labels is None else run(images, batch.labels.to(device))
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


def _native_batches(ctx, dataset):
    """Batches of one image each, at the image's own size cropped to what the model takes."""
    sizes: dict = {}

    def accepted(h, w):
        if (h, w) not in sizes:
            sizes[(h, w)] = _accepted_size(ctx, h, w)
        return sizes[(h, w)]

    return native_batches(ctx, dataset, accepted)


def _accepted_size(ctx, h: int, w: int) -> tuple[int, int]:
    """The largest centre crop of h x w, by multiples of 1, 2, 4 ... 64, that the model's
    structures reproduce (traced on the meta device); DataError when there is none."""
    from ..build import plan_vae
    from ..errors import StructureError

    channels, reason = ctx.data_shape[0], None
    likelihood = ctx.vae.likelihood
    out_channels = likelihood.param_channels(channels) if likelihood is not None and likelihood.proper else None

    def fits(size) -> bool:
        try:
            plan_vae(ctx.plan.encoder.specs, ctx.plan.decoder.specs, (channels, *size), ctx.vae.latent,
                     output_channels=out_channels, output_reason="the model's likelihood")
            return True
        except StructureError as exc:
            nonlocal reason
            reason = reason or str(exc)
            return False

    for multiple in (1, 2, 4, 8, 16, 32, 64):
        size = (h - h % multiple, w - w % multiple)
        if min(size) < 1:
            break
        # a fully convolutional model also takes the next size up; one that takes a single size does not
        if fits(size) and fits((size[0] + multiple, size[1] + multiple)):
            return size
    raise DataError(f"--native-size: this model cannot reconstruct {h} x {w} images (it is not fully "
                    f"convolutional, or needs another size): {reason}")
