"""What the layers of one forward pass share beyond the tensor they transform: the labels
(context tokens), the encoder activations kept by name (``Keep`` tokens) and the latent
groups drawn in the decoder (``Z`` tokens, layers/latent_groups.py).

A hierarchical VAE is the usual encoder -> latent -> decoder, whose decoder also holds latent
groups: each ``Z`` token draws z_i from a prior p(z_i | decoder state) or, when the encoder
kept the activation it names, from a posterior q(z_i | decoder state, encoder activation),
and merges z_i back into the state. The top latent (the one between the stacks) is group 0;
the decoder's groups follow in order (top-down). The KL of the model is the top latent's
plus every group's KL(q(z_i | ...) || p(z_i | ...)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .latents.base import batch_sum
from .latents.gaussian import LOGVAR_MAX, LOGVAR_MIN, DiagonalGaussian

LOG_2PI = math.log(2 * math.pi)


@dataclass
class ForwardState:
    """Shared state of one pass through both stacks.

    ``posterior_groups``: how many of the decoder's groups (in order) use their posterior when
    the encoder's activation is there; None = all. ``temperature``: the prior's standard
    deviation is multiplied by it where a group is drawn from the prior (a float, or one per
    group name). ``noise``: standard normal noise by group name (the trainer draws it for the
    global batch); otherwise it comes from ``generator``. ``given``: group values to use as they
    are (decoding stored latents); ``record``: keep log q and log p of the drawn values (the
    importance-sampled likelihood).
    """

    labels: torch.Tensor | None = None
    kept: dict = field(default_factory=dict)
    posteriors: dict = field(default_factory=dict)
    values: dict = field(default_factory=dict)
    given: dict = field(default_factory=dict)
    sample: bool = True
    posterior_groups: int | None = None
    temperature: float | dict = 1.0
    noise: dict | None = None
    generator: torch.Generator | None = None
    record: bool = False
    log_q: dict = field(default_factory=dict)
    log_p: dict = field(default_factory=dict)
    index: int = 0

    def temperature_of(self, name: str) -> float:
        if isinstance(self.temperature, dict):
            return float(self.temperature.get(name, 1.0))
        return float(self.temperature)

    def draw(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """Standard normal noise of ``like``'s shape for group ``name``."""
        if self.noise is not None and name in self.noise:
            return self.noise[name].to(like.device, like.dtype)
        return torch.randn(like.shape, generator=self.generator, device=like.device, dtype=like.dtype)


def labels_of(state) -> torch.Tensor | None:
    """The labels a context token sees: a ForwardState's, or the tensor itself."""
    return state.labels if isinstance(state, ForwardState) else state


def split_gaussian(params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean, logvar = params.float().chunk(2, dim=1)
    return mean, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)


def gaussian_log_density(z, mean, logvar) -> torch.Tensor:
    """log N(z; mean, exp(logvar)) summed per sample, (B,)."""
    return batch_sum(-0.5 * ((z - mean).pow(2) * torch.exp(-logvar) + logvar + LOG_2PI))


class GroupPosterior(DiagonalGaussian):
    """q(z_i | ...) of one decoder group with its prior p(z_i | ...): the Gaussian posterior of
    the latent protocol, its KL taken to that prior (``kl``, ``kl_groups`` as for every latent)."""

    def __init__(self, name: str, q: tuple, p: tuple):
        super().__init__(*q, prior=DiagonalGaussian(*p, clamp=False), clamp=False)
        self.name = name

    @property
    def prior_mean(self) -> torch.Tensor:
        return self.prior.mean

    @property
    def prior_logvar(self) -> torch.Tensor:
        return self.prior.logvar


def group_kls(groups: dict) -> torch.Tensor | None:
    """Sum of the groups' KLs per sample, or None without groups."""
    kls = [g.kl() for g in groups.values()]
    return torch.stack(kls).sum(0) if kls else None
