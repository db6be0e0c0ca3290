"""Latent spaces: what sits between the encoder's output and the decoder's input.

Each latent type is an ``nn.Module`` with
- ``latent_shape(encoder_shape)``: the latent's per-sample shape for an encoder output
  shape, raising ``ValueError`` with a readable reason when the encoder cannot feed it;
- ``forward(h)``: a posterior object with ``sample(generator)``, ``mode()``, ``kl()``
  (per sample, shape (B,)) and ``aux_losses()`` (dict of extra loss terms);
- ``sample_prior(n, latent_shape, generator, device)``: raw latents drawn from the prior.
"""

from .gaussian import DeterministicLatent, DiagonalGaussian, GaussianLatent, PointPosterior

LATENTS = {
    "gaussian": GaussianLatent,
    "deterministic": DeterministicLatent,
}

__all__ = ["LATENTS", "DiagonalGaussian", "PointPosterior", "GaussianLatent", "DeterministicLatent"]
