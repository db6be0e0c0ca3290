"""A small normalizing flow as the prior: RealNVP affine couplings (Dinh et al. 2017) over the
flattened latent, alternating which half of the values conditions the other, on a standard
normal base. The last layer of each coupling starts at zero, so the flow starts as the
identity and the prior as N(0, I). The same network is the fitted flow of fitted_prior.py.

Going from a latent z to the base u: for each coupling with mask m,
u = m*z + (1-m) * (z * exp(s(m*z)) + t(m*z)),  log|det| += sum (1-m) * s; log p(z) = log N(u) + log|det|.
Sampling runs the couplings backwards from u ~ N(0, T^2 I)."""

from __future__ import annotations

import torch
import torch.nn as nn

from .base import LOG_2PI, Arg, Prior, register_prior

MAX_LAYERS, MAX_HIDDEN = 32, 8192


class Coupling(nn.Module):
    def __init__(self, dims: int, hidden: int, parity: int):
        super().__init__()
        mask = (torch.arange(dims) % 2 == parity).float() if dims > 1 else torch.zeros(1)
        self.register_buffer("mask", mask, persistent=False)
        self.net = nn.Sequential(nn.Linear(dims, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, 2 * dims))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def shift_scale(self, kept: torch.Tensor):
        s, t = self.net(kept).chunk(2, dim=1)
        free = 1 - self.mask
        return torch.tanh(s) * free, t * free

    def forward(self, z):
        """z -> u and log|det du/dz| (B,)."""
        kept = z * self.mask
        s, t = self.shift_scale(kept)
        return kept + (1 - self.mask) * (z * torch.exp(s) + t), s.sum(1)

    def inverse(self, u):
        kept = u * self.mask
        s, t = self.shift_scale(kept)
        return kept + (1 - self.mask) * ((u - t) * torch.exp(-s))


class FlowNetwork(nn.Module):
    """``layers`` couplings over ``dims`` values: ``log_prob`` (B,), ``sample``."""

    def __init__(self, dims: int, layers: int = 4, hidden: int = 128):
        super().__init__()
        if not 1 <= layers <= MAX_LAYERS:
            raise ValueError(f"layers must lie in [1, {MAX_LAYERS}], found {layers}")
        if not 1 <= hidden <= MAX_HIDDEN:
            raise ValueError(f"hidden must lie in [1, {MAX_HIDDEN}], found {hidden}")
        self.dims, self.layers, self.hidden = dims, layers, hidden
        self.couplings = nn.ModuleList(Coupling(dims, hidden, i % 2) for i in range(layers))

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        u, log_det = z.flatten(1).float(), 0.0
        for coupling in self.couplings:
            u, step = coupling(u)
            log_det = log_det + step
        return -0.5 * (u.pow(2) + LOG_2PI).sum(1) + log_det

    @torch.no_grad()
    def sample(self, n: int, generator=None, device=None, temperature: float = 1.0) -> torch.Tensor:
        device = device or next(self.parameters()).device
        u = torch.randn((n, self.dims), generator=generator, device=device) * temperature
        for coupling in reversed(self.couplings):
            u = coupling.inverse(u)
        return u


@register_prior("Flow", Arg("layers", int, 4, "affine coupling layers"),
                Arg("hidden", int, 128, "hidden units of each coupling's network"),
                doc="a RealNVP flow on a standard normal, trained with the model (starts as N(0, I))")
class FlowPrior(Prior):
    def __init__(self, layers: int = 4, hidden: int = 128, latent_shape=(), data_shape=()):
        super().__init__(latent_shape, data_shape)
        self.flow = FlowNetwork(self.dims, layers, hidden)

    def extra_repr(self) -> str:
        return f"layers={self.flow.layers}, hidden={self.flow.hidden}"

    def log_prob(self, z, vae=None):
        return self.flow.log_prob(z)

    def sample(self, n, vae=None, generator=None, device=None, temperature=1.0):
        return self.flow.sample(n, generator, device, temperature).view(n, *self.latent_shape)


def flow_parameters(dims: int, layers: int, hidden: int) -> int:
    """How many values a flow of this size holds (checked before a stored one is read)."""
    return layers * (dims * hidden + hidden + hidden * hidden + hidden + hidden * 2 * dims + 2 * dims)

