"""Reconstruction terms: the likelihood's NLL (elbo objective) and the per-element losses of
the weighted objective (mse, l1, bce)."""

from __future__ import annotations

import torch
from ..errors import ConfigError
from .likelihoods import LIKELIHOODS
from .term import Arg, Term, register_term

RECON_KINDS = ("mse", "l1", "bce")


def reconstruction_loss(recon: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-element mean of the criterion ``kind`` (likelihoods.py: mse, l1, bce; bce treats
    ``recon`` as logits of pixel values in [0, 1])."""
    criterion = LIKELIHOODS.get(kind)
    if criterion is None or criterion.proper:
        raise ValueError(f"unknown reconstruction loss {kind!r}")
    return criterion().loss(recon, target)


@register_term("NLL", doc="-log p(x|z) under the model's likelihood (loss.likelihood), nats per image; "
                          "also logs bpd, -ELBO in bits per dimension (elbo objective)")
class NLL(Term):
    log_name = "nll"
    per_image = True

    def check(self, data_shape, objective):
        if objective != "elbo":
            raise ConfigError("the NLL term needs the model's likelihood: set loss.objective = 'elbo' "
                              "(or use the Recon term: 'Recon_kind=mse')")

    def logged(self):
        return ("nll", "bpd")

    def forward(self, batch):
        likelihood = batch.model.likelihood
        nll = -likelihood.log_prob(batch.out.recon, batch.x)
        if batch.log:
            with torch.no_grad():  # bits/dim of the mass of each value's 8-bit bin: never below 0
                kl = batch.out.kl()
                batch.extra["bpd"] = likelihood.bits_per_dim(
                    -likelihood.log_mass(batch.out.recon, batch.x).float() + kl.float(), batch.x[0].numel()).mean()
        return nll.mean()


@register_term("Recon", Arg("kind", str, "mse", "mse, l1 or bce (bce: the decoder outputs logits)",
                            choices=RECON_KINDS),
               doc="per-element mean reconstruction loss (the weighted objective's)")
class Recon(Term):
    log_name = "recon"

    def __init__(self, kind: str = "mse"):
        super().__init__()
        self.kind = kind

    def forward(self, batch):
        return reconstruction_loss(batch.out.recon, batch.x, self.kind)
