"""An endless, seeded stream of dataset indices that can start anywhere.

Epoch ``e`` is a permutation drawn from ``seed + e``; the stream is the concatenation of
epochs. Starting at sample ``start`` is arithmetic, so a resumed run reads exactly the
images an uninterrupted run would have read next, without loading the ones it skips.
"""

import torch
from torch.utils.data import Sampler


class StreamSampler(Sampler):
    def __init__(self, num_items: int, seed: int = 0, start: int = 0, rank: int = 0, world_size: int = 1):
        if num_items < 1:
            raise ValueError("cannot sample from an empty dataset")
        self.num_items = num_items
        self.seed = seed
        self.start = start
        self.rank = rank
        self.world_size = world_size

    def permutation(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.num_items, generator=generator).tolist()

    def __iter__(self):
        position = self.start
        epoch, offset = divmod(position, self.num_items)
        while True:
            order = self.permutation(epoch)
            for index in order[offset:]:
                # With several processes, each takes every world_size-th sample of the stream.
                if position % self.world_size == self.rank:
                    yield index
                position += 1
            epoch, offset = epoch + 1, 0
