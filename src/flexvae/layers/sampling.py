"""Changing spatial size: pooling, upsampling, pixel (un)shuffle."""

import torch.nn as nn

from ..registry import Arg, register


def _pool_args():
    return (
        Arg("kernel_size", doc="window size"),
        Arg("stride", default=0, doc="step; 0 means equal to kernel_size"),
        Arg("padding", default=0, doc="implicit padding"),
    )


def _pool(cls):
    """nn pooling class taking MaxP_kernel[_stride] (kernel first, as FlexVAE's structure files write it)."""

    def make(kernel_size: int, stride: int = 0, padding: int = 0):
        return cls(kernel_size, stride=stride or kernel_size, padding=padding)

    make.__name__ = make.__qualname__ = cls.__name__
    return make


register("MaxP1d", *_pool_args(), doc="1D max pooling", dims=1)(_pool(nn.MaxPool1d))
register("MaxP", *_pool_args(), doc="2D max pooling", dims=2)(_pool(nn.MaxPool2d))
register("MaxP3d", *_pool_args(), doc="3D max pooling", dims=3)(_pool(nn.MaxPool3d))
register("AvgP1d", *_pool_args(), doc="1D average pooling", dims=1)(_pool(nn.AvgPool1d))
register("AvgP", *_pool_args(), doc="2D average pooling", dims=2)(_pool(nn.AvgPool2d))
register("AvgP3d", *_pool_args(), doc="3D average pooling", dims=3)(_pool(nn.AvgPool3d))


@register(
    "UpS",
    Arg("scale_factor", doc="multiplier for every spatial size"),
    Arg("mode", str, "nearest", choices=("nearest", "nearest-exact", "linear", "bilinear", "bicubic", "trilinear"),
        doc="interpolation (linear/bilinear/trilinear must match the data's dims)"),
    doc="upsampling (nearest by default), any dims",
)
class Upsample(nn.Upsample):
    def __init__(self, scale_factor: int, mode: str = "nearest"):
        super().__init__(scale_factor=float(scale_factor), mode=mode)


register("PixS", Arg("upscale_factor", doc="r: (C*r*r, H, W) -> (C, H*r, W*r)"),
         doc="pixel shuffle (sub-pixel upsampling)", dims=2)(nn.PixelShuffle)
register("PixU", Arg("downscale_factor", doc="r: (C, H*r, W*r) -> (C*r*r, H, W)"),
         doc="pixel unshuffle (space to depth)", dims=2)(nn.PixelUnshuffle)
