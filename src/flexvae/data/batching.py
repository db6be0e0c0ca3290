"""Batching: readable items stacked, unreadable ones reported once per file."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Optional

import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm


@dataclass
class Batch:
    """Readable items stacked, unreadable ones listed in ``failures``.

    ``images`` is None when every item of the batch failed. ``labels`` is set
    only for sources that have labels (torchvision datasets).
    """

    images: Optional[torch.Tensor]
    paths: list[str]
    indices: list[int]
    failures: list[tuple[str, str]]
    labels: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return len(self.paths)

    def pin_memory(self) -> Batch:
        """Called by DataLoader when pin_memory=True (it does not know dataclasses)."""
        return replace(self, images=_pinned(self.images), labels=_pinned(self.labels))


def _pinned(tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if tensor is None else tensor.pin_memory()


def collate(items: Sequence[dict[str, Any]]) -> Batch:
    """Stack the readable items; move the failed ones to ``failures``."""
    good = [item for item in items if item.get("image") is not None]
    failures = [(item["path"], item.get("error", "unknown error"))
                for item in items if item.get("image") is None]
    images = torch.stack([item["image"] for item in good]) if good else None
    labels = None
    if good and all("label" in item for item in good):
        labels = torch.tensor([item["label"] for item in good], dtype=torch.long)
    return Batch(images, [item["path"] for item in good], [int(item["index"]) for item in good],
                 failures, labels)


class SkipLog:
    """Remembers unreadable files across epochs and warns once per file: one ``warning:``
    line on stderr, written around any progress bar."""

    def __init__(self) -> None:
        self._reasons: dict[str, str] = {}

    def add(self, failures: Iterable[tuple[str, str]]) -> int:
        """Record failures; warn for each path not seen before. Returns how many were new."""
        new = 0
        for path, reason in failures:
            if path in self._reasons:
                continue
            self._reasons[path] = reason
            new += 1
            tqdm.write(f"warning: skipping unreadable image {path}: {reason}", file=sys.stderr)
        return new

    @property
    def count(self) -> int:
        return len(self._reasons)

    @property
    def reasons(self) -> dict[str, str]:
        return dict(self._reasons)

    def summary(self) -> str:
        n = self.count
        return f"skipped {n} unreadable file{'' if n == 1 else 's'}" if n else ""


def sample_images(dataset: Dataset, n: int, seed: int = 0) -> Optional[torch.Tensor]:
    """``n`` readable images of a dataset drawn at random (fixed by ``seed``), stacked; None when
    none is readable. Random, not the first in sorted order: on a folder sorted by class
    (digits/0/..., digits/1/...) the first files would all be of one class."""
    return sample_items(dataset, n, seed)[0]


def sample_items(dataset: Dataset, n: int, seed: int = 0):
    """(images, labels) of ``sample_images``; labels (-1 = none) only when every item has one."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
    items = []
    for index in order:
        item = dataset[index]
        if item.get("image") is not None:
            items.append(item)
        if len(items) == n:
            break
    if not items:
        return None, None
    labels = None
    if all("label" in item for item in items):
        labels = torch.tensor([item["label"] for item in items], dtype=torch.long)
    return torch.stack([item["image"] for item in items]), labels


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, num_workers: int,
                device_type: str = "cpu", drop_last: bool = False,
                sampler: Optional[Sampler] = None, seed: Optional[int] = None) -> DataLoader:
    """A DataLoader yielding ``Batch`` objects.

    ``seed`` fixes the shuffle order and the workers' RNG (hence random flips).
    A given ``sampler`` decides the order itself, so ``shuffle`` is ignored.
    """
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    workers = num_workers > 0
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None,
                      sampler=sampler, num_workers=num_workers, collate_fn=collate,
                      pin_memory=device_type == "cuda", drop_last=drop_last,
                      persistent_workers=workers, prefetch_factor=2 if workers else None,
                      generator=generator)
