"""Latent files (safetensors or npy, with integer codes for discrete latents) and manifests."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError
from ..files import atomic_open, atomic_path, write_text
from .paths import CODES_SUFFIX

GROUP_PREFIX = "group."  # a hierarchy's latent groups in a safetensors latent file


def codes_path(path: Path) -> Path:
    """Where the npy format keeps a latent's integer codes: ``x.npy`` -> ``x.codes.npy``."""
    return path.with_name(path.stem + CODES_SUFFIX)


def save_latent(tensor: torch.Tensor, path: Path, fmt: str, codes: torch.Tensor | None = None,
                sync_dir: bool = True, groups: dict | None = None) -> None:
    """One latent per file, written atomically; safetensors key 'latent', plus 'codes' (int64)
    for discrete latents and 'group.<name>' for each latent group of a hierarchy (safetensors
    only). The npy format writes the codes to ``<name>.codes.npy`` first.
    ``sync_dir=False``: the caller makes the folder's renames durable (files.fsync_dir)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "npy":
        if codes is not None:
            _atomic_npy(codes.long().cpu().numpy(), codes_path(path), sync_dir)
        _atomic_npy(tensor.cpu().numpy(), path, sync_dir)
        return
    tensors = {"latent": tensor.contiguous().cpu()}
    if codes is not None:
        tensors["codes"] = codes.long().contiguous().cpu()
    for name, value in (groups or {}).items():
        tensors[GROUP_PREFIX + name] = value.float().contiguous().cpu()
    with atomic_path(path, sync_dir) as tmp:
        save_file(tensors, str(tmp))


def _atomic_npy(array: np.ndarray, path: Path, sync_dir: bool = True) -> None:
    with atomic_open(path, "wb", sync_dir=sync_dir) as fh:
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


def load_groups(path: Path) -> dict[str, torch.Tensor]:
    """The latent groups a safetensors latent file holds ('group.<name>'), by name."""
    from safetensors import safe_open

    if path.suffix == ".npy":
        return {}
    with safe_open(str(path), framework="pt") as fh:
        return {k[len(GROUP_PREFIX):]: fh.get_tensor(k) for k in fh.keys() if k.startswith(GROUP_PREFIX)}


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


def append_manifest(path: Path, entries: list[dict]) -> None:
    """Append entries to a manifest and flush them to disk (a later line for the same input wins)."""
    from ..outputs import folder_for

    if not entries:
        return
    data = "".join(json.dumps(entry) + "\n" for entry in entries).encode("utf-8")
    output = folder_for(path)
    if output is not None:  # an output folder: appended only to a manifest of ours, and recorded
        output.append(path, data)
        return
    with open(path, "ab") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def write_manifest(path: Path, entries: dict) -> None:
    write_text(path, "".join(json.dumps(entries[rel]) + "\n" for rel in sorted(entries)))
