"""The latent protocol: what every latent type implements, with the same signatures.

A latent sits between the encoder's output ``h`` and the decoder's input ``z``:

- ``Latent.latent_shape(encoder_shape)``: the per-sample latent shape, or ``ValueError``
  with a readable reason when the encoder's output cannot feed this latent;
- ``Latent.forward(h, step=None) -> Posterior``; ``step`` is the optimizer step during
  training (schedules such as the categorical temperature use it), None otherwise;
- ``Latent.noise_shape(latent_shape)``: the per-sample shape of the noise that
  ``Posterior.sample(noise=...)`` takes, or None when sampling needs none; ``noise_kind``
  says how that noise is distributed ("normal" or "uniform" in [0, 1)). The trainer draws
  it for the global batch, so results do not depend on how a batch is split across processes;
- ``Latent.sample_prior(n, latent_shape, generator, device)``: raw latents from the prior;
- ``Latent.metrics()``: non-loss diagnostics (codebook usage ...), floats by name;
- ``Latent.class_count``: the classes of a latent with a class part (``mixed``), else None;
  ``Latent.with_labels(z, labels)`` sets that part of raw latents to the given classes
  (others return z unchanged).

A ``Posterior`` has ``sample(generator=None, noise=None)``, ``mode()``, ``kl()`` (shape
(B,), summed over every non-batch dim), ``kl_elements()`` (same shape as the latent, sums
to ``kl``), ``variance()`` (per element, zero for point codes), ``aux_losses()`` and ``mean``;
``observe(labels)`` tells it the batch's labels (-1 = none) before sampling, which a class
latent uses for its supervised term; ``diagnostics()`` gives logged non-loss values.

Discrete latents (``DiscreteLatent``) also map between latents and integer codes:
``code_shape(latent_shape)``, ``codes(posterior, z=None)`` and ``decode_codes(codes)``.

A new latent type is one class registered with ``@register_latent`` (``latents/registry.py``)
next to its definition, with a frozen dataclass of its parameters (the ``[latent]`` keys).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import ClassVar

import torch
import torch.nn as nn


def batch_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over every non-batch dim, so 1D, 2D and 3D latents all give shape (B,)."""
    return t.flatten(1).sum(dim=1)


def sum_positions(t: torch.Tensor) -> torch.Tensor:
    """(B, C, *positions) -> (B, C), summed over positions; a latent vector (B, C) as it is."""
    return t.flatten(2).sum(2) if t.dim() > 2 else t


def draw_noise(kind: str, shape, generator=None, device=None, dtype=torch.float32) -> torch.Tensor:
    """Noise of ``kind`` ("normal" or "uniform") with the given full shape."""
    if kind == "normal":
        return torch.randn(shape, generator=generator, device=device, dtype=dtype)
    if kind == "uniform":
        return torch.rand(shape, generator=generator, device=device, dtype=dtype)
    raise ValueError(f"unknown noise kind {kind!r}")


class Posterior:
    """q(z|x) for one batch. Subclasses set ``mean`` and implement ``sample`` and ``mode``."""

    mean: torch.Tensor

    def sample(self, generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
        """A draw from q (``noise`` given: the draw it makes; ``generator``: its seed)."""
        raise NotImplementedError

    def mode(self) -> torch.Tensor:
        """The most likely value of q: the mean of a Gaussian, the chosen code of a quantizer."""
        raise NotImplementedError

    def kl_elements(self) -> torch.Tensor:
        """KL to the prior per latent element; zero for codes without a KL term."""
        return torch.zeros_like(self.mean)

    def kl(self) -> torch.Tensor:
        """KL(q || prior) per sample, summed over every latent element: (B,)."""
        return batch_sum(self.kl_elements())

    def kl_groups(self) -> torch.Tensor:
        """KL per sample and latent channel, summed over positions: (B, channels). The unit
        that free bits floor; a categorical latent's groups are its variables."""
        return sum_positions(self.kl_elements())

    def variance(self) -> torch.Tensor:
        """Variance of q per latent element (zero for a point code)."""
        return torch.zeros_like(self.mean)

    def aux_losses(self) -> dict:
        """Losses the latent adds to the objective by name (commitment, codebook, entropy terms)."""
        return {}

    def observe(self, labels: torch.Tensor) -> None:
        """The batch's class labels (-1 = unknown); only latents with a class part use them."""

    def diagnostics(self) -> dict:
        """Logged values that are not loss terms (per-part KL, temperature ...), as tensors."""
        return {}


class PointPosterior(Posterior):
    """A deterministic code: sampling returns the code itself and the KL term is zero."""

    def __init__(self, value: torch.Tensor):
        self.mean = value

    def sample(self, generator=None, noise=None) -> torch.Tensor:
        return self.mean

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        return self.mean.new_zeros(self.mean.shape[0])


class Latent(nn.Module):
    """Base of every latent type; ``kind`` and ``Params`` are set by ``@register_latent``."""

    # Each position's channels become that position's latent (tiling: receptive.py).
    receptive_margin = 0

    kind: ClassVar[str] = "latent"
    Params: ClassVar[type]
    noise_kind: ClassVar[str | None] = None
    class_count: int | None = None

    @classmethod
    def from_params(cls, params) -> "Latent":
        """Built from its parameter dataclass (the config's [latent] section)."""
        return cls(**asdict(params))

    def latent_shape(self, encoder_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The latent's shape (without batch) for the encoder output's shape."""
        raise NotImplementedError

    def forward(self, h: torch.Tensor, step: int | None = None) -> Posterior:
        """The posterior q(z | x) of the encoder output ``h``; ``step``: the training step, for schedules."""
        raise NotImplementedError

    def noise_shape(self, latent_shape) -> tuple[int, ...] | None:
        """Shape of the noise a draw of q needs, or None for a latent that draws none."""
        return None

    def sample_prior(self, n: int, latent_shape, generator=None, device=None) -> torch.Tensor:
        """``n`` raw latents drawn from the latent's own prior."""
        raise NotImplementedError

    def metrics(self) -> dict:
        """Logged statistics that are not losses (codebook usage, perplexity), as floats."""
        return {}

    def class_probs(self, posterior: Posterior) -> torch.Tensor:
        """q(class | x), (B, class_count), of a latent with a class part."""
        raise ValueError(f"a {self.kind} latent has no class part")

    def with_labels(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Raw latents with their class part set to ``labels``; unchanged for latents without one."""
        return z


class DiscreteLatent(Latent):
    """A latent whose values are integer codes; ``-e`` stores them and ``-d`` decodes them."""

    # Encoding a decoded code gives the code back (vq, fsq, lfq, bsq, categorical). Not so for
    # residual VQ: the nearest level-0 code to a sum of level codes need not be the one that made it.
    requantizes_exactly = True

    def code_shape(self, latent_shape) -> tuple[int, ...]:
        """Shape of the integer codes (without batch) for a latent of ``latent_shape``."""
        raise NotImplementedError

    def codes(self, posterior: Posterior, z: torch.Tensor | None = None) -> torch.Tensor:
        """Integer codes of a sample ``z`` of ``posterior``, or of its mode when z is None."""
        raise NotImplementedError

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Integer codes -> the raw latent the decoder takes; ValueError for codes out of range."""
        raise NotImplementedError


def check_code_range(codes: torch.Tensor, count: int) -> torch.Tensor:
    """``codes`` as int64, or ValueError when one lies outside [0, count)."""
    codes = codes.long()
    if codes.numel():
        low, high = int(codes.min()), int(codes.max())
        if low < 0 or high >= count:
            raise ValueError(f"codes must lie in [0, {count - 1}], found [{low}, {high}]")
    return codes
