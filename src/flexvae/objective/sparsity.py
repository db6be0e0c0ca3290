"""The sparsity term: the mean absolute value of the posterior mean (an L1 penalty on codes)."""

from __future__ import annotations

from .term import Term, register_term


@register_term("Sparse", doc="mean |posterior mean| over the latent (L1 sparsity of the codes)")
class Sparse(Term):
    log_name = "sparse"

    def forward(self, batch):
        return batch.out.posterior.mean.float().abs().mean()
