"""Latent spaces: what sits between the encoder's output and the decoder's input.

Each latent type is an ``nn.Module`` with
- ``latent_shape(encoder_shape)``: the latent's per-sample shape for an encoder output
  shape, raising ``ValueError`` with a readable reason when the encoder cannot feed it;
- ``forward(h, step=None)``: a posterior object with ``sample(generator)``, ``mode()``,
  ``kl()`` (per sample, shape (B,)), ``kl_elements()``, ``aux_losses()`` (dict of extra loss
  terms) and ``mean``; ``step`` is the optimizer step during training (the categorical
  latent's temperature schedule uses it), None otherwise;
- ``sample_prior(n, latent_shape, generator, device)``: raw latents drawn from the prior
  (discrete latents draw their codes uniformly);
- optionally ``from_config(latent_cfg)`` (built from the config's [latent] section).

Discrete latents (vq, fsq, categorical) also have ``codes(posterior, z=None)`` (integer
codes of a sample z, or of the mode), ``code_shape(latent_shape)`` and
``decode_codes(codes)`` (codes -> raw latent), which ``-e``/``-d`` use; vq reports non-loss
``metrics()`` (codebook usage, perplexity).
"""

from .categorical import CategoricalLatent, CategoricalPosterior
from .fsq import FiniteScalarQuantizer, FSQLatent
from .gaussian import DeterministicLatent, DiagonalGaussian, GaussianLatent, PointPosterior
from .quantized import QuantizedPosterior
from .vq import VectorQuantizer, VQLatent

LATENTS = {
    "gaussian": GaussianLatent,
    "deterministic": DeterministicLatent,
    "vq": VQLatent,
    "fsq": FSQLatent,
    "categorical": CategoricalLatent,
}

__all__ = [
    "LATENTS", "DiagonalGaussian", "PointPosterior", "GaussianLatent", "DeterministicLatent",
    "QuantizedPosterior", "VectorQuantizer", "VQLatent", "FiniteScalarQuantizer", "FSQLatent",
    "CategoricalPosterior", "CategoricalLatent",
]
