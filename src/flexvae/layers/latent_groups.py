"""Hierarchy tokens: ``Keep`` names an encoder activation, ``Z`` draws a latent group in the
decoder from it (see flexvae/forward_state.py).

    encoder: [..., "Keep_name=s8", ...]          keep this activation as "s8"
    decoder: [..., "Z_16_enc=s8", ...]           a group of 16 channels at this position

``Z_C_enc=NAME`` at a decoder state h of shape (Ch, *S), with the encoder's NAME of shape
(Ce, *S) (the same positions):

- prior p(z | h): ``depth`` x (conv kernel x kernel (Ch -> hidden, then hidden -> hidden),
  SiLU), then conv1x1(hidden -> 2C) (mean, log-variance); defaults: depth 1, kernel 3;
- posterior q(z | h, enc): the same net on the channels of h and enc side by side;
- ``merge=add`` (default): h + conv1x1(C -> Ch)(z); ``merge=cat``: h and z side by side
  (Ch + C channels out).

Both nets' last layers start at zero, so at step 0 every group's prior and posterior are
N(0, I) and its KL is zero; the merge projections start scaled by 1/sqrt(number of groups),
and in a model with groups every residual block's last convolution by 1/sqrt(number of
residual blocks), so a deep hierarchy starts with the decoder's state near its deterministic
path. On vector
states (no positions) the convolutions are linear layers. ``name=`` names the group (default:
the encoder activation's name), ``hidden=`` sets the nets' width (default max(32, 2C)).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..forward_state import ForwardState, GroupPosterior, gaussian_log_density, split_gaussian
from ..registry import Arg, register
from .conv import conv_nd


def _layer(dims: int, cin: int, cout: int, kernel: int) -> nn.Module:
    if dims == 0:
        return nn.Linear(cin, cout)
    return conv_nd(dims, cin, cout, kernel, padding=kernel // 2)


class _GaussianNet(nn.Sequential):
    """``depth`` x (conv kernel x kernel, SiLU), then conv1x1 to mean and log-variance (zero at the start)."""

    def __init__(self, dims: int, cin: int, hidden: int, channels: int, depth: int = 1, kernel: int = 3):
        layers = []
        for index in range(depth):
            layers += [_layer(dims, cin if index == 0 else hidden, hidden, kernel), nn.SiLU()]
        super().__init__(*layers, _layer(dims, hidden, 2 * channels, 1))
        nn.init.zeros_(self[-1].weight)
        nn.init.zeros_(self[-1].bias)


@register(
    "Keep",
    Arg("name", str, doc="the name the decoder's Z tokens use (enc=NAME)"),
    doc="hierarchy: keep this encoder activation under a name, for the decoder's latent groups (identity)",
    context="keep",
)
class Keep(nn.Module):
    def __init__(self, name: str):
        super().__init__()
        self.name = name

    def extra_repr(self) -> str:
        return f"name={self.name!r}"

    def forward(self, x, state=None):
        if isinstance(state, ForwardState):
            state.kept[self.name] = x
        return x


@register(
    "Z",
    Arg("channels", doc="latent channels of the group"),
    Arg("enc", str, doc="the encoder activation (Keep_name=...) its posterior sees"),
    Arg("merge", str, "add", doc="add: state + conv1x1(z); cat: state and z side by side", choices=("add", "cat")),
    Arg("hidden", default=0, doc="width of the prior and posterior nets; 0 = max(32, 2 x channels)"),
    Arg("name", str, "", doc="the group's name in logs and files (default: enc)"),
    Arg("depth", default=1, doc="hidden layers of the prior and posterior nets"),
    Arg("kernel", default=3, doc="kernel size of their hidden layers (odd)"),
    doc="hierarchy: a latent group drawn from p(z|state) or q(z|state, encoder activation), merged into the state",
    pass_dims=True,
    context="group",
)
class LatentGroup(nn.Module):
    def __init__(self, channels: int, enc: str, merge: str = "add", hidden: int = 0, name: str = "",
                 depth: int = 1, kernel: int = 3, in_channels: int = 1, enc_channels: int = 1, dims: int = 2):
        super().__init__()
        if channels < 1 or hidden < 0 or depth < 1:
            raise ValueError(f"channels and depth must be positive and hidden >= 0, got {channels}, {depth}, {hidden}")
        if kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"kernel must be odd (the positions stay), got {kernel}")
        hidden = hidden or max(32, 2 * channels)
        self.channels, self.enc, self.merge, self.name = int(channels), enc, merge, name or enc
        self.prior = _GaussianNet(dims, in_channels, hidden, channels, depth, kernel)
        self.posterior = _GaussianNet(dims, in_channels + enc_channels, hidden, channels, depth, kernel)
        self.project = _layer(dims, channels, in_channels, 1) if merge == "add" else None

    def extra_repr(self) -> str:
        return f"name={self.name!r}, channels={self.channels}, enc={self.enc!r}, merge={self.merge!r}"

    def scale_init(self, factor: float) -> None:
        """Scale the merge projection's initial weights (1/sqrt(groups): a deep hierarchy starts stable)."""
        if self.project is not None:
            with torch.no_grad():
                self.project.weight.mul_(factor)

    def forward(self, h, state=None):
        state = state if isinstance(state, ForwardState) else ForwardState()
        prior = split_gaussian(self.prior(h))
        index, state.index = state.index, state.index + 1
        enc = state.kept.get(self.enc)
        use_posterior = enc is not None and (state.posterior_groups is None or index < state.posterior_groups)
        if self.name in state.given:
            z = state.given[self.name].to(h.device, torch.float32)
        elif use_posterior:
            q = split_gaussian(self.posterior(torch.cat([h, enc.to(h.dtype)], dim=1)))
            state.posteriors[self.name] = GroupPosterior(self.name, q, prior)
            z = q[0] + torch.exp(0.5 * q[1]) * state.draw(self.name, q[0]) if state.sample else q[0]
            if state.record:
                state.log_q[self.name] = gaussian_log_density(z, *q)
        else:
            t = state.temperature_of(self.name)
            z = prior[0] + t * torch.exp(0.5 * prior[1]) * state.draw(self.name, prior[0]) if t > 0 else prior[0]
        if state.record:
            state.log_p[self.name] = gaussian_log_density(z, *prior)
        state.values[self.name] = z
        z = z.to(h.dtype)
        if self.project is not None:
            return h + self.project(z)
        return torch.cat([h, z], dim=1)


