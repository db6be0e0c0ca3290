"""The VAE: encoder stack -> latent -> decoder stack, with typed outputs."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .build import Stack


@dataclass
class VAEOutput:
    recon: torch.Tensor  # decoder output: values, or logits when the loss is bce
    posterior: object  # DiagonalGaussian, PointPosterior or a quantized posterior
    z: torch.Tensor  # the raw latent the decoder saw
    aux: dict = field(default_factory=dict)  # auxiliary losses by name (quantizers)


class VAE(nn.Module):
    """``encode`` gives a posterior over raw latents, ``decode`` maps raw latents to outputs.

    Scaled latents (what ``-e`` writes and what a diffusion model would see) are
    ``scaling_factor * raw``; ``encode_latents``/``decode_latents`` convert. The prior of
    the KL term is N(0, I) on raw latents, so ``sample_prior`` decodes raw N(0, I) draws.
    """

    def __init__(self, encoder: Stack, decoder: Stack, latent: nn.Module, latent_shape,
                 scaling_factor: float = 1.0, output: str = "value"):
        super().__init__()
        if scaling_factor <= 0:
            raise ValueError(f"scaling_factor must be positive, got {scaling_factor}")
        if output not in ("value", "logits"):
            raise ValueError(f"output must be 'value' or 'logits', got {output!r}")
        self.encoder = encoder
        self.latent = latent
        self.decoder = decoder
        self.latent_shape = tuple(latent_shape)
        self.scaling_factor = float(scaling_factor)
        self.output = output

    def _encode(self, x):
        h, aux = self.encoder.forward_aux(x)
        return self.latent(h), aux

    def encode(self, x: torch.Tensor):
        return self._encode(x)[0]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def forward(self, x: torch.Tensor, sample: bool = True, generator: torch.Generator | None = None) -> VAEOutput:
        posterior, aux = self._encode(x)
        z = posterior.sample(generator) if sample else posterior.mode()
        recon, decoder_aux = self.decoder.forward_aux(z)
        return VAEOutput(recon, posterior, z, {**aux, **posterior.aux_losses(), **decoder_aux})

    def to_image(self, recon: torch.Tensor) -> torch.Tensor:
        """Decoder output -> image values in [-1, 1]."""
        if self.output == "logits":
            return torch.sigmoid(recon) * 2 - 1
        return recon.clamp(-1, 1)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.to_image(self.decode(self.encode(x).mode()))

    def encode_latents(self, x: torch.Tensor, sample: bool = False, generator=None) -> torch.Tensor:
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample else posterior.mode()
        return z * self.scaling_factor

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        # Not in place: the caller's tensor stays as it was.
        return self.decode(latents / self.scaling_factor)

    @torch.no_grad()
    def sample_prior(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        device = next(self.parameters()).device
        z = self.latent.sample_prior(n, self.latent_shape, generator=generator, device=device)
        return self.to_image(self.decode(z))
