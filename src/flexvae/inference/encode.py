"""-e: encode every image to a latent file, with a manifest and dataset-wide statistics."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from ..checkpoint import LoadedModel
from ..data import SkipLog, find_images
from ..errors import DataError, Interrupted
from ..files import fsync_dir, write_text
from ..fits import refuse_unless_fits
from .latent_files import append_manifest, codes_path, write_manifest, read_manifest, save_latent
from .pipeline import BackgroundWriter, read_ahead
from .shard_writer import ShardWriter
from .paths import (LATENT_SUFFIXES, MANIFEST, folder_loader, in_output_folder, input_root, output_names,
                    OutputPaths)


def encode_folder(ctx: LoadedModel, input_dir, output_dir, *, overwrite: bool = False, **options) -> dict:
    """Encode every image to a latent file mirroring the tree; a manifest accounts for each input.
    Files in ``output_dir`` that flexvae did not write are never replaced (the call stops before
    writing anything), unless ``overwrite`` (outputs.py). ``options``: see ``_encode``."""
    return in_output_folder(_encode, ctx, input_dir, output_dir, overwrite, options)


@torch.no_grad()
def _encode(ctx: LoadedModel, input_dir, out_root, folder, *, fmt="safetensors", sample=False,
            batch_size=32, num_workers=0, device="cpu", seed=0, progress=True, dist=None,
            tile: int | None = None, overlap: int | None = None, shard_size: int = 10000) -> dict:
    """The work of ``encode_folder`` inside its opened output folder.

    Re-running skips inputs already encoded by the same checkpoint file (its SHA-256) with the
    same settings (status ok and file present) and encodes the others again, saying so; an
    interrupted run keeps the manifest of what it finished. The latents' standard deviation gives the
    suggested scaling factor 1/std. Under torchrun (``dist``), process r of N encodes every
    N-th remaining image and rank 0 merges the per-process manifests into one.

    ``fmt = "webdataset"``: latents go into tar shards of ``shard_size`` images (shard_writer.py).
    ``tile``: each image at its own resolution (cropped to a multiple of the model's
    downsampling), encoded in overlapping tiles whose posterior means are blended into one
    latent map (tiling.py); ``-d --tile`` decodes it back to the full image.
    """
    from ..train.distributed import DistInfo, barrier, sum_across

    dist = dist or DistInfo()
    root, single = input_root(input_dir)
    excluded: list[tuple[str, str]] = []
    images = single or find_images(root, excluded)
    out_root.mkdir(parents=True, exist_ok=True)
    suffix = LATENT_SUFFIXES[fmt]
    manifest_path = out_root / MANIFEST
    folder.check([manifest_path, out_root / "latent_stats.json"])  # a manifest not ours is not read either
    previous = read_manifest(manifest_path)
    if ctx.vae.groups and fmt != "safetensors":
        raise DataError(f"encode.format = {fmt!r}: a hierarchical model's latent groups ({', '.join(ctx.vae.groups)}) "
                        "are stored beside its top latent in safetensors files; use encode.format = 'safetensors'")
    tiling = None
    if tile is not None:
        from .tiling import prepare_tiling

        if sample:
            raise DataError("--sample with --tile: tiles blend posterior means; encode without --sample")
        tiling = prepare_tiling(ctx, tile, overlap, parts=("encode",))
    made_by = _comparable({**ctx.provenance(), "format": fmt, "sample": bool(sample), "seed": seed if sample else None,
                           **({"tile": tiling.tile, "overlap": tiling.overlap, "tiles_exact": tiling.exact["encode"]}
                              if tiling else {})})
    names = output_names([path.relative_to(root).as_posix() for path in images], suffix)
    output_path = OutputPaths(out_root)
    todo, stale = [], 0
    for path in images:
        rel = path.relative_to(root).as_posix()
        entry = previous.get(rel, {})
        done = (entry.get("status") == "ok" and entry.get("made_by") == made_by
                and isinstance(entry.get("file"), str) and output_path(entry["file"]).exists())
        stale += entry.get("status") == "ok" and not done
        if not done:
            todo.append(rel)  # relative to root: ImageFolder joins it to its (absolute) root
    pending = len(todo)
    refuse_unless_fits(ctx.plan, min(batch_size, max(pending, 1)), device, training=False,
                       hint="lower encode.batch_size")
    targets = [output_path(names[rel]) for rel in todo] if fmt != "webdataset" else []
    folder.check(targets + ([codes_path(t) for t in targets] if fmt == "npy" and ctx.vae.is_discrete else []))
    if stale and dist.is_main:
        print(f"note: {stale} latent(s) in {out_root} came from another checkpoint or other settings; "
              f"encoding them again with {made_by['checkpoint']} (step {made_by['step']})", file=sys.stderr)
    if dist.enabled:  # every process has checked the whole folder before any writes into it
        if dist.is_main:
            folder.start_record()  # one header, written before the other processes append
        barrier(dist)
    todo = todo[dist.rank::dist.world_size]
    if len(todo) <= 2 * batch_size:
        num_workers = 0  # starting worker processes costs more than a couple of batches
    own_manifest = manifest_path if not dist.enabled else out_root / f".manifest.rank{dist.rank}.jsonl"
    entries = dict(previous) if not dist.enabled else {}
    generator = torch.Generator(device=device).manual_seed(seed)
    channels = int(ctx.vae.latent_shape[0])
    stats = [0]  # images encoded (summed over processes); the statistics come from the manifest
    started = time.perf_counter()
    skips = SkipLog()
    if dist.is_main:
        skips.add(excluded)
    try:
        if todo:
            _encode_batches(ctx, root, out_root, todo, names, entries, skips, fmt, sample, batch_size,
                            num_workers, device, generator, progress and dist.is_main, stats, own_manifest,
                            made_by, tiling, dist.rank, shard_size)
    except KeyboardInterrupt:
        kept = sum(1 for rel in todo if entries.get(rel, {}).get("status") == "ok")
        raise Interrupted(f"interrupted: {len(images) - pending + kept} of {len(images)} latents are in {out_root} "
                          f"({kept} encoded by this run, listed in {manifest_path.name}); the same command encodes "
                          f"the remaining {len(todo) - kept}") from None
    finally:
        write_manifest(own_manifest, entries)  # compact: one line per input
    encoded = sum_across(dist, stats, device)[0]
    if dist.enabled:
        barrier(dist)
        if dist.is_main:
            entries = dict(previous)
            for rank in range(dist.world_size):
                part = out_root / f".manifest.rank{rank}.jsonl"
                entries.update(read_manifest(part))
                part.unlink()
            write_manifest(manifest_path, entries)
        barrier(dist)
        entries = read_manifest(manifest_path)
    summary = {
        "encoded": int(encoded),
        "already_done": len(images) - pending,
        "redone": stale,
        "failed": sum(1 for e in entries.values() if e["status"] != "ok"),
        "skipped_special": len(excluded),
        "seconds": time.perf_counter() - started,
    }
    if pending and not encoded and summary["already_done"] == 0:
        raise DataError(f"not one of the {len(images) + len(excluded)} files under {input_dir} could be encoded "
                        f"({summary['failed']} unreadable, {len(excluded)} not regular files; see {manifest_path})")
    current = [entries[rel] for rel in (path.relative_to(root).as_posix() for path in images)
               if entries.get(rel, {}).get("status") == "ok"]
    latents, sums = _folder_stats(current, out_root, channels)
    count = sum(sums[2])
    if count > 1:
        mean = sum(sums[0]) / count
        std = max((sum(sums[1]) / count - mean * mean), 0.0) ** 0.5
        raw_std = std / ctx.vae.scaling_factor
        summary.update({"latent_mean": mean, "latent_std": std,
                        "suggested_scaling_factor": 1.0 / raw_std if raw_std > 0 else float("nan")})
        means = [t / n if n else float("nan") for t, n in zip(sums[0], sums[2])]
        summary["channel_mean"] = means
        summary["channel_std"] = [max(q / n - m * m, 0.0) ** 0.5 if n else float("nan")
                                  for q, n, m in zip(sums[1], sums[2], means)]
        summary["stats_over"] = f"all {latents} latents of the input's images in this folder"
        if dist.is_main:
            stats_path = out_root / "latent_stats.json"
            write_text(stats_path, json.dumps({**summary, "scaling_factor_used": ctx.vae.scaling_factor}, indent=2))
    return summary


def format_summary(summary: dict, out_root) -> str:
    """-e's closing line: counts, then the statistics to four significant digits."""
    parts = [f"{summary['already_done']} already done", f"{summary['redone']} redone", f"{summary['failed']} failed"]
    if summary["skipped_special"]:
        parts.append(f"{summary['skipped_special']} special files skipped")
    line = f"encoded {summary['encoded']} images into {out_root} ({', '.join(parts)}) in {summary['seconds']:.1f} s"
    if "latent_std" in summary:
        line += (f"; latents: mean {summary['latent_mean']:.4g}, std {summary['latent_std']:.4g}, suggested "
                 f"scaling factor {summary['suggested_scaling_factor']:.4g} (per channel in latent_stats.json)")
    return line


