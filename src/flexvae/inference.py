"""Modes that use a trained model on a folder: reconstruct (-i), encode (-e), decode (-d).

Preprocessing is deterministic (no flip, no sampling unless asked). Outputs mirror the
input tree; every output path is checked to stay inside the output folder.
"""

from __future__ import annotations

import csv
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path, PurePosixPath

import numpy as np
import torch

from .checkpoint import LoadedModel
from .data import ImageFolder, SkipLog, find_images, make_loader, save_image
from .errors import DataError
from .files import atomic_open, atomic_path, write_text
from .metrics import psnr, ssim

LATENT_SUFFIXES = {"safetensors": ".safetensors", "npy": ".npy"}
CODES_SUFFIX = ".codes.npy"  # npy format: a discrete latent's integer codes beside its latent file
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


def check_folders(input_dir, output_dir, flag: str = "--output") -> Path:
    """The output folder, refused when it would overwrite or re-read the user's files: the
    input folder itself, a folder inside the input (the next run would read its own outputs),
    a folder holding the input, or an existing file."""
    source, out = Path(input_dir).resolve(), Path(output_dir).resolve()
    if out.exists() and not out.is_dir():
        raise DataError(f"{flag} {output_dir} is an existing file; name a folder for the outputs")
    if out == source:
        raise DataError(f"{flag} {output_dir} is the input folder: its files would be overwritten; "
                        f"choose another output folder")
    if source in out.parents:
        raise DataError(f"{flag} {output_dir} is inside the input folder {input_dir}: a later run would read "
                        f"its own outputs as inputs; choose a folder outside it")
    if source.is_dir() and out in source.parents:
        raise DataError(f"{flag} {output_dir} holds the input folder {input_dir}: outputs could overwrite "
                        f"inputs; choose a folder beside it")
    return Path(output_dir)


def output_names(relpaths, suffix: str) -> dict[str, str]:
    """Relative output path for each input: its suffix replaced by ``suffix``, except where two
    inputs would share that name (``x.png`` and ``x.jpg``): those keep their own suffix and get
    ``suffix`` appended (``x.png.png``, ``x.jpg.png``), so no output overwrites another."""
    plain = {rel: PurePosixPath(rel).with_suffix(suffix).as_posix() for rel in relpaths}
    counts = Counter(plain.values())
    return {rel: name if counts[name] == 1 else rel + suffix for rel, name in plain.items()}


def _folder_loader(ctx, input_dir, batch_size, num_workers, device, paths=None):
    dataset = ImageFolder(input_dir, channels=ctx.data_shape[0], image_size=ctx.data_shape[1],
                          resize_filter=ctx.resize_filter, pad_to_square=ctx.pad_to_square, paths=paths)
    loader = make_loader(dataset, batch_size, shuffle=False, num_workers=num_workers,
                         device_type=torch.device(device).type)
    return dataset, loader


@torch.no_grad()
def reconstruct_folder(ctx: LoadedModel, input_dir, output_dir, *, batch_size=16, num_workers=0,
                       side_by_side=False, device="cpu", progress=True) -> dict:
    """Reconstruct every image; write PNGs with the same relative paths and a metrics CSV."""
    from tqdm import tqdm

    out_root = check_folders(input_dir, output_dir)
    dataset, loader = _folder_loader(ctx, input_dir, batch_size, num_workers, device)
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


def codes_path(path: Path) -> Path:
    """Where the npy format keeps a latent's integer codes: ``x.npy`` -> ``x.codes.npy``."""
    return path.with_name(path.stem + CODES_SUFFIX)


