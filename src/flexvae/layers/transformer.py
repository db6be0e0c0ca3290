"""Vision-transformer tokens, on channel-first maps so they compose with every other token.

    "Patch_8_256"        (3, 64, 64) -> (256, 8, 8): each 8 x 8 patch embedded linearly
    "Pos2d"              adds the fixed 2D sine-cosine position embedding (any grid size)
    "6*ViT_8"            six transformer blocks with 8 heads (width = the input's channels)
    "Unpatch_8_3"        (256, 8, 8) -> (3, 64, 64): each position to an 8 x 8 patch of 3 channels

A ViT block is pre-norm (Dosovitskiy et al. 2021): x + attention(LN(x)), then x + MLP(LN(x)),
the attention over every position through ``F.scaled_dot_product_attention`` (flash or
memory-efficient kernels where the device has them), the MLP ``mlp`` times wider with GELU.
The 2D sine-cosine embedding is MAE's (He et al. 2022): a quarter of the channels for sin and
cos of the row and of the column at geometric frequencies; it has no weights, so a ViT
autoencoder takes images of sizes it was not trained at.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..dsl.grammar import INFER
from ..registry import Arg, register


@register(
    "Patch",
    Arg("patch", doc="patch side p (also the stride)"),
    Arg("dim", doc="embedding width (output channels)"),
    Arg("in_channels", infer="channels", default=INFER, doc="input channels (inferred)"),
    doc="patch embedding: each p x p patch to a dim vector, (C, H, W) -> (dim, H/p, W/p)",
    dims=2,
)
class PatchEmbed(nn.Conv2d):
    def __init__(self, patch: int, dim: int, in_channels: int = 0):
        super().__init__(in_channels, dim, patch, stride=patch)


@register(
    "Unpatch",
    Arg("patch", doc="patch side p"),
    Arg("out_channels", doc="channels of each output pixel"),
    Arg("in_channels", infer="channels", default=INFER, doc="input channels (inferred)"),
    doc="patch output: each position to a p x p patch, (dim, H, W) -> (out_channels, H p, W p)",
    dims=2,
)
class Unpatch(nn.Module):
    def __init__(self, patch: int, out_channels: int, in_channels: int = 0):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, out_channels * patch * patch, 1)
        self.shuffle = nn.PixelShuffle(patch)

    def forward(self, x):
        return self.shuffle(self.proj(x))


def sincos_2d(channels: int, height: int, width: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """(channels, height, width): sin/cos of the row in the first half, of the column in the second."""
    if channels % 4:
        raise ValueError(f"a 2D sine-cosine embedding needs channels divisible by 4, got {channels}")
    quarter = channels // 4
    omega = 1.0 / (10000 ** (torch.arange(quarter, dtype=torch.float64, device=device) / quarter))
    rows = torch.arange(height, dtype=torch.float64, device=device)[:, None] * omega  # (H, quarter)
    cols = torch.arange(width, dtype=torch.float64, device=device)[:, None] * omega  # (W, quarter)
    row_part = torch.cat([rows.sin(), rows.cos()], dim=1).T[:, :, None].expand(-1, height, width)
    col_part = torch.cat([cols.sin(), cols.cos()], dim=1).T[:, None, :].expand(-1, height, width)
    return torch.cat([row_part, col_part]).to(dtype)


@register(
    "Pos2d",
    Arg("channels", infer="channels", default=INFER, doc="channels (inferred; divisible by 4)"),
    doc="adds the fixed 2D sine-cosine position embedding (no weights, any grid size)",
    dims=2,
)
class Position2d(nn.Module):
    receptive_margin = None  # the embedding depends on where a position lies in the whole image

    def __init__(self, channels: int = 0):
        super().__init__()
        if channels % 4:
            raise ValueError(f"a 2D sine-cosine embedding needs channels divisible by 4, got {channels}")

    def forward(self, x):
        return x + sincos_2d(x.shape[1], x.shape[2], x.shape[3], x.device, x.dtype)


@register(
    "ViT",
    Arg("heads", doc="attention heads; must divide the width"),
    Arg("dim", infer="channels", default=INFER, doc="width (the input's channels, inferred)"),
    Arg("mlp", float, 4.0, doc="MLP width as a multiple of the block's width"),
    Arg("eps", float, 1e-6, doc="LayerNorm eps"),
    doc="pre-norm transformer block over every position: x + MHSA(LN(x)), x + MLP(LN(x)) (SDPA attention)",
)
class TransformerBlock(nn.Module):
    checkpoint_unit = True  # recomputed under train.grad_checkpointing = "blocks"
    receptive_margin = None  # every position attends to every other (tiling: receptive.py)

    def __init__(self, heads: int, dim: int = 0, mlp: float = 4.0, eps: float = 1e-6):
        super().__init__()
        if heads < 1 or dim % heads:
            raise ValueError(f"{heads} heads do not divide the width {dim}")
        hidden = max(1, int(round(dim * mlp)))
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x):
        batch, channels, *spatial = x.shape
        h = x.reshape(batch, channels, -1).transpose(1, 2)  # (B, N, C)
        q, k, v = self.qkv(self.norm1(h)).view(batch, -1, 3, self.heads, channels // self.heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, -1, channels)
        h = h + self.proj(attended)
        h = h + self.mlp(self.norm2(h))
        return h.transpose(1, 2).reshape(batch, channels, *spatial)