def _latent_sums(latents: torch.Tensor) -> list[list[list]]:
    """Per latent of a batch (B, C, *spatial), per channel: [[sums], [sums of squares], [counts]]."""
    values = latents.double().reshape(latents.shape[0], latents.shape[1], -1)
    count = [values.shape[2]] * values.shape[1]
    return [[total, squares, count] for total, squares in zip(values.sum(2).tolist(), values.pow(2).sum(2).tolist())]


def _folder_stats(entries: list[dict], out_root: Path, channels: int) -> tuple[int, list[list]]:
    """(latents counted, per-channel [sums, squares, counts]) over ``entries``: from the sums each
    entry records, else (an entry of an older version) from its latent file."""
    from .latent_files import load_latent_file

    totals, counted = [[0.0] * channels, [0.0] * channels, [0] * channels], 0
    for entry in entries:
        sums = entry.get("sums")
        if not _valid_sums(sums, channels):
            file = entry.get("file")
            try:
                sums = _latent_sums(load_latent_file(OutputPaths(out_root)(file))[0][None])[0] \
                    if isinstance(file, str) else None
            except (OSError, ValueError, DataError, RuntimeError):  # a file gone or damaged since: left out
                sums = None
            if sums is None or len(sums[0]) != channels:
                continue
        counted += 1
        for total, part in zip(totals, sums):
            for c in range(channels):
                total[c] += part[c]
    return counted, totals


