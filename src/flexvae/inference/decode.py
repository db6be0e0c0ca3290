"""-d: decode latent files back to images, with a manifest."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from ..checkpoint import LoadedModel
from ..data import save_image
from ..errors import DataError, shown_path
from ..forward_state import ForwardState
from ..fits import refuse_unless_fits
from .latent_files import load_groups, load_latent_file, write_manifest
from .paths import CODES_SUFFIX, MANIFEST, in_output_folder, output_names, safe_output_path


def decode_folder(ctx: LoadedModel, input_dir, output_dir, *, overwrite: bool = False, **options) -> dict:
    """Decode every latent file (.safetensors/.npy) under ``input_dir`` to a PNG at the same
    relative path; ``manifest.jsonl`` in the output accounts for each file. Files in
    ``output_dir`` that flexvae did not write are never replaced (the call stops before writing
    anything), unless ``overwrite`` (outputs.py). ``options``: see ``_decode``."""
    try:
        found = Path(input_dir).is_dir()
    except (OSError, ValueError):  # a name no folder can have
        found = False
    if not found:
        raise DataError(f"latent folder not found: {shown_path(input_dir)}")
    return in_output_folder(_decode, ctx, input_dir, output_dir, overwrite, options)


@torch.no_grad()
def _decode(ctx: LoadedModel, input_dir, out_root: Path, folder, *, batch_size=32, device="cpu",
            progress=True, tile: int | None = None, overlap: int | None = None) -> dict:
    """The work of ``decode_folder`` inside its opened output folder.

    A file holding integer codes of a discrete latent is decoded from its codes (the stored
    float latent is then only a convenience for other tools). Latents holding NaN or
    infinite values are decoded (they come out as black or saturated pixels) with a warning,
    and the count of such values is recorded in the manifest.

    ``tile``: decode each latent in tiles of ``tile`` pixels overlapping by ``overlap``
    (tiling.py); latents of any spatial size with the model's channels are then accepted,
    such as those of a tiled ``-e``.
    """
    from tqdm import tqdm

    in_root = Path(input_dir)
    files = sorted(p for p in in_root.rglob("*") if p.suffix in (".safetensors", ".npy") and p.is_file()
                   and not p.name.startswith(".") and not p.name.endswith(CODES_SUFFIX))
    if not files:
        raise DataError(f"no latent files (.safetensors or .npy) under {in_root}")
    names = output_names([path.relative_to(in_root).as_posix() for path in files], ".png")
    refuse_unless_fits(ctx.plan, min(batch_size, len(files)), device, training=False, hint="lower encode.batch_size")
    folder.check([out_root / MANIFEST, *(safe_output_path(out_root, name) for name in names.values())])
    expected = tuple(ctx.vae.latent_shape)
    factor = None
    if tile is not None:
        from .tiling import prepare_tiling, tiled_decoder

        tiling = prepare_tiling(ctx, tile, overlap, parts=("decode",))
        factor = tiling.factor
        decode_one = tiled_decoder(ctx.vae, tiling.tile, tiling.overlap, factor, tiling.exact["decode"])
        expected = (expected[0], None)  # any spatial size
    from .tiling import FallBackToTiles, tiled_decoder

    whole = FallBackToTiles(ctx, lambda z, labels=None: ctx.vae.to_image(ctx.vae.decode(z, labels)),
                            "a batch of latents", make_tiled=lambda t, o, f: tiled_decoder(ctx.vae, t, o, f),
                            parts=("decode",))
    discrete = ctx.vae.latent if ctx.vae.is_discrete else None
    expected_codes = tuple(discrete.code_shape(expected)) if discrete is not None else None
    _refuse_latents_of_another_model(ctx, in_root, files[0], discrete, expected, expected_codes, device)
    file_labels = _stored_labels(ctx, in_root) if ctx.vae.decoder.takes_labels else None
    entries, failed, non_finite_files = {}, [], 0
    made_by = json.loads(json.dumps(ctx.provenance()))  # every output is written again on each run
    for start in tqdm(range(0, len(files), batch_size), disable=not progress, desc="decode"):
        chunk, tensors, group_values = [], [], []  # raw latents, as the decoder takes them; their groups
        for path in files[start:start + batch_size]:
            rel = path.relative_to(in_root).as_posix()
            try:
                raw = _raw_latent(path, ctx, discrete, expected, expected_codes, device)
                group_values.append(_group_values(path, ctx) if ctx.vae.groups else {})
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
            entries[rel] = {"path": rel, "status": "ok", "file": names[rel], "non_finite": bad, "made_by": made_by}
        if not tensors:
            continue
        if factor is not None:
            images = [decode_one(t[None].to(device))[0] for t in tensors]
        else:
            labels = None
            if file_labels is not None:
                labels = torch.tensor([file_labels.get(p.relative_to(in_root).as_posix(), -1) for p in chunk],
                                      device=device)
            if ctx.vae.groups:
                given = {name: torch.stack([g[name] for g in group_values]).to(device) for name in ctx.vae.groups}
                state = ForwardState(labels=labels, given=given)
                images = ctx.vae.to_image(ctx.vae.decode(torch.stack(tensors).to(device), state=state))
            else:
                images = whole(torch.stack(tensors).to(device), labels)
        for path, image in zip(chunk, images):
            save_image(image, safe_output_path(out_root, names[path.relative_to(in_root).as_posix()]))
    for path, reason in failed:
        print(f"warning: skipped {path}: {reason}", file=sys.stderr)
    done = len(entries) - len(failed)
    out_root.mkdir(parents=True, exist_ok=True)
    write_manifest(out_root / MANIFEST, entries)
    if not done:
        raise DataError(f"not one of the {len(files)} latent files under {in_root} could be decoded "
                        f"({len(failed)} failed, listed above)")
    return {"decoded": done, "failed": len(failed), "non_finite_files": non_finite_files}


def _refuse_latents_of_another_model(ctx, in_root: Path, first: Path, discrete, expected, expected_codes,
                                     device) -> None:
    """One line, before a warning per file, when the first latent does not fit this model and the
    folder's manifest (written by -e) names the checkpoint that made the latents."""
    from collections import Counter

    from .latent_files import read_manifest

    try:
        _raw_latent(first, ctx, discrete, expected, expected_codes, device)
        return
    except Exception as exc:  # the per-file loop reports it when no manifest says more
        reason = str(exc)
    makers = Counter()
    for entry in read_manifest(in_root / MANIFEST).values():
        made_by = entry.get("made_by")
        if entry.get("status") == "ok" and isinstance(made_by, dict) and isinstance(made_by.get("checkpoint"), str):
            makers[(made_by["checkpoint"], made_by.get("step"), made_by.get("sha256"))] += 1
    if not makers:
        return
    (checkpoint, step, digest), count = makers.most_common(1)[0]
    if digest is not None and digest == ctx.provenance()["sha256"]:
        return
    step_text = f" (step {step})" if isinstance(step, int) else ""
    raise DataError(f"the latents under {in_root} do not fit this model ({first.name}: {reason}); "
                    f"{in_root / MANIFEST} says {count} of them were made by {checkpoint}{step_text}: "
                    f"decode them with --ckpt {checkpoint}")


