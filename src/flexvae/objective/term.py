"""Loss terms: the registry, the base class and what a term is given.

A term is a module registered under a token name with its own typed arguments, exactly as
layer tokens are (``registry.Arg``):

    @register_term("SSIM", Arg("kind", str, "auto", choices=("auto", "ssim", "ms-ssim")),
                   doc="1 - SSIM between the reconstruction and the image")
    class SSIMTerm(Term):
        log_name = "ssim"
        def forward(self, batch):  # -> a scalar tensor, unweighted
            ...

In ``loss.terms`` it is written ``"SSIM_kind=ms-ssim_weight=0.5_start=1000"``: the term's own
arguments, then the keywords every term takes for its weight and schedule (schedule.py). Adding
a term is one file and one decorator; a user's term comes from a module in ``model.plugins``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn

from ..registry import Arg, ClassRegistry

__all__ = ["Arg", "FROM_CONFIG", "TERMS", "Term", "TermInputs", "register_term"]


class _FromConfig:
    """The default of a term argument whose value comes from the [loss] section's key."""

    def __str__(self) -> str:
        return "[loss]"

    __repr__ = __str__


FROM_CONFIG = _FromConfig()


@dataclass
class TermInputs:
    """What every term sees of one micro-batch.

    ``x``: the images (B, C, *S) in [-1, 1]; ``out``: the model's VAEOutput; ``image``: the
    reconstruction as differentiable image values (not clamped); ``model``: the (unwrapped) VAE;
    ``step``: optimizer steps done; ``labels``: class indices (-1 = none) or None;
    ``kl_means``: free bits' per-channel KL means over the whole global batch (or None);
    ``seed``: train.seed, for terms that draw (augmentations), with ``micro`` the micro-batch
    index; ``rest``: the loss of the terms before this one (the adversarial term's adaptive
    weight compares gradients against it).
    """

    x: torch.Tensor
    out: object
    image: torch.Tensor
    model: nn.Module
    step: int = 0
    labels: torch.Tensor | None = None
    kl_means: list | None = None
    seed: int = 0
    micro: int = 0
    log: bool = True  # this step's values are logged: terms compute what they only log (bits/dim) then
    rank: int = 0  # this process, of world_size: per-image draws are made for the global batch and sliced
    world_size: int = 1
    rest: torch.Tensor | None = None
    autocast: Callable = contextlib.nullcontext  # the runtime's autocast, for a term that runs a network
    extra: dict = field(default_factory=dict)  # values a term logs beside its own (name -> tensor)


class Term(nn.Module):
    """One loss term. ``forward(batch: TermInputs)`` returns the unweighted scalar.

    ``log_name``: its column in metrics.csv. ``per_image``: the value is in nats per image
    (the NLL, the ELBO's KL); under the elbo objective these are summed and divided by the
    values per image, the rest are added as they are. ``needs_rest``: it reads
    ``batch.rest`` (and so comes after every other term). ``settings``: the [loss] and
    [adversarial] settings, for defaults the config gives.
    """

    token = ""  # its registered name
    log_name = ""
    per_image = False
    needs_rest = False

    def check(self, data_shape: tuple[int, ...], objective: str) -> None:
        """Raise ConfigError for data or an objective this term cannot work with."""

    def check_latent(self, latent_shape: tuple[int, ...]) -> None:
        """Raise ConfigError for a latent (per-sample shape) this term cannot work with."""

    def setup(self, device, **context) -> None:
        """Load what the term needs to run (a network's weights), after every check passed.
        ``context``: cfg, config_path, data_shape, dist."""

    def contribution(self, weight: float, value: torch.Tensor, batch: TermInputs) -> torch.Tensor:
        """What the term adds to the loss at this weight."""
        return weight * value

    def logged(self) -> tuple[str, ...]:
        """Every column this term writes (its own and what it puts into ``batch.extra``)."""
        return (self.log_name,)


TERMS = ClassRegistry(what="loss term", known="Known terms", listing="python train.py --terms")


def register_term(name: str, *args: Arg, doc: str):
    """Class decorator registering a Term under ``name`` with its typed arguments."""
    return TERMS.register_class(name, *args, doc=doc)
