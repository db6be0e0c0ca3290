"""Convolutions: C1d/C2d/C3d (in, out, kernel, stride, padding: FlexVAE's C2d order), transposed variants and
the stride-2 downsampling convolution ``Down``."""

import torch.nn as nn
import torch.nn.functional as F

from ..registry import Arg, register

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def _conv_args(transposed=False):
    args = [
        Arg("in_channels", infer="channels", doc="input channels"),
        Arg("out_channels", doc="output channels"),
        Arg("kernel_size", doc="kernel size"),
        Arg("stride", default=1, doc="stride"),
        Arg("padding", default=0, doc="zero padding on every side"),
    ]
    if transposed:
        args.append(Arg("output_padding", default=0, doc="extra size added to one side of the output"))
    args += [
        Arg("dilation", default=1, doc="spacing between kernel elements"),
        Arg("groups", default=1, doc="blocked connections from input to output channels"),
        Arg("bias", bool, True, doc="learn an additive bias"),
    ]
    if not transposed:
        args.append(Arg("padding_mode", str, "zeros", doc="how to pad", choices=PADDING_MODES))
    return args


register("C1d", *_conv_args(), doc="1D convolution (nn.Conv1d)", dims=1)(nn.Conv1d)
register("C2d", *_conv_args(), doc="2D convolution (nn.Conv2d)", dims=2)(nn.Conv2d)
register("C3d", *_conv_args(), doc="3D convolution (nn.Conv3d)", dims=3)(nn.Conv3d)
register("CT1d", *_conv_args(True), doc="1D transposed convolution (nn.ConvTranspose1d)", dims=1)(
    nn.ConvTranspose1d
)
register("CT2d", *_conv_args(True), doc="2D transposed convolution (nn.ConvTranspose2d)", dims=2)(
    nn.ConvTranspose2d
)
register("CT3d", *_conv_args(True), doc="3D transposed convolution (nn.ConvTranspose3d)", dims=3)(
    nn.ConvTranspose3d
)

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def conv_nd(dims: int, *args, **kwargs) -> nn.Module:
    """Conv1d/2d/3d picked by the number of spatial dims."""
    return _CONV[dims](*args, **kwargs)


@register(
    "Down",
    Arg("in_channels", infer="channels", doc="input channels"),
    Arg("out_channels", doc="output channels"),
    Arg("pad", str, "sym", choices=("sym", "asym"),
        doc="sym: pad 1 on every side; asym: pad 0 before and 1 after (Stable Diffusion)"),
    doc="kernel-3 stride-2 convolution halving every spatial size (any dims)",
    dims=(1, 2, 3),
    pass_dims=True,
)
class Downsample(nn.Module):
    # Output o reads inputs 2o-1..2o+1 (sym) or 2o..2o+2 (asym): one beyond its own pair [2o, 2o+1].
    receptive_margin = 1

    def __init__(self, in_channels: int, out_channels: int, pad: str = "sym", dims: int = 2):
        super().__init__()
        self.asymmetric = pad == "asym"
        self.conv = conv_nd(dims, in_channels, out_channels, 3, stride=2, padding=0 if self.asymmetric else 1)
        # F.pad lists (before, after) per dim from the last dim backwards: (0, 1) everywhere.
        self.pad_amounts = (0, 1) * dims

    def forward(self, x):
        if self.asymmetric:
            x = F.pad(x, self.pad_amounts)
        return self.conv(x)
