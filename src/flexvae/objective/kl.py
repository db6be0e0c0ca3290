"""The KL term: KL(q(z|x) || p(z)) of the top latent and of every latent group of a hierarchy,
with free bits.

Free bits: the KL that enters the loss is sum_c max(free_bits, mean over the batch of KL_c)
over latent channels c (per group for categorical latents); the logged KL is the true one.
"""

from __future__ import annotations

import torch

from .term import FROM_CONFIG, Arg, Term, register_term


def kl_per_image(posterior, free_bits: float = 0.0, groups=None, kl_means=None) -> torch.Tensor:
    """The KL of a batch as it enters the loss, in nats per image (batch mean): the top latent's
    plus each decoder group's (``groups``: GroupPosteriors by name); with free bits, each sums
    over its channels max(free_bits, the channel's batch-mean KL). ``kl_means``: per part, the
    channels' KL means over the whole global batch when this batch is one micro-batch of it
    (train/global_batch.py): a channel is floored when the global mean is below free bits, so
    the micro-batches' terms average to the whole batch's."""
    parts = [posterior, *(groups or {}).values()]
    if free_bits <= 0:
        return sum(part.kl().float().mean() for part in parts)
    if kl_means is None:
        return sum(part.kl_groups().float().mean(0).clamp(min=free_bits).sum() for part in parts)
    return sum(torch.where(means.to(part.kl_groups().device) >= free_bits, part.kl_groups().float().mean(0),
                           torch.full_like(means, free_bits, dtype=torch.float32)).sum()
               for part, means in zip(parts, kl_means))


def kl_term(posterior, reduction: str, free_bits: float = 0.0, groups=None, kl_means=None) -> torch.Tensor:
    """'mean': mean over every latent element (with decoder groups, their elements count too);
    'sum': sum over each sample's latent elements, averaged over the batch (the ELBO's KL)."""
    if reduction == "mean":
        if free_bits <= 0 and not groups:
            return posterior.kl_elements().float().mean()
        elements = posterior.kl_elements()[0].numel() + sum(g.kl_elements()[0].numel() for g in (groups or {}).values())
        return kl_per_image(posterior, free_bits, groups, kl_means) / elements
    if reduction == "sum":
        return kl_per_image(posterior, free_bits, groups, kl_means)
    raise ValueError(f"unknown KL reduction {reduction!r}")


@register_term("KL", Arg("reduction", str, FROM_CONFIG, "weighted objective: mean (per latent element) or sum "
                                                         "(per image); default loss.kl_reduction",
                         choices=("mean", "sum")),
               Arg("free_bits", float, FROM_CONFIG, "KL floor in nats per latent channel; default loss.free_bits"),
               doc="KL(q(z|x) || p(z)) of the latent and every latent group (elbo: nats per image)")
class KL(Term):
    log_name = "kl"

    def __init__(self, reduction=FROM_CONFIG, free_bits=FROM_CONFIG, settings=None, objective: str = "weighted"):
        super().__init__()
        if free_bits is not FROM_CONFIG and free_bits < 0:
            raise ValueError(f"free_bits must be at least 0, found {free_bits}")
        self.elbo = objective == "elbo"
        self.per_image = self.elbo
        self.reduction = reduction if reduction is not FROM_CONFIG else getattr(settings, "kl_reduction", "mean")
        self.free_bits = free_bits if free_bits is not FROM_CONFIG else getattr(settings, "free_bits", 0.0)

    def logged(self):
        return ("kl",)

    def forward(self, batch):
        out = batch.out
        if self.elbo:  # logged: the true KL; in the loss: with free bits
            value = kl_per_image(out.posterior, self.free_bits, out.groups, batch.kl_means)
            if self.free_bits > 0 or out.groups:  # else the same number
                batch.extra["kl"] = out.kl().mean()
            return value
        return kl_term(out.posterior, self.reduction, self.free_bits, out.groups, batch.kl_means)
