"""Evaluation split across torchrun processes (``torchrun --nproc_per_node=N train.py -eval``).

The images are cut into batches in one global order; process r takes batches r, r + N,
r + 2N, ... Whatever a batch draws at random (a learned prior's KL sample, the objective's
latent samples, the importance samples of the likelihood) comes from a generator seeded by the
seed and the batch's global index, so a batch gives the same numbers whichever process runs
it. Each process's sums are gathered and added up, so N processes report what one process
reports, up to the order of float additions.
"""

from __future__ import annotations

import math

import torch


class SplitBatches:
    """The batches of ``dataset`` this process evaluates, with their global indices: iterating
    gives (index, batch). Re-iterable, as evaluation passes over the images more than once."""

    def __init__(self, dataset, batch_size: int, device, num_workers: int, dist):
        from ..data import make_loader

        self.dist, self.batch_size = dist, int(batch_size)
        count = math.ceil(len(dataset) / self.batch_size)
        self.indices = [g for g in range(count) if g % dist.world_size == dist.rank]
        order = [i for g in self.indices for i in range(g * self.batch_size, min(len(dataset), (g + 1) * self.batch_size))]
        self.loader = make_loader(dataset, self.batch_size, shuffle=False, num_workers=num_workers,
                                  device_type=torch.device(device).type, sampler=order)

    def __iter__(self):
        return zip(self.indices, self.loader)

    def __len__(self) -> int:
        return len(self.indices)


def indexed(batches):
    """(global batch index, batch) pairs: a SplitBatches' own, else the order of iteration."""
    return iter(batches) if isinstance(batches, SplitBatches) else enumerate(batches)


def dist_of(batches):
    return batches.dist if isinstance(batches, SplitBatches) else None


def batch_generator(device, seed: int, index: int) -> torch.Generator:
    """The random stream of global batch ``index`` (the same in whichever process runs it)."""
    return torch.Generator(device=device).manual_seed(int(seed) * 1_000_003 + int(index) + 1)


def gather(batches, value) -> list:
    """Every process's ``value`` (a picklable object), in rank order; [value] in one process."""
    dist = dist_of(batches)
    if dist is None or not dist.enabled:
        return [value]
    import torch.distributed as torch_dist

    values = [None] * dist.world_size
    torch_dist.all_gather_object(values, value)
    return values


def merge_moments(parts):
    """measures._Moments of several processes as one."""
    from .measures import _Moments

    merged = _Moments()
    for part in parts:
        if part.n:
            merged.total = part.total if merged.total is None else merged.total + part.total
            merged.total_sq = part.total_sq if merged.total_sq is None else merged.total_sq + part.total_sq
            merged.n += part.n
    return merged