def save_latent(tensor: torch.Tensor, path: Path, fmt: str, codes: torch.Tensor | None = None) -> None:
    """One latent per file, written atomically; safetensors key 'latent', plus 'codes' (int64)
    for discrete latents. The npy format writes the codes to ``<name>.codes.npy`` first."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "npy":
        if codes is not None:
            _atomic_npy(codes.long().cpu().numpy(), codes_path(path))
        _atomic_npy(tensor.cpu().numpy(), path)
        return
    tensors = {"latent": tensor.contiguous().cpu()}
    if codes is not None:
        tensors["codes"] = codes.long().contiguous().cpu()
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp))


def _atomic_npy(array: np.ndarray, path: Path) -> None:
    with atomic_open(path, "wb") as fh:
        np.save(fh, array)


def load_latent_file(path: Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(latent, integer codes or None) written by ``save_latent`` (never unpickles)."""
    from safetensors.torch import load_file

    if path.suffix == ".npy":
        latent = torch.from_numpy(np.load(path, allow_pickle=False))
        extra = codes_path(path)
        return latent, torch.from_numpy(np.load(extra, allow_pickle=False)) if extra.is_file() else None
    tensors = load_file(str(path))
    if "latent" not in tensors:
        raise DataError(f"{path}: no 'latent' tensor (found {', '.join(tensors) or 'nothing'})")
    return tensors["latent"], tensors.get("codes")


def load_latent(path: Path) -> torch.Tensor:
    """Read a latent written by ``save_latent`` (never unpickles: allow_pickle=False)."""
    return load_latent_file(path)[0]


def read_manifest(path: Path) -> dict[str, dict]:
    """Entries by input path; a later line for the same input wins. Lines that are not
    entries (a damaged file) are reported and ignored, so their inputs are done again."""
    entries, bad = {}, []
    if path.exists():
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except (json.JSONDecodeError, RecursionError, ValueError):
                entry = None
            if isinstance(entry, dict) and isinstance(entry.get("path"), str) and "status" in entry:
                entries[entry["path"]] = entry
            else:
                bad.append(number)
    if bad:
        print(f"warning: {path}: ignored {len(bad)} damaged line(s) (first: line {bad[0]}); "
              f"their inputs are encoded again", file=sys.stderr)
    return entries


@torch.no_grad()
def encode_folder(ctx: LoadedModel, input_dir, output_dir, *, fmt="safetensors", sample=False,
                  batch_size=32, num_workers=0, device="cpu", seed=0, progress=True, dist=None) -> dict:
    """Encode every image to a latent file mirroring the tree; a manifest accounts for each input.

    Re-running skips inputs already encoded (status ok and file present); an interrupted run
    keeps the manifest of what it finished. The latents' standard deviation gives the
    suggested scaling factor 1/std. Under torchrun (``dist``), process r of N encodes every
    N-th remaining image and rank 0 merges the per-process manifests into one.
    """
    from .train.distributed import DistInfo, barrier, sum_across

    dist = dist or DistInfo()
    out_root = check_folders(input_dir, output_dir)
    input_root = Path(input_dir)
    excluded: list[tuple[str, str]] = []
    images = find_images(input_root, excluded)
    out_root.mkdir(parents=True, exist_ok=True)
    suffix = LATENT_SUFFIXES[fmt]
    manifest_path = out_root / MANIFEST
    previous = read_manifest(manifest_path)
    todo = []
    names = output_names([path.relative_to(input_root).as_posix() for path in images], suffix)
    for path in images:
        rel = path.relative_to(input_root).as_posix()
        done = previous.get(rel, {}).get("status") == "ok" and safe_output_path(out_root, names[rel]).exists()
        if not done:
            todo.append(rel)  # relative to input_root: ImageFolder joins it to its (absolute) root
    pending = len(todo)
    todo = todo[dist.rank::dist.world_size]
    if len(todo) <= 2 * batch_size:
        num_workers = 0  # starting worker processes costs more than a couple of batches
    own_manifest = manifest_path if not dist.enabled else out_root / f".manifest.rank{dist.rank}.jsonl"
    entries = dict(previous) if not dist.enabled else {}
    generator = torch.Generator(device=device).manual_seed(seed)
    stats = [0.0, 0.0, 0, 0]  # latent values' sum, sum of squares and count; images encoded
    started = time.perf_counter()
    skips = SkipLog()
    if dist.is_main:
        skips.add(excluded)
    try:
        if todo:
            _encode_batches(ctx, input_root, out_root, todo, names, entries, skips, fmt, sample, batch_size,
                            num_workers, device, generator, progress and dist.is_main, stats, own_manifest)
    finally:
        _write_manifest(own_manifest, entries)  # compact: one line per input
    total, total_sq, count, encoded = sum_across(dist, stats, device)
    if dist.enabled:
        barrier(dist)
        if dist.is_main:
            entries = dict(previous)
            for rank in range(dist.world_size):
                part = out_root / f".manifest.rank{rank}.jsonl"
                entries.update(read_manifest(part))
                part.unlink()
            _write_manifest(manifest_path, entries)
        barrier(dist)
        entries = read_manifest(manifest_path)
    summary = {
        "encoded": int(encoded),
        "already_done": len(images) - pending,
        "failed": sum(1 for e in entries.values() if e["status"] != "ok"),
        "skipped_special": len(excluded),
        "seconds": time.perf_counter() - started,
    }
    if pending and not encoded and summary["already_done"] == 0:
        raise DataError(f"not one of the {len(images) + len(excluded)} files under {input_dir} could be encoded "
                        f"({summary['failed']} unreadable, {len(excluded)} not regular files; see {manifest_path})")
    if count > 1:
        mean = total / count
        std = max((total_sq / count - mean * mean), 0.0) ** 0.5
        raw_std = std / ctx.vae.scaling_factor
        summary.update({"latent_mean": mean, "latent_std": std,
                        "suggested_scaling_factor": 1.0 / raw_std if raw_std > 0 else float("nan")})
        if dist.is_main:
            stats_path = out_root / "latent_stats.json"
            write_text(stats_path, json.dumps({**summary, "scaling_factor_used": ctx.vae.scaling_factor}, indent=2))
    return summary


