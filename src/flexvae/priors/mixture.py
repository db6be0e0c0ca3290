"""A learned mixture of K diagonal Gaussians as the prior (Tomczak & Welling 2018 compare it
with the VampPrior): log p(z) = logsumexp_k [log pi_k + log N(z; mu_k, diag sigma_k^2)]."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import Arg, Prior, normal_log_prob, register_prior


@register_prior("MoG", Arg("components", int, 10, "mixture components"),
                doc="a learned mixture of diagonal Gaussians (weights, means and variances trained with the model)")
class MixturePrior(Prior):
    def __init__(self, components: int = 10, latent_shape=(), data_shape=()):
        super().__init__(latent_shape, data_shape)
        if not 1 <= components <= 4096:
            raise ValueError(f"components must lie in [1, 4096], found {components}")
        self.components = components
        # means spread like draws of N(0, I), so the components start apart; unit variances
        generator = torch.Generator().manual_seed(components)
        self.means = nn.Parameter(torch.randn((components, self.dims), generator=generator))
        self.logvars = nn.Parameter(torch.zeros(components, self.dims))
        self.logits = nn.Parameter(torch.zeros(components))

    def extra_repr(self) -> str:
        return f"components={self.components}"

    def log_prob(self, z, vae=None):
        flat = z.flatten(1).float().unsqueeze(1)  # (B, 1, D)
        per_component = normal_log_prob(flat, self.means, self.logvars).sum(2)  # (B, K)
        return torch.logsumexp(per_component + F.log_softmax(self.logits, 0), dim=1)

    @torch.no_grad()
    def sample(self, n, vae=None, generator=None, device=None, temperature=1.0):
        device = device or self.means.device
        weights = F.softmax(self.logits.float(), 0).to(device)
        k = torch.multinomial(weights, n, replacement=True, generator=generator)
        noise = torch.randn((n, self.dims), generator=generator, device=device) * temperature
        z = self.means.to(device)[k] + torch.exp(0.5 * self.logvars.to(device)[k]) * noise
        return z.view(n, *self.latent_shape)
