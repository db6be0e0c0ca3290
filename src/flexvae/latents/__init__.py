"""Latent spaces: what sits between the encoder's output and the decoder's input.

The protocol every latent type implements is in ``base.py``; each type registers itself
with ``@register_latent`` (``registry.py``) beside its class, so importing this package
fills ``LATENTS``. A new type is one file and one decorator.
"""

# Registration order is the order listed in errors and in the README: keep it.
from .base import DiscreteLatent, Latent, PointPosterior, Posterior  # isort: skip
from .gaussian import DeterministicLatent, DiagonalGaussian, GaussianLatent  # isort: skip
from .vq import VectorQuantizer, VQLatent, VQParams  # isort: skip
from .fsq import FiniteScalarQuantizer, FSQLatent, FSQParams  # isort: skip
from .rvq import ResidualQuantizer, RVQLatent, RVQParams  # isort: skip
from .binary import BinaryQuantizer, BSQLatent, BSQParams, LFQLatent, LFQParams  # isort: skip
from .categorical import CategoricalLatent, CategoricalParams, CategoricalPosterior  # isort: skip
from .mixed import MixedLatent, MixedParams, MixedPosterior  # isort: skip
from .quantized import QuantizedPosterior
from .registry import LATENTS, LatentRegistry, LatentType, NoParams, register_latent

__all__ = [
    "LATENTS", "LatentRegistry", "LatentType", "NoParams", "register_latent",
    "Posterior", "Latent", "DiscreteLatent", "PointPosterior",
    "DiagonalGaussian", "GaussianLatent", "DeterministicLatent",
    "QuantizedPosterior", "VectorQuantizer", "VQLatent", "VQParams",
    "FiniteScalarQuantizer", "FSQLatent", "FSQParams",
    "ResidualQuantizer", "RVQLatent", "RVQParams",
    "BinaryQuantizer", "LFQLatent", "LFQParams", "BSQLatent", "BSQParams",
    "CategoricalPosterior", "CategoricalLatent", "CategoricalParams",
    "MixedPosterior", "MixedLatent", "MixedParams",
]
