"""Finite scalar quantization (FSQ): each channel is bounded and rounded to a few levels.

For levels (L_1, ..., L_C) the encoder outputs C channels per position. Channel i is squashed
by tanh into L_i equally spaced values and rounded (straight-through gradient), then scaled
to [-1, 1]; the code of a position is the mixed-radix number of its per-channel digits, so
there are prod(L_i) codes and log2(prod(L_i)) bits per position. There is no codebook and no
auxiliary loss.

Even level counts need a half-step offset: with L = 8 the rounded values are -4 .. 3, so
the tanh is shifted by atanh(0.5 / half_width) and 0.5 is subtracted after scaling.
"""

from __future__ import annotations

import math

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..fields import AT_LEAST_TWO, setting
from .quantized import CodeUsage, QuantizedLatent
from .registry import register_latent

BOUND_EPS = 1e-3  # keeps the squashed value strictly inside the outermost rounding cell


class FiniteScalarQuantizer(nn.Module):
    """Quantizes channel-first maps (B, len(levels), *spatial); ``forward`` returns
    ``(z_q, codes, {})`` with z_q in [-1, 1] and codes (B, *spatial) in [0, prod(levels))."""

    receptive_margin = 0  # each position quantized on its own (tiling: receptive.py)

    def __init__(self, levels):
        super().__init__()
        levels = tuple(int(level) for level in levels)
        if not levels:
            raise ValueError("FSQ needs at least one level count, e.g. 8_5_5_5")
        if any(level < 2 for level in levels):
            raise ValueError(f"every FSQ level count must be at least 2, got {list(levels)}")
        self.levels = levels
        self.num_codes = math.prod(levels)
        basis = [math.prod(levels[:i]) for i in range(len(levels))]  # channel 0 is the lowest digit
        self.register_buffer("_levels", torch.tensor(levels, dtype=torch.float32), persistent=False)
        self.register_buffer("_basis", torch.tensor(basis, dtype=torch.long), persistent=False)
        self.usage = CodeUsage(self.num_codes)

    @property
    def dim(self) -> int:
        return len(self.levels)

    def extra_repr(self) -> str:
        return f"levels={list(self.levels)}"

    def metrics(self) -> dict:
        return self.usage.metrics("fsq")

    def _per_channel(self, t: torch.Tensor, ndim: int) -> torch.Tensor:
        """A (C,) vector shaped to broadcast over (B, C, *spatial)."""
        return t.view(1, -1, *([1] * (ndim - 2)))

    def _half_width(self, ndim: int) -> torch.Tensor:
        """Integer half-width per channel: rounded values run from -half to L - 1 - half."""
        return self._per_channel(torch.div(self._levels, 2, rounding_mode="floor"), ndim)

    def bound(self, z: torch.Tensor) -> torch.Tensor:
        """Squash to (-half - 0.5, L - half - 0.5) so rounding yields exactly L integer values."""
        levels = self._per_channel(self._levels, z.dim())
        half_l = (levels - 1) * (1 + BOUND_EPS) / 2
        offset = torch.where(levels % 2 == 0, 0.5, 0.0)
        shift = torch.atanh(offset / half_l)
        return torch.tanh(z + shift) * half_l - offset

    def forward(self, z: torch.Tensor):
        if z.dim() < 2 or z.shape[1] != self.dim:
            raise ValueError(
                f"FSQ with {self.dim} levels {list(self.levels)} needs {self.dim} channels, "
                f"got shape {tuple(z.shape[1:])}"
            )
        bounded = self.bound(z.float())
        rounded = bounded + (torch.round(bounded) - bounded).detach()  # straight-through rounding
        z_q = (rounded / self._half_width(z.dim())).to(z.dtype)
        codes = self.codes_to_indices(z_q)
        if self.training:
            self.usage.update(codes)
        return z_q, codes, {}

    # --------------------------------------------------------- index <-> code
    def codes_to_indices(self, z_q: torch.Tensor) -> torch.Tensor:
        """Quantized map (B, C, *spatial) in [-1, 1] -> integer codes (B, *spatial)."""
        half = self._half_width(z_q.dim())
        digits = torch.round(z_q.detach().float() * half + half).long()
        return (digits * self._per_channel(self._basis, z_q.dim())).sum(dim=1)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """Integer codes (B, *spatial) -> quantized map (B, C, *spatial) in [-1, 1]."""
        ndim = codes.dim() + 1
        codes = codes.long().unsqueeze(1)
        levels = self._per_channel(self._levels, ndim).long()
        digits = torch.div(codes, self._per_channel(self._basis, ndim), rounding_mode="floor") % levels
        half = self._half_width(ndim)
        return (digits.float() - half) / half


@dataclass(frozen=True)
class FSQParams:
    fsq_levels: list[int] = setting(
        [8, 5, 5, 5], "fsq: levels per channel; the encoder's last layer outputs len(levels) channels",
        AT_LEAST_TWO, (1, None))


@register_latent("fsq", FSQParams, doc="finite scalar quantization, prod(levels) codes per position")
class FSQLatent(QuantizedLatent):
    """The encoder outputs len(levels) channels; each position becomes one of prod(levels) codes."""

    def __init__(self, fsq_levels=(8, 5, 5, 5)):
        super().__init__()
        self.quantizer = FiniteScalarQuantizer(fsq_levels)

    def _requirement(self, dim: int) -> str:
        return f"an fsq latent with levels {list(self.quantizer.levels)} needs one channel per level: {dim}"
