"""Dropout whose masks are drawn for the global batch during training.

Under DDP each process holds every N-th sample of the global batch. Masks drawn from each
process's own RNG would make N processes differ from one process with the same global batch
(and, seeded alike, repeat the same masks on every rank). Inside ``global_batch_masks``
(which the training step enters for each micro-batch) a layer draws the mask of the whole
global batch from a generator keyed by (seed, step, micro-batch, layer) and keeps its own
rows, as the latent's sampling noise does. The key does not depend on how often a layer
runs, so the recomputation of gradient checkpointing draws the same mask. Outside that
context (evaluation, plain use) it is ordinary dropout.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

_MASKS = contextvars.ContextVar("flexvae_global_batch_masks", default=None)


@dataclass
class _MaskContext:
    key: int
    rank: int
    world_size: int
    layers: dict = field(default_factory=dict)  # layer -> its number in this context

    def generator(self, layer, device) -> torch.Generator:
        number = self.layers.setdefault(id(layer), len(self.layers))
        return torch.Generator(device=device).manual_seed((self.key * 1_000_003 + number) % 2**63)


@contextlib.contextmanager
def global_batch_masks(key: int, rank: int = 0, world_size: int = 1):
    """Draw dropout masks for the global batch, keyed by ``key`` (one per step and micro-batch)."""
    token = _MASKS.set(_MaskContext(int(key), rank, world_size))
    try:
        yield
    finally:
        _MASKS.reset(token)


class BatchDropout(nn.Module):
    """``nn.Dropout`` with masks drawn for the global batch inside ``global_batch_masks``."""

    receptive_margin = 0  # an elementwise mask (tiling: receptive.py)

    def __init__(self, p: float = 0.5):
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = float(p)

    def extra_repr(self) -> str:
        return f"p={self.p}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        context = _MASKS.get()
        if not self.training or self.p == 0 or x.is_meta:
            return x
        if context is None:
            return F.dropout(x, self.p, training=True)
        generator = context.generator(self, x.device)
        shape = (x.shape[0] * context.world_size, *x.shape[1:])
        keep = torch.rand(shape, generator=generator, device=x.device)[context.rank::context.world_size] >= self.p
        return x * keep.to(x.dtype) / (1 - self.p)
