"""Measures shared by the evaluations: running moments over images, per-channel reduction,
the decoder log-likelihood, and the active-unit threshold."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

ACTIVE_THRESHOLD = 0.01
LOG_2PI = math.log(2 * math.pi)


def decoder_log_likelihood(output: str, recon: torch.Tensor, x: torch.Tensor, sigma: float,
                           discrete: bool = True) -> torch.Tensor:
    """log P(x|z) per sample (nats), a mass over 8-bit levels: each value's bin under a
    Gaussian(sigma) for 'value' output, Bernoulli for 'logits'. ``discrete=False``: the
    Gaussian's density instead (for checks against a continuous model's exact likelihood)."""
    from ..objective.likelihoods import discretized_log_mass

    recon, x = recon.double(), x.double()
    if output == "logits":
        target = (x + 1) / 2
        return -F.binary_cross_entropy_with_logits(recon, target, reduction="none").flatten(1).sum(1)
    if not discrete:
        return (-0.5 * ((x - recon) / sigma).pow(2) - math.log(sigma) - 0.5 * LOG_2PI).flatten(1).sum(1)
    return discretized_log_mass("gaussian", recon, x, math.log(sigma))


def has_likelihood(vae) -> bool:
    """Whether the model's likelihood is a normalised one (the elbo objective's), not the weighted
    objective's criterion (mse, l1, bce), which -eval replaces by a discretized Gaussian or Bernoulli."""
    return vae.likelihood is not None and vae.likelihood.proper


def model_log_likelihood(vae, recon: torch.Tensor, x: torch.Tensor, sigma: float,
                         discrete: bool = True) -> torch.Tensor:
    """log P(x|z) per sample, a mass over 8-bit levels, under the model's own likelihood (an
    elbo-objective model), else as ``decoder_log_likelihood`` with ``sigma``."""
    if has_likelihood(vae):
        likelihood = vae.likelihood.log_mass if discrete else vae.likelihood.log_prob
        return likelihood(recon, x).double()
    return decoder_log_likelihood(vae.output, recon, x, sigma, discrete)


class _Moments:
    """Running sums (float64) for means and variances over images."""

    def __init__(self):
        self.n, self.total, self.total_sq = 0, None, None

    def add(self, values: torch.Tensor) -> None:
        v = values.detach().double().cpu()
        s, sq = v.sum(0), v.pow(2).sum(0)
        self.total = s if self.total is None else self.total + s
        self.total_sq = sq if self.total_sq is None else self.total_sq + sq
        self.n += v.shape[0]

    def mean(self) -> torch.Tensor:
        return self.total / self.n

    def variance(self) -> torch.Tensor:
        """Unbiased variance over the images (0 for a single image)."""
        if self.n < 2:
            return torch.zeros_like(self.total)
        return ((self.total_sq - self.total.pow(2) / self.n) / (self.n - 1)).clamp_min(0)


def _per_channel(values: torch.Tensor, reduce: str) -> torch.Tensor:
    """(C, *spatial) -> (C,); a 1-D latent (D,) is D channels of one element each."""
    flat = values.reshape(values.shape[0], -1) if values.dim() > 1 else values.reshape(-1, 1)
    return flat.sum(1) if reduce == "sum" else flat.mean(1)
