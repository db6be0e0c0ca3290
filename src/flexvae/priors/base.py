"""Learned priors over the top latent: the registry, the base class, and the Monte Carlo KL.

A prior is a module registered under a token name with typed arguments, as layer tokens and
loss terms are (``registry.Arg``); ``model.prior`` names one:

    @register_prior("MoG", Arg("components", int, 10, "mixture components"), doc="...")
    class MixturePrior(Prior):
        def log_prob(self, z, vae): ...          # (B,) log p(z) of raw latents
        def sample(self, n, vae, generator=None, device=None, temperature=1.0): ...

``"Normal"`` (the default) is N(0, I) with its closed-form KL, and builds no module: a model
declared without a prior is the same model, weight for weight, as before priors existed.

The KL with a learned prior has no closed form. Its one-sample Monte Carlo estimate at the
z the decoder saw is

    KL(q(z|x) || p(z)) ~= -H(q(z|x)) - log p(z),   z ~ q(z|x)

with the Gaussian posterior's entropy H in closed form (a lower-variance estimate than
log q(z) - log p(z), with the same expectation). Per latent element the estimate is the
element's negative entropy minus an equal share of log p(z), so the elements still sum to
the image's KL. A learned prior does not factorise over channels, so free bits floor the
latent's whole KL (one group) instead of each channel's.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..errors import ConfigError
from ..registry import Arg, ClassRegistry
from ..latents.base import Posterior

__all__ = ["Arg", "DEFAULT_PRIOR", "PRIORS", "Prior", "PriorKL", "register_prior"]

DEFAULT_PRIOR = "Normal"
LOG_2PI = math.log(2 * math.pi)


class Prior(nn.Module):
    """p(z) over the raw top latent of shape ``latent_shape`` (flattened to ``dims`` values).

    ``log_prob(z, vae)``: (B,) log densities; ``sample(n, vae, ...)``: (n, *latent_shape) raw
    latents; ``vae`` is the model the prior belongs to (the VampPrior runs its encoder)."""

    token = ""

    def __init__(self, latent_shape, data_shape):
        super().__init__()
        self.latent_shape = tuple(latent_shape)
        self.data_shape = tuple(data_shape)
        self.dims = math.prod(self.latent_shape)

    def log_prob(self, z: torch.Tensor, vae) -> torch.Tensor:
        raise NotImplementedError

    def sample(self, n: int, vae, generator=None, device=None, temperature: float = 1.0) -> torch.Tensor:
        raise NotImplementedError

    def posterior(self, q, z: torch.Tensor, vae) -> "PriorKL":
        """``q`` (the encoder's posterior) whose KL is the Monte Carlo estimate at ``z``."""
        return PriorKL(q, z, self.log_prob(z, vae))

    def describe(self) -> str:
        return f"{self.token} prior ({self.extra_repr()})"


def normal_log_prob(z: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(z; mean, exp(logvar)) per element (broadcasting)."""
    return -0.5 * (LOG_2PI + logvar + (z - mean).pow(2) * torch.exp(-logvar))


class PriorKL(Posterior):
    """A diagonal Gaussian posterior whose KL is taken to a learned prior at the sample ``z``
    (see the module's docstring); everything else is the posterior's own."""

    def __init__(self, q, z: torch.Tensor, log_p: torch.Tensor):
        if not hasattr(q, "logvar"):
            raise ConfigError("a learned prior needs a Gaussian posterior (model.latent = 'gaussian')")
        self.q, self.z, self.log_p = q, z, log_p
        self.mean, self.logvar = q.mean, q.logvar

    def sample(self, generator=None, noise=None):
        return self.q.sample(generator=generator, noise=noise)

    def mode(self):
        return self.q.mode()

    def variance(self):
        return self.q.variance()

    def aux_losses(self):
        return self.q.aux_losses()

    def observe(self, labels):
        self.q.observe(labels)

    def diagnostics(self):
        return self.q.diagnostics()

    def kl_elements(self) -> torch.Tensor:
        negative_entropy = -0.5 * (1.0 + LOG_2PI + self.logvar)
        share = (self.log_p / self.logvar[0].numel()).view(-1, *([1] * (self.logvar.dim() - 1)))
        return negative_entropy - share.to(negative_entropy.dtype)

    def kl_groups(self) -> torch.Tensor:
        """The whole latent is one group: a learned prior does not factorise over channels."""
        return self.kl().unsqueeze(1)


PRIORS = ClassRegistry(what="prior", known="Known priors", listing="python train.py --priors",
                       builtin=(DEFAULT_PRIOR,))


def register_prior(name: str, *args: Arg, doc: str):
    """Class decorator registering a Prior under ``name`` with its typed arguments."""
    return PRIORS.register_class(name, *args, doc=doc)
