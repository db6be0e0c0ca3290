"""Continuous latents: diagonal Gaussian (the VAE) and deterministic (a plain autoencoder)."""

from __future__ import annotations

import torch

from ..utils import format_shape
from .base import Latent, Posterior, PointPosterior
from .registry import register_latent

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


class DiagonalGaussian(Posterior):
    """q(z|x) = N(mean, exp(logvar)), log-variance clamped to [-30, 20] (``clamp=False``: as
    given). Its KL is to N(0, I), or to ``prior``, another diagonal Gaussian (a hierarchy's
    learned p(z_i | z_<i)): one formula for both."""

    def __init__(self, mean: torch.Tensor, logvar: torch.Tensor, prior: "DiagonalGaussian | None" = None,
                 clamp: bool = True):
        self.mean = mean
        self.logvar = logvar.clamp(LOGVAR_MIN, LOGVAR_MAX) if clamp else logvar
        self.prior = prior

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
        """mean + std * noise; the noise is drawn from ``generator`` unless given."""
        if noise is None:
            noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise.to(self.mean.dtype)

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl_elements(self) -> torch.Tensor:
        """KL(q || p) per latent element, same shape as the mean; p = N(0, I) or ``prior``."""
        if self.prior is None:
            return 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar)
        p = self.prior
        return 0.5 * (p.logvar - self.logvar - 1.0 + (self.logvar.exp() + (self.mean - p.mean).pow(2)) * torch.exp(-p.logvar))

    def variance(self) -> torch.Tensor:
        return self.logvar.exp()


@register_latent("gaussian", doc="diagonal Gaussian posterior, KL to N(0, I)")
class GaussianLatent(Latent):
    """The encoder outputs 2k channels: the first k are the mean, the last k the log-variance."""

    noise_kind = "normal"

    def latent_shape(self, encoder_shape: tuple[int, ...]) -> tuple[int, ...]:
        channels = encoder_shape[0]
        if channels % 2:
            raise ValueError(
                f"the encoder outputs {channels} channels (shape {format_shape(encoder_shape)}), "
                f"but a gaussian latent needs an even number: 2 x latent channels, "
                f"split into mean and log-variance. Make the last layer output {channels + 1} "
                f"or {channels - 1} channels"
            )
        return (channels // 2, *encoder_shape[1:])

    def forward(self, h: torch.Tensor, step: int | None = None) -> DiagonalGaussian:
        mean, logvar = h.chunk(2, dim=1)
        return DiagonalGaussian(mean, logvar)

    def noise_shape(self, latent_shape) -> tuple[int, ...]:
        return tuple(latent_shape)

    def sample_prior(self, n, latent_shape, generator=None, device=None) -> torch.Tensor:
        return torch.randn((n, *latent_shape), generator=generator, device=device)


@register_latent("deterministic", doc="the encoder's output itself, no KL (a plain autoencoder)")
class DeterministicLatent(Latent):
    """The encoder's output is the latent itself; no KL term (a plain autoencoder)."""

    def latent_shape(self, encoder_shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(encoder_shape)

    def forward(self, h: torch.Tensor, step: int | None = None) -> PointPosterior:
        return PointPosterior(h)

    def sample_prior(self, n, latent_shape, generator=None, device=None) -> torch.Tensor:
        # An autoencoder has no prior; a standard normal is the usual stand-in.
        return torch.randn((n, *latent_shape), generator=generator, device=device)
