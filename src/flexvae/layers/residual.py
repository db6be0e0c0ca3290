"""Residual spans, the ReZero gain and DC-AE's non-parametric shortcuts.

A residual span in a structure file, ``{"residual": [tokens], "shortcut": "TOKEN"}``, builds a
``ResidualSpan``: shortcut(x) + body(x), the shortcut the identity when none is named. With it
a ResNet, ConvNeXt or DC-AE block is declared in the structure, not coded.

DC-AE (Chen et al. 2024, "Deep Compression Autoencoder") adds shortcuts that change the
resolution without weights, so a deep-compression autoencoder keeps a clean residual path
through every down- and up-sampling block:

- ``S2C_r_out`` (space to channel): pixel-unshuffle by r, (C, H, W) -> (C r^2, H/r, W/r), then
  average each run of C r^2 / out consecutive channels down to ``out`` channels;
- ``C2S_r_out`` (channel to space): repeat each channel out r^2 / C times, then pixel-shuffle
  by r, (C, H, W) -> (out, H r, W r).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..dsl.grammar import INFER
from ..registry import Arg, register


class ResidualSpan(nn.Module):
    """shortcut(x) + body(x); built from a residual span of a structure (build.trace)."""

    checkpoint_unit = True  # recomputed under train.grad_checkpointing = "blocks"

    def __init__(self, body: nn.Module, shortcut: nn.Module | None = None):
        super().__init__()
        self.body = body
        self.shortcut = shortcut if shortcut is not None else nn.Identity()

    def forward(self, x):
        return self.shortcut(x) + self.body(x)


@register(
    "Gain",
    Arg("init", float, 0.0, doc="its starting value"),
    doc="multiply by one learned scalar; Gain_0 last in a residual body starts the span as its shortcut (ReZero)",
)
class Gain(nn.Module):
    """ReZero (Bachlechner et al. 2021): a residual body ending in a zero gain adds nothing at
    first, so a span added to a working model starts by leaving it as it is."""

    receptive_margin = 0

    def __init__(self, init: float = 0.0):
        super().__init__()
        self.gain = nn.Parameter(torch.tensor(float(init)))

    def forward(self, x):
        return x * self.gain


@register(
    "S2C",
    Arg("factor", doc="r: every spatial size is divided by r"),
    Arg("out_channels", doc="output channels; must divide in_channels * r * r"),
    Arg("in_channels", infer="channels", default=INFER, doc="input channels (inferred)"),
    doc="DC-AE space-to-channel shortcut: pixel-unshuffle by r, then average channel groups (no weights)",
    dims=2,
)
class SpaceToChannel(nn.Module):
    receptive_margin = 0  # output o reads exactly its own r x r block

    def __init__(self, factor: int, out_channels: int, in_channels: int = 0):
        super().__init__()
        if factor < 1 or out_channels < 1:
            raise ValueError(f"factor and out_channels must be positive, got {factor} and {out_channels}")
        if in_channels and (in_channels * factor * factor) % out_channels:
            raise ValueError(f"{in_channels} channels x {factor}^2 = {in_channels * factor * factor} cannot be "
                             f"averaged into {out_channels} channels (it must be a multiple)")
        self.factor, self.out_channels = int(factor), int(out_channels)

    def forward(self, x):
        x = F.pixel_unshuffle(x, self.factor)
        batch, channels, height, width = x.shape
        return x.view(batch, self.out_channels, channels // self.out_channels, height, width).mean(dim=2)

    def extra_repr(self) -> str:
        return f"factor={self.factor}, out_channels={self.out_channels}"


@register(
    "C2S",
    Arg("factor", doc="r: every spatial size is multiplied by r"),
    Arg("out_channels", doc="output channels; out_channels * r * r must be a multiple of in_channels"),
    Arg("in_channels", infer="channels", default=INFER, doc="input channels (inferred)"),
    doc="DC-AE channel-to-space shortcut: repeat channels, then pixel-shuffle by r (no weights)",
    dims=2,
)
class ChannelToSpace(nn.Module):
    receptive_margin = 0  # output o reads the one input position it lies in

    def __init__(self, factor: int, out_channels: int, in_channels: int = 0):
        super().__init__()
        if factor < 1 or out_channels < 1:
            raise ValueError(f"factor and out_channels must be positive, got {factor} and {out_channels}")
        if in_channels and (out_channels * factor * factor) % in_channels:
            raise ValueError(f"{out_channels} channels x {factor}^2 = {out_channels * factor * factor} is not a "
                             f"multiple of the {in_channels} input channels")
        self.factor, self.out_channels = int(factor), int(out_channels)

    def forward(self, x):
        repeats = self.out_channels * self.factor * self.factor // x.shape[1]
        return F.pixel_shuffle(x.repeat_interleave(repeats, dim=1), self.factor)

    def extra_repr(self) -> str:
        return f"factor={self.factor}, out_channels={self.out_channels}"
