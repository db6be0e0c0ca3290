"""Normalisation layers and activations."""

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..registry import Arg, register

DEFAULT_GROUPS = 32


def group_count(channels: int, groups: int = DEFAULT_GROUPS) -> int:
    """Group count for the GroupNorms inside blocks (VAERB, VAEA).

    The rule: ``groups`` when it divides ``channels``, otherwise the largest divisor of
    ``channels`` below it. 256 channels -> 32 groups, 48 -> 24, 16 -> 16, 3 -> 3.
    """
    if channels < 1 or groups < 1:
        raise ValueError(f"GroupNorm needs at least one channel and one group, got {channels} and {groups}")
    return max(g for g in range(1, min(groups, channels) + 1) if channels % g == 0)


class FP32GroupNorm(nn.GroupNorm):
    """GroupNorm whose statistics are computed in float32.

    Under autocast nothing is added: CUDA's autocast runs group_norm in float32, and the
    CPU kernel accumulates half-precision inputs' statistics in float32 itself, so an extra
    cast there would only cost a round trip (measured in bench/bench_sd_vae.py; the bf16
    error against fp32 is that of diffusers' AutoencoderKL). Outside autocast, a half-precision
    input (a model cast with .half()) is normalised in float32 and cast back.
    """

    def forward(self, x):
        if x.dtype in (torch.float16, torch.bfloat16) and not torch.is_autocast_enabled(x.device.type):
            weight = None if self.weight is None else self.weight.float()
            bias = None if self.bias is None else self.bias.float()
            return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).to(x.dtype)
        return super().forward(x)


@register(
    "GN",
    Arg("num_groups", doc="number of groups; must divide the channel count"),
    Arg("num_channels", infer="channels", doc="channels"),
    Arg("eps", float, 1e-5, doc="added to the variance"),
    Arg("affine", bool, True, doc="learn a per-channel scale and shift"),
    doc="GroupNorm over (channels/groups, *spatial), any dims",
)
class GroupNorm(FP32GroupNorm):
    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True):
        if num_groups < 1 or num_channels % num_groups:
            valid = [g for g in range(1, num_channels + 1) if num_channels % g == 0]
            raise ValueError(
                f"GroupNorm cannot split {num_channels} channels into {num_groups} groups; "
                f"the group count must divide the channels: {', '.join(map(str, valid))}"
            )
        super().__init__(num_groups, num_channels, eps=eps, affine=affine)


def _bn_args():
    return (
        Arg("num_features", infer="channels", doc="channels"),
        Arg("eps", float, 1e-5, doc="added to the variance"),
        Arg("momentum", float, 0.1, doc="running statistics update rate"),
    )


register("BN1d", *_bn_args(), doc="BatchNorm over (batch, length) per channel", dims=1)(nn.BatchNorm1d)
register("BN", *_bn_args(), doc="BatchNorm over (batch, H, W) per channel", dims=2)(nn.BatchNorm2d)
register("BN3d", *_bn_args(), doc="BatchNorm over (batch, D, H, W) per channel", dims=3)(nn.BatchNorm3d)


@register(
    "LN",
    Arg("normalized_shape", infer="features", doc="size of the last dimension"),
    Arg("eps", float, 1e-5, doc="added to the variance"),
    doc="LayerNorm over the last dimension (use after Flat, or on (C, L) sequences)",
)
class LayerNorm(nn.LayerNorm):
    pass


@register("Center", doc="subtract from each channel its mean over all positions (per sample)", dims=(1, 2, 3))
class Center(nn.Module):
    """x minus its per-sample, per-channel spatial mean: what follows sees only the variation
    within the image (before bias-free convolutions, a flat image then gives exactly zero)."""

    receptive_margin = None  # the mean is over every position

    def forward(self, x):
        return x - x.mean(dim=tuple(range(2, x.dim())), keepdim=True)


register("SiLU", doc="x * sigmoid(x)")(nn.SiLU)
register("ReLU", doc="max(x, 0)")(nn.ReLU)
register("LReLU", Arg("negative_slope", float, 0.01, doc="slope for x < 0"), doc="leaky ReLU")(nn.LeakyReLU)
register("GELU", Arg("approximate", str, "none", choices=("none", "tanh"), doc="tanh approximation"),
         doc="Gaussian error linear unit")(nn.GELU)
register("Tanh", doc="hyperbolic tangent, output in (-1, 1)")(nn.Tanh)
register("Sigm", doc="logistic sigmoid, output in (0, 1)")(nn.Sigmoid)
