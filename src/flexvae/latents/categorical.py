"""Categorical latents with Gumbel-softmax relaxation (the discrete VAE of AE-LEGO and DALL-E).

The encoder outputs ``groups * categories`` channels per position: for each group, the
logits of one categorical variable over ``categories`` values. The decoder sees the sampled
category of each group as a one-hot (hard) or softmax (soft) vector, so the latent has
``groups * categories`` channels too (group g occupies channels g*K .. g*K + K - 1) and the
decoder's first layer takes that many input channels.

Training samples y = softmax((logits + Gumbel noise) / tau); with ``hard`` the decoder gets
one_hot(argmax y) with the gradient of y (straight-through). The temperature follows

    tau(step) = max(tau_min, tau_start * exp(-tau_rate * step))

where ``step`` is the optimizer step that ``VAE.forward(x, step=...)`` passes to the latent;
without a step (inference) the schedule's floor ``tau_min`` is used. The mode is the one-hot
argmax. KL to a uniform prior: sum_k q_k log(q_k K) per variable, through ``kl()``/
``kl_elements()`` so the loss's KL weight and schedule apply. Prior samples draw every
category uniformly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..fields import AT_LEAST_TWO, NON_NEGATIVE, POSITIVE, setting
from ..utils import format_shape
from .base import DiscreteLatent, Posterior, check_code_range, sum_positions
from .registry import register_latent


def temperature(step: int | None, tau_start: float, tau_min: float, tau_rate: float) -> float:
    """Gumbel-softmax temperature after ``step`` optimizer steps; ``None`` gives ``tau_min``."""
    if step is None:
        return tau_min
    return max(tau_min, tau_start * math.exp(-tau_rate * step))


def gumbel_softmax(logits: torch.Tensor, uniform: torch.Tensor, tau: float, hard: bool, dim: int) -> torch.Tensor:
    """softmax((logits + Gumbel noise) / tau) along ``dim``, the Gumbel noise made from
    ``uniform`` values in [0, 1); ``hard``: one-hot forward, the soft gradient (straight-through)."""
    gumbel = -torch.log(-torch.log(uniform.clamp(1e-10, 1 - 1e-7)))
    soft = F.softmax((logits + gumbel) / tau, dim=dim)
    if not hard:
        return soft
    hard_sample = F.one_hot(soft.argmax(dim=dim), soft.shape[dim]).movedim(-1, dim).to(soft.dtype)
    return soft + (hard_sample - soft).detach()


class CategoricalPosterior(Posterior):
    """q(c|x) = softmax(logits) for every group and position; logits (B, G, K, *spatial)."""

    def __init__(self, logits: torch.Tensor, tau: float, hard: bool = True):
        self.logits = logits
        self.tau = tau
        self.hard = hard

    @property
    def groups(self) -> int:
        return self.logits.shape[1]

    @property
    def categories(self) -> int:
        return self.logits.shape[2]

    def _flat(self, t: torch.Tensor) -> torch.Tensor:
        """(B, G, K, *spatial) -> (B, G*K, *spatial), the decoder's channel layout."""
        return t.flatten(1, 2)

    @property
    def probs(self) -> torch.Tensor:
        return F.softmax(self.logits.float(), dim=2)

    @property
    def mean(self) -> torch.Tensor:
        """The category probabilities in the decoder's layout (used by the sparsity term)."""
        return self._flat(self.probs)

    def sample(self, generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
        """A Gumbel-softmax sample; ``noise``: uniform [0, 1) values shaped like the logits
        (B, G, K, *spatial), drawn from ``generator`` unless given."""
        logits = self.logits.float()
        if noise is None:
            uniform = torch.rand(logits.shape, generator=generator, device=logits.device)
        else:
            uniform = noise.to(logits.device, torch.float32)
        return self._flat(gumbel_softmax(logits, uniform, self.tau, self.hard, dim=2)).to(self.logits.dtype)

    def mode(self) -> torch.Tensor:
        one_hot = F.one_hot(self.logits.argmax(dim=2), self.categories).movedim(-1, 2)
        return self._flat(one_hot.to(self.logits.dtype))

    def kl_elements(self) -> torch.Tensor:
        """q_k log(q_k K) per category, in the decoder's layout; they sum to KL(q || uniform)."""
        log_q = F.log_softmax(self.logits.float(), dim=2)
        return self._flat(log_q.exp() * (log_q + math.log(self.categories)))

    def kl_groups(self) -> torch.Tensor:
        """KL per sample and group (one categorical variable per position), (B, G)."""
        log_q = F.log_softmax(self.logits.float(), dim=2)
        return sum_positions((log_q.exp() * (log_q + math.log(self.categories))).sum(2))  # (B, G, *spatial) -> (B, G)

    def variance(self) -> torch.Tensor:
        """Per-channel variance of the one-hot sample: p (1 - p)."""
        probs = self.mean
        return probs * (1 - probs)

    def diagnostics(self) -> dict:
        return {"tau": torch.tensor(float(self.tau))}

    @property
    def codes(self) -> torch.Tensor:
        """The most likely category of every group and position, (B, G, *spatial)."""
        return self.logits.argmax(dim=2)


@dataclass(frozen=True)
class CategoricalParams:
    categories: int = setting(16, "categorical: values of each categorical variable", AT_LEAST_TWO)
    groups: int = setting(
        4, "categorical: variables per latent position; the encoder outputs groups x categories logits", POSITIVE)
    tau_start: float = setting(1.0, "categorical: Gumbel-softmax temperature at step 0", POSITIVE)
    tau_min: float = setting(0.5, "categorical: lowest temperature, also used outside training", POSITIVE)
    tau_rate: float = setting(
        1e-3, "categorical: temperature decay, tau = max(tau_min, tau_start * exp(-tau_rate * step))", NON_NEGATIVE)
    hard: bool = setting(True, "categorical: one-hot samples with straight-through gradients; false = soft samples")


@register_latent("categorical", CategoricalParams, doc="Gumbel-softmax categorical variables, KL to uniform")
class CategoricalLatent(DiscreteLatent):
    """``groups`` categorical variables of ``categories`` values per position
    (groups * log2(categories) bits per position)."""

    noise_kind = "uniform"

    def __init__(self, categories: int = 16, groups: int = 4, tau_start: float = 1.0, tau_min: float = 0.5,
                 tau_rate: float = 1e-3, hard: bool = True):
        super().__init__()
        if categories < 2 or groups < 1:
            raise ValueError(f"need at least 2 categories and 1 group, got {categories} and {groups}")
        if not 0 < tau_min <= tau_start or tau_rate < 0:
            raise ValueError(f"need 0 < tau_min <= tau_start and tau_rate >= 0, got "
                             f"tau_min={tau_min}, tau_start={tau_start}, tau_rate={tau_rate}")
        self.categories, self.groups = int(categories), int(groups)
        self.tau_start, self.tau_min, self.tau_rate = float(tau_start), float(tau_min), float(tau_rate)
        self.hard = bool(hard)

    def extra_repr(self) -> str:
        return (f"categories={self.categories}, groups={self.groups}, tau_start={self.tau_start}, "
                f"tau_min={self.tau_min}, tau_rate={self.tau_rate}, hard={self.hard}")

    def temperature(self, step: int | None) -> float:
        return temperature(step, self.tau_start, self.tau_min, self.tau_rate)

    def latent_shape(self, encoder_shape: tuple[int, ...]) -> tuple[int, ...]:
        channels, needed = encoder_shape[0], self.groups * self.categories
        if channels != needed:
            raise ValueError(
                f"the encoder outputs {channels} channels (shape {format_shape(encoder_shape)}), "
                f"but a categorical latent with {self.groups} groups of {self.categories} categories "
                f"needs groups x categories = {needed} channels of logits; "
                f"make the last layer output {needed} channels"
            )
        return tuple(encoder_shape)

    def forward(self, h: torch.Tensor, step: int | None = None) -> CategoricalPosterior:
        logits = h.unflatten(1, (self.groups, self.categories))
        return CategoricalPosterior(logits, self.temperature(step), self.hard)

    def noise_shape(self, latent_shape) -> tuple[int, ...]:
        """Uniform noise for the Gumbel draws, shaped like the logits (G, K, *spatial)."""
        return (self.groups, self.categories, *latent_shape[1:])

    # ------------------------------------------------------------ integer codes
    def code_shape(self, latent_shape) -> tuple[int, ...]:
        return (self.groups, *latent_shape[1:])

    def codes(self, posterior: CategoricalPosterior, z: torch.Tensor | None = None) -> torch.Tensor:
        """Integer codes (B, G, *spatial) of ``z`` (a sample), or of the posterior's mode."""
        if z is None:
            return posterior.codes
        return z.unflatten(1, (self.groups, self.categories)).argmax(dim=2)

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Integer codes (B, G, *spatial) -> one-hot latent (B, G*K, *spatial)."""
        codes = check_code_range(codes, self.categories)
        return F.one_hot(codes, self.categories).movedim(-1, 2).flatten(1, 2).float()

    def sample_prior(self, n, latent_shape, generator=None, device=None) -> torch.Tensor:
        """Uniform prior: every category of every group and position is equally likely."""
        codes = torch.randint(0, self.categories, (n, *self.code_shape(latent_shape)),
                              generator=generator, device=device)
        return self.decode_codes(codes)