def _group_values(path: Path, ctx) -> dict[str, torch.Tensor]:
    """A hierarchy's latent groups stored in a latent file by ``-e``, checked against the model."""
    found = load_groups(path)
    expected = dict(ctx.plan.decoder.groups)
    missing = [name for name in expected if name not in found]
    if missing:
        raise ValueError(f"no latent group {missing[0]!r} in this file (the model's groups: {', '.join(expected)}); "
                         "decode the files -e wrote for this model")
    for name, shape in expected.items():
        if tuple(found[name].shape) != tuple(shape):
            raise ValueError(f"latent group {name!r} has shape {tuple(found[name].shape)}, the model expects {tuple(shape)}")
    return {name: found[name].float() for name in expected}


def _stored_labels(ctx, in_root: Path) -> dict[str, int]:
    """Class indices by latent file, from the labels that ``-e`` wrote into the latent folder's
    manifest (a conditional decoder needs them); files without one decode as unlabelled."""
    from .latent_files import read_manifest

    index = {name: i for i, name in enumerate(ctx.vae.class_names or ())}
    found = {}
    for entry in read_manifest(in_root / MANIFEST).values():
        label = entry.get("label")
        if isinstance(entry.get("file"), str) and isinstance(label, str):
            if label not in index:
                raise DataError(f"{in_root / MANIFEST}: {entry['path']} has label {label!r}, which is not one of "
                                f"the model's classes ({', '.join((ctx.vae.class_names or ())[:10])})")
            found[entry["file"]] = index[label]
    print(f"note: labels: {len(found)} latent file(s) labelled by {in_root / MANIFEST}; the others decode "
          "with the 'no label' embedding", file=sys.stderr)
    return found


def _raw_latent(path: Path, ctx, discrete, expected, expected_codes, device) -> torch.Tensor:
    """The raw latent a file holds, as the decoder takes it; ValueError/DataError when it does not fit."""
    latent, codes = load_latent_file(path)
    if discrete is not None and codes is not None:
        if tuple(codes.shape) != expected_codes:
            raise ValueError(f"codes shape {tuple(codes.shape)}, the model expects {expected_codes}")
        return discrete.decode_codes(codes.unsqueeze(0).to(device))[0].float().cpu()
    if expected[-1] is None:  # tiled decoding: the channels must fit, the size is free
        if latent.dim() != len(ctx.vae.latent_shape) or latent.shape[0] != expected[0]:
            raise ValueError(f"latent shape {tuple(latent.shape)}, the model expects {expected[0]} channels "
                             f"and {len(ctx.vae.latent_shape) - 1} spatial dimensions")
    elif tuple(latent.shape) != expected:
        raise ValueError(f"latent shape {tuple(latent.shape)}, the model expects {expected}")
    return latent.float() / ctx.vae.scaling_factor