def _encode_batches(ctx, input_root, out_root, todo, names, entries, skips, fmt, sample, batch_size,
                    num_workers, device, generator, progress, stats, journal: Path):
    """Encode ``todo`` into latent files; record each input in ``entries`` and, batch by batch,
    in the ``journal`` manifest (so an interrupted run keeps what it finished), and add the
    latents' sum, sum of squares and count, and the number of images encoded, to ``stats``."""
    from tqdm import tqdm

    _, loader = _folder_loader(ctx, input_root, batch_size, num_workers, device, paths=todo)
    for batch in tqdm(loader, disable=not progress, desc="encode"):
        skips.add(batch.failures)
        done = []
        for rel, reason in batch.failures:
            entries[rel] = {"path": rel, "status": "failed", "reason": reason}
            done.append(entries[rel])
        if batch.images is None:
            _append_manifest(journal, done)
            continue
        latents, codes = ctx.vae.encode_with_codes(batch.images.to(device), sample=sample, generator=generator)
        latents = latents.float().cpu()
        codes = [None] * len(latents) if codes is None else codes.cpu()
        stats[0] += latents.sum().item()
        stats[1] += latents.pow(2).sum().item()
        stats[2] += latents.numel()
        stats[3] += len(latents)
        for rel, latent, code in zip(batch.paths, latents, codes):
            target = safe_output_path(out_root, names[rel])
            save_latent(latent, target, fmt, codes=code)
            entries[rel] = {"path": rel, "status": "ok", "file": target.relative_to(out_root).as_posix(),
                            "shape": list(latent.shape)}
            if code is not None:
                entries[rel]["codes_shape"] = list(code.shape)
            done.append(entries[rel])
        _append_manifest(journal, done)


def _append_manifest(path: Path, entries: list[dict]) -> None:
    """Append entries to a manifest and flush them to disk (a later line for the same input wins)."""
    if not entries:
        return
    with open(path, "a", encoding="utf-8") as fh:
        fh.write("".join(json.dumps(entry) + "\n" for entry in entries))
        fh.flush()
        os.fsync(fh.fileno())


def _write_manifest(path: Path, entries: dict) -> None:
    write_text(path, "".join(json.dumps(entries[rel]) + "\n" for rel in sorted(entries)))


