"""The VAE residual block: (GroupNorm, SiLU, 3x3 conv) twice plus the input, through a 1x1 conv
when the channels change; the block of FlexVAE and of the Stable Diffusion autoencoder."""

import torch.nn as nn
import torch.nn.functional as F

from ..registry import Arg, register
from .conv import conv_nd
from .dropout import BatchDropout
from .norm_act import DEFAULT_GROUPS, FP32GroupNorm, group_count


@register(
    "VAERB",
    Arg("in_channels", infer="channels", doc="input channels"),
    Arg("out_channels", doc="output channels"),
    Arg("groups", default=DEFAULT_GROUPS, doc="GroupNorm groups (largest divisor of the channels up to this)"),
    Arg("eps", float, 1e-5, doc="GroupNorm eps (1e-6 in Stable Diffusion)"),
    Arg("dropout", float, 0.0, doc="dropout before the second convolution"),
    doc="residual block: GroupNorm, SiLU, conv3x3, GroupNorm, SiLU, conv3x3, plus the input",
    dims=(1, 2, 3),
    pass_dims=True,
)
class ResidualBlock(nn.Module):
    checkpoint_unit = True  # recomputed under train.grad_checkpointing = "blocks"

    def __init__(self, in_channels: int, out_channels: int, groups: int = DEFAULT_GROUPS,
                 eps: float = 1e-5, dropout: float = 0.0, dims: int = 2):
        super().__init__()
        self.norm1 = FP32GroupNorm(group_count(in_channels, groups), in_channels, eps=eps)
        self.conv1 = conv_nd(dims, in_channels, out_channels, 3, padding=1)
        self.norm2 = FP32GroupNorm(group_count(out_channels, groups), out_channels, eps=eps)
        self.dropout = BatchDropout(dropout)
        self.conv2 = conv_nd(dims, out_channels, out_channels, 3, padding=1)
        # A 1x1 projection only where the channel counts differ; otherwise the input as is.
        self.conv_shortcut = conv_nd(dims, in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return shortcut + h
