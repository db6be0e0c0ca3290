"""Tiled inference whose output equals the untiled one.

Tiles overlap; each position of the image is *owned* by one tile (the overlaps are split at
their middle, on the network's alignment grid), and a tile contributes only the outputs of
the positions it owns. When the overlap is at least twice the network's receptive margin
(receptive.py), every owned output reads only pixels inside its tile, or zero padding where
the whole image has it too, so it is the untiled output.

GroupNorm is the one local layer that is not: it normalises with the mean and variance of the
whole feature map. Those are computed first, one GroupNorm at a time in call order: with the
statistics of the GroupNorms before it fixed, every tile is run up to GroupNorm k, which adds
the sums over the positions its tile owns and stops the pass; the sums over all tiles are the
whole map's statistics. The last pass runs every GroupNorm with its whole-image statistics.
That costs about (number of GroupNorms / 2 + 1) passes over the image instead of one.
"""

from __future__ import annotations

import itertools
from fractions import Fraction

import torch

TILES_PER_CALL = 16


class _Stop(Exception):
    """Raised by the GroupNorm whose statistics a pass collects: the rest of the pass is not needed."""


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Where the tiles along one side start; the last one ends at the border."""
    if length <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] + tile < length:
        starts.append(length - tile)
    return starts


def owned_ranges(length: int, tile: int, overlap: int, align: int) -> list[tuple[int, int, int]]:
    """Along one axis: (tile start, owned start, owned end), owned range in absolute units; the
    owned ranges partition [0, length) and their inner ends lie on multiples of ``align``."""
    starts = tile_starts(length, tile, overlap)
    bounds = [0]
    for a, b in zip(starts, starts[1:]):
        shared = a + tile - b
        bounds.append(b + shared // 2 // align * align)
    bounds.append(length)
    return [(start, lo, hi) for start, lo, hi in zip(starts, bounds, bounds[1:])]


def check_halo(ranges, length: int, tile: int, halo: int) -> bool:
    """Whether every owned range lies ``halo`` units inside its tile (or reaches the border)."""
    for start, lo, hi in ranges:
        end = min(start + tile, length)
        if (start > 0 and lo - start < halo) or (end < length and end - hi < halo):
            return False
    return True


def _at(value: int, r: Fraction) -> int:
    scaled = Fraction(value) / r
    if scaled.denominator != 1:
        raise ValueError(f"a tile boundary at {value} does not fall on the layer's grid (scale {r})")
    return int(scaled)


class _Norms:
    """Swaps the GroupNorms' forward for one with fixed whole-image statistics, or a collector."""

    def __init__(self, norms, batch: int):
        self.norms, self.batch = norms, batch
        self.stats: dict = {}  # module -> (mean (B, G), var (B, G)) float64
        self.rows: list = []  # per row of the current call: (image, owned slices in input units, tile start)

    def frozen(self, module):
        def forward(x):
            mean, var = self.stats[module]
            images = torch.tensor([image for image, _, _ in self.rows], device=x.device)
            groups = module.num_groups
            dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
            h = x.to(dtype).reshape(x.shape[0], groups, -1)
            m = mean.to(x.device)[images].to(dtype)[..., None]
            v = var.to(x.device)[images].to(dtype)[..., None]
            h = ((h - m) * torch.rsqrt(v + module.eps)).reshape(x.shape)
            if module.affine:
                shape = (1, -1) + (1,) * (x.dim() - 2)
                h = h * module.weight.to(dtype).view(shape) + module.bias.to(dtype).view(shape)
            return h.to(x.dtype)
        return forward

    def collector(self, module, r, sums):
        def forward(x):
            groups = module.num_groups
            for row, (image, owned, start) in enumerate(self.rows):
                region = tuple(slice(_at(lo - s, ri), _at(hi - s, ri)) for (lo, hi), s, ri in zip(owned, start, r))
                part = x[row][(slice(None), *region)].double().reshape(groups, -1)
                sums[0][image] += part.sum(1).cpu()
                sums[1][image] += (part * part).sum(1).cpu()
                sums[2][image] += part.shape[1]
            raise _Stop
        return forward

    def install(self, upto: int, collect=None):
        self.restore()
        for module, _ in self.norms[:upto]:
            module.forward = self.frozen(module)
        if collect is not None:
            module, r = self.norms[upto]
            module.forward = self.collector(module, r, collect)

    def restore(self):
        for module, _ in self.norms:
            vars(module).pop("forward", None)


@torch.no_grad()
def exact_tiled_apply(fn, x: torch.Tensor, tile: int, overlap: int, footprint) -> torch.Tensor:
    """``fn`` over ``x`` (B, C, *spatial) tile by tile, equal to ``fn(x)``: ``footprint``
    (receptive.footprint of ``fn``) must be exact and ``overlap`` at least its needed overlap."""
    sizes = tuple(int(s) for s in x.shape[2:])
    if all(s <= tile for s in sizes):
        return fn(x)
    per_axis = [owned_ranges(n, tile, overlap, a) for n, a in zip(sizes, footprint.align)]
    for ranges, n, a in zip(per_axis, sizes, footprint.align):
        if any(start % a for start, _, _ in ranges):  # the last tile, moved back to end at the border
            raise ValueError(f"a side of {n} is not a multiple of {a}, the grid this model's layers need tiles "
                             "to start on; crop the image to a multiple of it")
    for ranges, n, h in zip(per_axis, sizes, footprint.halo()):
        if not check_halo(ranges, n, tile, h):
            raise ValueError(f"tiles of {tile} overlapping by {overlap} leave less than the receptive margin {h}")
    places = list(itertools.product(*per_axis))
    batch = x.shape[0]
    norms = _Norms(footprint.norms, batch)

    def run(chunk):
        pieces = torch.cat([x[(..., *(slice(s, s + tile) for s, _, _ in place))] for place in chunk])
        norms.rows = [(image, tuple((lo, hi) for _, lo, hi in place), tuple(s for s, _, _ in place))
                      for place in chunk for image in range(batch)]
        return fn(pieces)

    chunks = [places[i:i + TILES_PER_CALL] for i in range(0, len(places), TILES_PER_CALL)]
    try:
        for k, (module, _) in enumerate(footprint.norms):
            groups = module.num_groups
            sums = (torch.zeros(batch, groups, dtype=torch.float64), torch.zeros(batch, groups, dtype=torch.float64),
                    torch.zeros(batch, 1, dtype=torch.float64))
            norms.install(k, sums)
            for chunk in chunks:
                try:
                    run(chunk)
                except _Stop:
                    pass
            mean = sums[0] / sums[2]
            norms.stats[module] = (mean, (sums[1] / sums[2] - mean * mean).clamp_min(0))
        norms.install(len(footprint.norms))
        out = None
        for chunk in chunks:
            y = run(chunk)
            if out is None:
                out_sizes = tuple(int(n * s) for n, s in zip(sizes, footprint.scale))
                out = torch.empty((batch, y.shape[1], *out_sizes), dtype=y.dtype, device=y.device)
            for index, place in enumerate(chunk):
                src = tuple(slice(int((lo - s) * sc), int((hi - s) * sc)) for (s, lo, hi), sc in zip(place, footprint.scale))
                dst = tuple(slice(int(lo * sc), int(hi * sc)) for (_, lo, hi), sc in zip(place, footprint.scale))
                out[(slice(None), slice(None), *dst)] = y[index * batch:(index + 1) * batch][(slice(None), slice(None), *src)]
    finally:
        norms.restore()
    return out
