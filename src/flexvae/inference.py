"""Modes that use a trained model on a folder: reconstruct (-i), encode (-e), decode (-d).

Preprocessing is deterministic (no flip, no sampling unless asked). Outputs mirror the
input tree; every output path is checked to stay inside the output folder.
"""

from __future__ import annotations

import csv
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import torch

from .data import ImageFolder, SkipLog, find_images, make_loader, save_image
from .errors import DataError
from .losses import psnr

LATENT_SUFFIXES = {"safetensors": ".safetensors", "npy": ".npy"}
MANIFEST = "manifest.jsonl"


def safe_output_path(out_root: Path, relpath: str, suffix: str | None = None) -> Path:
    """``out_root / relpath`` (suffix replaced), refusing anything that would land outside."""
    rel = PurePosixPath(relpath)
    if rel.is_absolute() or ".." in rel.parts:
        raise DataError(f"refusing output path outside {out_root}: {relpath}")
    target = out_root.joinpath(*rel.parts)
    if suffix is not None:
        target = target.with_suffix(suffix)
    root = out_root.resolve()
    if root not in target.resolve().parents:
        raise DataError(f"refusing output path outside {out_root}: {relpath}")
    return target


def _folder_loader(ctx, input_dir, batch_size, num_workers, device, paths=None):
    dataset = ImageFolder(input_dir, channels=ctx.data_shape[0], image_size=ctx.data_shape[1],
                          resize_filter=ctx.resize_filter, pad_to_square=ctx.pad_to_square, paths=paths)
    loader = make_loader(dataset, batch_size, shuffle=False, num_workers=num_workers,
                         device_type=torch.device(device).type)
    return dataset, loader


@dataclass
class ModelContext:
    """A loaded model plus the preprocessing its training used."""

    vae: torch.nn.Module
    data_shape: tuple
    resize_filter: str = "bilinear"
    pad_to_square: bool = False

    @classmethod
    def from_checkpoint(cls, model, cfg, plan):
        return cls(model, tuple(plan.data_shape), cfg.data.resize_filter, cfg.data.pad_to_square)


