"""``-e`` into tar shards (``encode.format = "webdataset"``): ``latents-r<rank>-<n>.tar`` files in
the webdataset layout, one ``<key>.safetensors`` member per image (tensor ``latent``, and
``codes`` for discrete latents), ``encode.shard_size`` images per shard.

A shard is written under a temporary name and renamed when it is complete, so a shard on
disk is always whole; the manifest records an image once its shard is. A new run numbers its
shards after those already there and never rewrites one.
"""

from __future__ import annotations

import io
import re
import tarfile
from pathlib import Path

import torch

from ..files import fsync_dir, fsync_path, temp_path


class ShardWriter:
    def __init__(self, out_root: Path, rank: int, per_shard: int):
        self.out_root, self.per_shard = Path(out_root), int(per_shard)
        self.prefix = f"latents-r{rank:02d}-"
        pattern = re.compile(re.escape(self.prefix) + r"(\d+)\.tar$")
        numbers = [int(m.group(1)) for p in self.out_root.glob(f"{self.prefix}*.tar") if (m := pattern.match(p.name))]
        self.number = max(numbers, default=-1) + 1
        self.archive = self.partial = None
        self.entries: list[dict] = []

    @property
    def name(self) -> str:
        return f"{self.prefix}{self.number:06d}.tar"

    def add(self, key: str, latent: torch.Tensor, codes: torch.Tensor | None, entry: dict) -> list[dict]:
        """Append one image's latent; returns the entries of a shard this completed (else [])."""
        from safetensors.torch import save

        if self.archive is None:
            self.partial = temp_path(self.out_root / self.name)
            self.archive = tarfile.open(self.partial, "w")
        tensors = {"latent": latent.contiguous().cpu()}
        if codes is not None:
            tensors["codes"] = codes.long().contiguous().cpu()
        data = save(tensors)
        member = tarfile.TarInfo(f"{key}.safetensors")
        member.size = len(data)
        self.archive.addfile(member, io.BytesIO(data))
        self.entries.append({**entry, "file": self.name, "member": member.name})
        return self.close() if len(self.entries) >= self.per_shard else []

    def close(self) -> list[dict]:
        """Finish the open shard (if any): its entries."""
        if self.archive is None:
            return []
        self.archive.close()
        fsync_path(self.partial)
        self.partial.replace(self.out_root / self.name)
        fsync_dir(self.out_root)
        done, self.entries, self.archive, self.partial = self.entries, [], None, None
        self.number += 1
        return done

    def abandon(self) -> None:
        """An interrupted run: the open shard is removed, its images are encoded again next time."""
        try:
            if self.archive is not None:
                self.archive.close()  # after a failed close, tarfile has closed its file already
        except OSError:  # the failure that stopped the run (a full disk) may strike again here
            pass
        finally:
            if self.partial is not None:  # also when opening the shard itself failed
                self.partial.unlink(missing_ok=True)
            self.archive = self.partial = None
            self.entries = []
