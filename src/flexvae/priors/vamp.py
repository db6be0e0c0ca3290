"""The VampPrior (Tomczak & Welling 2018): the prior is the encoder's posterior averaged over K
learned pseudo-inputs u_k, p(z) = 1/K sum_k q(z | u_k). The pseudo-inputs are images of the
data's shape, kept in [-1, 1] by a hard tanh as in the paper, and trained with the model."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import Arg, Prior, normal_log_prob, register_prior


@register_prior("Vamp", Arg("components", int, 50, "pseudo-inputs"),
                doc="VampPrior: the encoder's posterior averaged over learned pseudo-inputs")
class VampPrior(Prior):
    def __init__(self, components: int = 50, latent_shape=(), data_shape=()):
        super().__init__(latent_shape, data_shape)
        if not 1 <= components <= 4096:
            raise ValueError(f"components must lie in [1, 4096], found {components}")
        self.components = components
        generator = torch.Generator().manual_seed(components)
        self.pseudo_inputs = nn.Parameter(0.1 * torch.randn((components, *self.data_shape), generator=generator))

    def extra_repr(self) -> str:
        return f"components={self.components}"

    def components_of(self, vae):
        """(means, log-variances), (K, D), of q(z | u_k)."""
        posterior = vae.encode(F.hardtanh(self.pseudo_inputs))
        return posterior.mean.flatten(1).float(), posterior.logvar.flatten(1).float()

    def log_prob(self, z, vae):
        means, logvars = self.components_of(vae)
        per_component = normal_log_prob(z.flatten(1).float().unsqueeze(1), means, logvars).sum(2)
        return torch.logsumexp(per_component, dim=1) - math.log(self.components)

    @torch.no_grad()
    def sample(self, n, vae, generator=None, device=None, temperature=1.0):
        means, logvars = self.components_of(vae)
        device = device or means.device
        k = torch.randint(0, self.components, (n,), generator=generator, device=device)
        noise = torch.randn((n, self.dims), generator=generator, device=device) * temperature
        z = means.to(device)[k] + torch.exp(0.5 * logvars.to(device)[k]) * noise
        return z.view(n, *self.latent_shape)