def _valid_sums(sums, channels: int) -> bool:
    return (isinstance(sums, list) and len(sums) == 3 and all(isinstance(part, list) and len(part) == channels
            for part in sums) and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                      for part in sums for v in part))


def _comparable(made_by: dict) -> dict:
    """The provenance as it reads back from JSON (lists, not tuples)."""
    return json.loads(json.dumps(made_by))


def _encode_batches(ctx, root, out_root, todo, names, entries, skips, fmt, sample, batch_size,
                    num_workers, device, generator, progress, stats, journal: Path, made_by: dict, tiling=None,
                    rank: int = 0, shard_size: int = 10000):
    """Encode ``todo`` into latent files (or shards); record each input in ``entries`` and, as
    its file or shard is complete, in the ``journal`` manifest (so an interrupted run keeps what
    it finished), and count the images encoded in ``stats[0]``."""
    dataset, loader = folder_loader(ctx, root, batch_size, num_workers, device, paths=todo)
    output_path = OutputPaths(out_root)
    encode = ctx.vae.encode_for_files
    if tiling is not None:
        from .tiling import tiled_batches, tiled_encoder

        loader = tiled_batches(ctx, dataset, tiling.factor)
        encode = tiled_encoder(ctx.vae, tiling.tile, tiling.overlap, tiling.factor, tiling.exact["encode"])
    shards = ShardWriter(out_root, rank, shard_size) if fmt == "webdataset" else None
    try:
        _encode_loop(ctx, loader, output_path, out_root, names, entries, skips, fmt, sample, device, generator,
                     progress, stats, journal, made_by, encode, shards, len(todo) if tiling else len(loader))
    except BaseException:
        if shards is not None:
            shards.abandon()
        raise