@torch.no_grad()
def decode_folder(ctx: LoadedModel, input_dir, output_dir, *, batch_size=32, device="cpu", progress=True) -> dict:
    """Decode every latent file (.safetensors/.npy) under ``input_dir`` to a PNG at the same
    relative path; ``manifest.jsonl`` in the output accounts for each file.

    A file holding integer codes of a discrete latent is decoded from its codes (the stored
    float latent is then only a convenience for other tools). Latents holding NaN or
    infinite values are decoded (they come out as black or saturated pixels) with a warning,
    and the count of such values is recorded in the manifest.
    """
    from tqdm import tqdm

    in_root = Path(input_dir)
    if not in_root.is_dir():
        raise DataError(f"latent folder not found: {in_root}")
    out_root = check_folders(input_dir, output_dir)
    files = sorted(p for p in in_root.rglob("*") if p.suffix in (".safetensors", ".npy") and p.is_file()
                   and not p.name.startswith(".") and not p.name.endswith(CODES_SUFFIX))
    if not files:
        raise DataError(f"no latent files (.safetensors or .npy) under {in_root}")
    names = output_names([path.relative_to(in_root).as_posix() for path in files], ".png")
    expected = tuple(ctx.vae.latent_shape)
    discrete = ctx.vae.latent if ctx.vae.is_discrete else None
    expected_codes = tuple(discrete.code_shape(expected)) if discrete is not None else None
    entries, failed, non_finite_files = {}, [], 0
    for start in tqdm(range(0, len(files), batch_size), disable=not progress, desc="decode"):
        chunk, tensors = [], []  # tensors: raw latents, as the decoder takes them
        for path in files[start:start + batch_size]:
            rel = path.relative_to(in_root).as_posix()
            try:
                raw = _raw_latent(path, ctx, discrete, expected, expected_codes, device)
            except Exception as exc:  # unreadable or mismatched file: report, go on
                failed.append((path, str(exc)))
                entries[rel] = {"path": rel, "status": "failed", "reason": str(exc)}
                continue
            bad = int((~torch.isfinite(raw)).sum())
            if bad:
                non_finite_files += 1
                print(f"warning: {path}: {bad} of {raw.numel()} latent values are NaN or infinite; decoded anyway",
                      file=sys.stderr)
            chunk.append(path)
            tensors.append(raw)
            entries[rel] = {"path": rel, "status": "ok", "file": names[rel], "non_finite": bad}
        if not tensors:
            continue
        images = ctx.vae.to_image(ctx.vae.decode(torch.stack(tensors).to(device)))
        for path, image in zip(chunk, images):
            save_image(image, safe_output_path(out_root, names[path.relative_to(in_root).as_posix()]))
    for path, reason in failed:
        print(f"warning: skipped {path}: {reason}", file=sys.stderr)
    done = len(entries) - len(failed)
    out_root.mkdir(parents=True, exist_ok=True)
    _write_manifest(out_root / MANIFEST, entries)
    if not done:
        raise DataError(f"not one of the {len(files)} latent files under {in_root} could be decoded "
                        f"({len(failed)} failed, listed above)")
    return {"decoded": done, "failed": len(failed), "non_finite_files": non_finite_files}


def _raw_latent(path: Path, ctx, discrete, expected, expected_codes, device) -> torch.Tensor:
    """The raw latent a file holds, as the decoder takes it; ValueError/DataError when it does not fit."""
    latent, codes = load_latent_file(path)
    if discrete is not None and codes is not None:
        if tuple(codes.shape) != expected_codes:
            raise ValueError(f"codes shape {tuple(codes.shape)}, the model expects {expected_codes}")
        return discrete.decode_codes(codes.unsqueeze(0).to(device))[0].float().cpu()
    if tuple(latent.shape) != expected:
        raise ValueError(f"latent shape {tuple(latent.shape)}, the model expects {expected}")
    return latent.float() / ctx.vae.scaling_factor
