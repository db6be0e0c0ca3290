"""Continuous latents: diagonal Gaussian (the VAE) and deterministic (a plain autoencoder)."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..utils import format_shape

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


def _batch_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over every non-batch dim, so 1D, 2D and 3D latents all give shape (B,)."""
    return t.flatten(1).sum(dim=1)


class DiagonalGaussian:
    """q(z|x) = N(mean, exp(logvar)); log-variance clamped to [-30, 20] as in the original."""

    def __init__(self, mean: torch.Tensor, logvar: torch.Tensor):
        self.mean = mean
        self.logvar = logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)

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
        """KL(q || N(0, I)) per latent element, same shape as the mean."""
        return 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar)

    def kl(self) -> torch.Tensor:
        return _batch_sum(self.kl_elements())

    def aux_losses(self) -> dict:
        return {}


class PointPosterior:
    """A deterministic code: sampling returns the code itself and the KL term is zero."""

    def __init__(self, value: torch.Tensor):
        self.mean = value

    def sample(self, generator=None) -> torch.Tensor:
        return self.mean

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl_elements(self) -> torch.Tensor:
        return torch.zeros_like(self.mean)

    def kl(self) -> torch.Tensor:
        return self.mean.new_zeros(self.mean.shape[0])

    def aux_losses(self) -> dict:
        return {}


class GaussianLatent(nn.Module):
    """The encoder outputs 2k channels: the first k are the mean, the last k the log-variance."""

    kind = "gaussian"

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

    def sample_prior(self, n, latent_shape, generator=None, device=None) -> torch.Tensor:
        return torch.randn((n, *latent_shape), generator=generator, device=device)


class DeterministicLatent(nn.Module):
    """The encoder's output is the latent itself; no KL term (a plain autoencoder)."""

    kind = "deterministic"

    def latent_shape(self, encoder_shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(encoder_shape)

    def forward(self, h: torch.Tensor, step: int | None = None) -> PointPosterior:
        return PointPosterior(h)

    def sample_prior(self, n, latent_shape, generator=None, device=None) -> torch.Tensor:
        # An autoencoder has no prior; a standard normal is the usual stand-in.
        return torch.randn((n, *latent_shape), generator=generator, device=device)
