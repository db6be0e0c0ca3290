"""Self-attention over every position of a feature map (non-causal)."""

import torch.nn as nn
import torch.nn.functional as F

from ..registry import Arg, register
from .norm_act import DEFAULT_GROUPS, FP32GroupNorm, group_count


@register(
    "VAEA",
    Arg("channels", infer="channels", doc="channels"),
    Arg("groups", default=DEFAULT_GROUPS, doc="GroupNorm groups (largest divisor of the channels up to this)"),
    Arg("eps", float, 1e-5, doc="GroupNorm eps (1e-6 in Stable Diffusion)"),
    doc="GroupNorm, single-head self-attention over all positions (not causal), projection, plus the input",
)
class AttentionBlock(nn.Module):
    checkpoint_unit = True  # recomputed under train.grad_checkpointing = "blocks"
    receptive_margin = None  # every position attends to every other (tiling: receptive.py)

    def __init__(self, channels: int, groups: int = DEFAULT_GROUPS, eps: float = 1e-5):
        super().__init__()
        self.group_norm = FP32GroupNorm(group_count(channels, groups), channels, eps=eps)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.Linear(channels, channels)

    def forward(self, x):
        batch, channels, *spatial = x.shape
        h = self.group_norm(x)
        h = h.reshape(batch, channels, -1).transpose(1, 2)  # (B, C, N) -> (B, N, C), N = prod(spatial)
        q, k, v = (proj(h).unsqueeze(1) for proj in (self.to_q, self.to_k, self.to_v))  # (B, 1, N, C)
        # Every position attends to every other: no mask, is_causal=False (an image has no order).
        h = F.scaled_dot_product_attention(q, k, v, is_causal=False).squeeze(1)
        h = self.to_out(h).transpose(1, 2).reshape(batch, channels, *spatial)
        return x + h