def _encode_loop(ctx, loader, output_path, out_root, names, entries, skips, fmt, sample, device, generator,
                 progress, stats, journal, made_by, encode, shards, total):
    from tqdm import tqdm

    pending = None  # the previous batch: (its write jobs, its manifest entries)
    with BackgroundWriter() as writer:
        for batch in tqdm(read_ahead(loader), disable=not progress, desc="encode", total=total):
            skips.add(batch.failures)
            done = []
            for rel, reason in batch.failures:
                done.append({"path": rel, "status": "failed", "reason": reason})
            jobs = []
            if batch.images is not None:
                labels = None if batch.labels is None else batch.labels.to(device)
                latents, codes, *rest = encode(batch.images.to(device), sample=sample, generator=generator,
                                               **({} if labels is None else {"labels": labels}))
                probs, groups = (rest + [None, {}])[:2]
                groups = {name: value.float().cpu() for name, value in (groups or {}).items()}
                latents = latents.float().cpu()
                codes = [None] * len(latents) if codes is None else codes.cpu()
                stats[0] += len(latents)
                sums = _latent_sums(latents)  # the whole batch at once: per image, per channel
                for index, (rel, latent, code) in enumerate(zip(batch.paths, latents, codes)):
                    entry = {"path": rel, "status": "ok", "shape": list(latent.shape), "made_by": made_by,
                             "sums": sums[index]}
                    if code is not None:
                        entry["codes_shape"] = list(code.shape)
                    entry.update(_class_fields(ctx.vae, batch.labels, probs, index))
                    mine = {name: value[index] for name, value in groups.items()}
                    if mine:
                        entry["groups"] = {name: list(value.shape) for name, value in mine.items()}
                    if shards is not None:  # recorded when its shard is complete
                        completed = shards.add(Path(names[rel]).with_suffix("").as_posix(), latent, code, entry)
                        if completed:
                            _record(entries, journal, completed)
                        continue
                    target = output_path(names[rel])
                    extra = {"groups": mine} if mine else {}
                    jobs.append(writer.submit(save_latent, latent, target, fmt, code, False, **extra))
                    entry["file"] = target.relative_to(out_root).as_posix()
                    done.append(entry)
            # This batch's files are written while the next one is read and encoded; an entry
            # enters the manifest only once its file is complete.
            if pending is not None:
                _finish(writer, pending, entries, journal)
            pending = (jobs, done)
        if pending is not None:
            _finish(writer, pending, entries, journal)
    if shards is not None:
        _record(entries, journal, shards.close())


def _class_fields(vae, labels, probs, index: int) -> dict:
    """The manifest's class fields of image ``index`` of a batch: its label (class name, None for
    an unlabelled image) and, for a class latent, q(class | x) by class name."""
    fields = {}
    if labels is not None and vae.class_names:
        label = int(labels[index])
        fields["label"] = vae.class_names[label] if label >= 0 else None
    if probs is not None:
        fields["class_probs"] = {name: round(float(p), 6) for name, p in zip(vae.class_names, probs[index])}
    return fields


def _finish(writer, pending, entries, journal) -> None:
    """Wait for a batch's files, then record its entries (re-raising a failed write first)."""
    jobs, done = pending
    writer.wait(jobs)
    for folder in {(journal.parent / e["file"]).parent for e in done if "file" in e}:
        fsync_dir(folder)  # the batch's renames are durable before the manifest names them
    _record(entries, journal, done)


def _record(entries, journal, done) -> None:
    for entry in done:
        entries[entry["path"]] = entry
    append_manifest(journal, done)
