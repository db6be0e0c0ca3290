"""The decoded-image cache (``data.cache``): each image's decoded, resized 8-bit values are
kept after its first read, so later epochs skip file reading, decoding and resizing.

The cache is one uint8 tensor of (images, channels, size, size) in shared memory, allocated
before loader workers start: a worker that decodes an image fills its slot for every
process. A cached item is converted to float exactly as a decoded one (v / 127.5 - 1), so
cached and uncached batches are bitwise equal. Unreadable files are not cached: they are
tried, and reported, again.
"""

from __future__ import annotations

import torch

from ..errors import DataError

AUTO_FRACTION = 0.25  # "auto" caches when the images take under this share of the available RAM
CACHE_MODES = ("auto", "ram", "off")


class DecodedCache:
    def __init__(self, count: int, shape: tuple[int, ...]):
        self.images = torch.zeros((count, *shape), dtype=torch.uint8).share_memory_()
        self.filled = torch.zeros(count, dtype=torch.bool).share_memory_()
        self.labels = torch.full((count,), -1, dtype=torch.int64).share_memory_()  # -1: no label

    def get(self, index: int):
        """(uint8 image, extra item fields) of a cached item, or None."""
        if not bool(self.filled[index]):
            return None
        label = int(self.labels[index])
        return self.images[index], ({"label": label} if label >= 0 else {})

    def put(self, index: int, image: torch.Tensor, extra: dict) -> None:
        self.images[index].copy_(image)
        if "label" in extra:
            self.labels[index] = int(extra["label"])
        self.filled[index] = True


def make_cache(mode: str, count: int, shape: tuple[int, ...], available: int | None = None, processes: int = 1):
    """(a DecodedCache or None, a note for the run's log or None) for ``data.cache = mode``;
    ``processes`` training processes on the machine each hold a cache."""
    if mode not in CACHE_MODES:
        raise DataError(f"data.cache must be one of {', '.join(CACHE_MODES)}, got {mode!r}")
    if mode == "off" or count == 0:
        return None, None
    size = count * int(torch.Size(shape).numel()) * processes
    if available is None:
        from ..sysmem import available_memory

        available = available_memory()
    if mode == "ram" and size > available:
        raise DataError(f"data.cache = 'ram': the {count:,} decoded images need {size / 2**20:,.0f} MiB"
                        + (f" in {processes} processes" if processes > 1 else "") + ", but only "
                        f"{available / 2**20:,.0f} MiB of RAM is available; use 'auto' or 'off'")
    if mode == "auto" and size > AUTO_FRACTION * available:
        return None, (f"data.cache = 'auto': the decoded images ({size / 2**20:,.0f} MiB) would take over "
                      f"{AUTO_FRACTION:.0%} of the available RAM; reading them from disk every epoch")
    return DecodedCache(count, shape), None


def fill_cache(dataset, num_workers: int, batch_size: int = 64) -> None:
    """Decode every image of ``dataset`` once into its cache, in ``num_workers`` processes.
    Unreadable files stay out (training reads and reports them as usual)."""
    from .batching import make_loader

    # its own generator: filling the cache must not draw from the seeded global stream
    for _ in make_loader(dataset, batch_size, shuffle=False, num_workers=num_workers, seed=0):
        pass


class CachedLoader:
    """Batches of a filled cache, gathered straight from its tensor in ``sampler``'s order:
    what a DataLoader over the cached dataset yields (the same Batch objects, bitwise the same
    images), without building an item per image. Items missing from the cache (unreadable
    files) are read through the dataset, so their failures are reported as usual."""

    def __init__(self, dataset, batch_size: int, sampler, pin_memory: bool = False):
        self.dataset, self.batch_size, self.sampler = dataset, batch_size, sampler
        self.pin_memory = pin_memory

    def __iter__(self):
        from .batching import Batch, collate

        cache = self.dataset.cache
        chunk = []
        for index in self.sampler:
            chunk.append(index)
            if len(chunk) < self.batch_size:
                continue
            if bool(cache.filled[chunk].all()):
                rows = torch.tensor(chunk)
                images = cache.images[rows].float().div(127.5).sub(1.0)
                if self.dataset.labels is not None:  # attached labels (-1 = unlabelled) come with every image
                    labels = self.dataset.labels.indices[rows]
                else:
                    labels = cache.labels[rows]
                    labels = labels if bool((labels >= 0).all()) else None
                yield Batch(images.pin_memory() if self.pin_memory else images,
                            [self.dataset.relpaths[i] for i in chunk], list(chunk), [], labels)
            else:
                yield collate([self.dataset[i] for i in chunk])
            chunk = []
        if chunk:
            yield collate([self.dataset[i] for i in chunk])