@torch.no_grad()
def reconstruct_folder(ctx: ModelContext, input_dir, output_dir, *, batch_size=16, num_workers=0,
                       side_by_side=False, device="cpu", progress=True) -> dict:
    """Reconstruct every image; write PNGs with the same relative paths and a metrics CSV."""
    from pytorch_msssim import ssim
    from tqdm import tqdm

    from .losses import ssim_window

    out_root = Path(output_dir)
    out_root.mkdir(parents=True, exist_ok=True)
    dataset, loader = _folder_loader(ctx, input_dir, batch_size, num_workers, device)
    skips = SkipLog()
    rows = []
    for batch in tqdm(loader, disable=not progress, desc="reconstruct"):
        skips.add(batch.failures)
        if batch.images is None:
            continue
        images = batch.images.to(device)
        recon = ctx.vae.reconstruct(images)
        scores = psnr(recon, images).tolist()
        window = ssim_window(tuple(images.shape[2:]))
        ssims = ssim((recon.float() + 1) / 2, (images.float() + 1) / 2, data_range=1.0,
                     win_size=window, size_average=False).tolist()
        for rel, original, output, p, s in zip(batch.paths, images, recon, scores, ssims):
            target = safe_output_path(out_root, rel, ".png")
            save_image(torch.cat([original, output], dim=-1) if side_by_side else output, target)
            rows.append({"path": rel, "psnr": p, "ssim": s})
    with open(out_root / "metrics.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["path", "psnr", "ssim"])
        writer.writeheader()
        writer.writerows({"path": r["path"], "psnr": f"{r['psnr']:.4f}", "ssim": f"{r['ssim']:.5f}"} for r in rows)
        if rows:
            writer.writerow({"path": "MEAN", "psnr": f"{np.mean([r['psnr'] for r in rows]):.4f}",
                             "ssim": f"{np.mean([r['ssim'] for r in rows]):.5f}"})
    return {
        "images": len(rows), "skipped": skips.count,
        "psnr": float(np.mean([r["psnr"] for r in rows])) if rows else float("nan"),
        "ssim": float(np.mean([r["ssim"] for r in rows])) if rows else float("nan"),
    }


def save_latent(tensor: torch.Tensor, path: Path, fmt: str) -> None:
    """One latent per file, written atomically; safetensors key 'latent'."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        if fmt == "npy":
            with open(tmp, "wb") as fh:
                np.save(fh, tensor.cpu().numpy())
        else:
            save_file({"latent": tensor.contiguous().cpu()}, str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_latent(path: Path) -> torch.Tensor:
    """Read a latent written by ``save_latent`` (never unpickles: allow_pickle=False)."""
    from safetensors.torch import load_file

    if path.suffix == ".npy":
        return torch.from_numpy(np.load(path, allow_pickle=False))
    tensors = load_file(str(path))
    if "latent" not in tensors:
        raise DataError(f"{path}: no 'latent' tensor (found {', '.join(tensors) or 'nothing'})")
    return tensors["latent"]


def read_manifest(path: Path) -> dict[str, dict]:
    entries = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                entry = json.loads(line)
                entries[entry["path"]] = entry
    return entries


@torch.no_grad()
def encode_folder(ctx: ModelContext, input_dir, output_dir, *, fmt="safetensors", sample=False,
                  batch_size=32, num_workers=0, device="cpu", seed=0, progress=True) -> dict:
    """Encode every image to a latent file mirroring the tree; a manifest accounts for each input.

    Re-running skips inputs already encoded (status ok and file present). The latents'
    standard deviation gives the suggested scaling factor 1/std.
    """
    from tqdm import tqdm

    out_root = Path(output_dir)
    out_root.mkdir(parents=True, exist_ok=True)
    suffix = LATENT_SUFFIXES[fmt]
    manifest_path = out_root / MANIFEST
    previous = read_manifest(manifest_path)

    input_root = Path(input_dir)
    todo = []
    images = find_images(input_root)
    for path in images:
        rel = path.relative_to(input_root).as_posix()
        done = previous.get(rel, {}).get("status") == "ok" and safe_output_path(out_root, rel, suffix).exists()
        if not done:
            todo.append(path)
    entries = dict(previous)
    generator = torch.Generator(device=device).manual_seed(seed)
    total, total_sq, count = 0.0, 0.0, 0
    started = time.perf_counter()
    skips = SkipLog()
    if todo:
        _, loader = _folder_loader(ctx, input_root, batch_size, num_workers, device, paths=todo)
        for batch in tqdm(loader, disable=not progress, desc="encode"):
            skips.add(batch.failures)
            for rel, reason in batch.failures:
                entries[rel] = {"path": rel, "status": "failed", "reason": reason}
            if batch.images is None:
                continue
            latents = ctx.vae.encode_latents(batch.images.to(device), sample=sample, generator=generator)
            latents = latents.float().cpu()
            total += latents.sum().item()
            total_sq += latents.pow(2).sum().item()
            count += latents.numel()
            for rel, latent in zip(batch.paths, latents):
                target = safe_output_path(out_root, rel, suffix)
                save_latent(latent, target, fmt)
                entries[rel] = {"path": rel, "status": "ok", "file": target.relative_to(out_root).as_posix(),
                                "shape": list(latent.shape)}
    _write_manifest(manifest_path, entries)
    summary = {
        "encoded": len(todo) - skips.count,
        "already_done": len(images) - len(todo),
        "failed": sum(1 for e in entries.values() if e["status"] != "ok"),
        "seconds": time.perf_counter() - started,
    }
    if count > 1:
        mean = total / count
        std = max((total_sq / count - mean * mean), 0.0) ** 0.5
        raw_std = std / ctx.vae.scaling_factor
        summary.update({"latent_mean": mean, "latent_std": std,
                        "suggested_scaling_factor": 1.0 / raw_std if raw_std > 0 else float("nan")})
        stats_path = out_root / "latent_stats.json"
        stats_path.write_text(json.dumps({**summary, "scaling_factor_used": ctx.vae.scaling_factor}, indent=2))
    return summary


def _write_manifest(path: Path, entries: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        for rel in sorted(entries):
            fh.write(json.dumps(entries[rel]) + "\n")
    os.replace(tmp, path)


@torch.no_grad()
def decode_folder(ctx: ModelContext, input_dir, output_dir, *, batch_size=32, device="cpu", progress=True) -> dict:
    """Decode every latent file (.safetensors/.npy) under ``input_dir`` to a PNG at the same relative path."""
    from tqdm import tqdm

    in_root, out_root = Path(input_dir), Path(output_dir)
    if not in_root.is_dir():
        raise DataError(f"latent folder not found: {in_root}")
    files = sorted(p for p in in_root.rglob("*") if p.suffix in (".safetensors", ".npy") and p.is_file()
                   and not p.name.startswith("."))
    if not files:
        raise DataError(f"no latent files (.safetensors or .npy) under {in_root}")
    expected = tuple(ctx.vae.latent_shape)
    done, failed = 0, []
    for start in tqdm(range(0, len(files), batch_size), disable=not progress, desc="decode"):
        chunk, tensors = [], []
        for path in files[start:start + batch_size]:
            try:
                latent = load_latent(path)
            except Exception as exc:  # unreadable file: report, go on
                failed.append((path, str(exc)))
                continue
            if tuple(latent.shape) != expected:
                failed.append((path, f"latent shape {tuple(latent.shape)}, the model expects {expected}"))
                continue
            chunk.append(path)
            tensors.append(latent)
        if not tensors:
            continue
        images = ctx.vae.to_image(ctx.vae.decode_latents(torch.stack(tensors).to(device).float()))
        for path, image in zip(chunk, images):
            rel = path.relative_to(in_root).as_posix()
            save_image(image, safe_output_path(out_root, rel, ".png"))
            done += 1
    for path, reason in failed:
        print(f"warning: skipped {path}: {reason}")
    return {"decoded": done, "failed": len(failed)}