@register(
    "Const",
    Arg("shape", variadic=True, doc="the constant's per-sample shape, e.g. Const_64_4_4"),
    doc="hierarchy: a learned constant (zero at the start) in place of its input: a decoder that starts from "
        "a constant and draws every latent in its groups (the top latent is then unused: its KL goes to zero)",
)
class Constant(nn.Module):
    def __init__(self, shape: tuple[int, ...]):
        super().__init__()
        if not shape or any(s < 1 for s in shape):
            raise ValueError(f"the constant needs positive sizes, got {shape}")
        self.value = nn.Parameter(torch.zeros(*shape))

    def forward(self, x):
        return self.value.to(x.dtype).expand(x.shape[0], *self.value.shape)


def scale_residual_blocks(*stacks) -> int:
    """In a hierarchical model, each residual block's last convolution starts scaled by
    1/sqrt(number of residual blocks in the model) (as VDVAE does), so the sum of many
    residual branches starts small; returns how many blocks were scaled."""
    from .resnet import ResidualBlock

    blocks = [m for stack in stacks for m in stack if isinstance(m, ResidualBlock)]
    with torch.no_grad():
        for block in blocks:
            block.conv2.weight.mul_(1 / math.sqrt(len(blocks)))
    return len(blocks)


def scale_groups(modules) -> int:
    """Apply the 1/sqrt(groups) initial scaling to a stack's groups; returns how many there are."""
    groups = [m for m in modules if isinstance(m, LatentGroup)]
    for group in groups:
        group.scale_init(1 / math.sqrt(len(groups)))
    return len(groups)


__all__ = ["Constant", "Keep", "LatentGroup", "scale_groups", "scale_residual_blocks"]
