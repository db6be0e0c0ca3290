"""A learned balance of the weighted objective's terms (Kendall et al. 2018): one log-weight s
per term, trained with the model, each term entering as w * exp(-s) * term + s."""

from __future__ import annotations

import torch
import torch.nn as nn

BALANCED_TERMS = ("recon", "kl", "ssim", "sparse", "perceptual")
LOG_WEIGHT_LIMIT = 12.0  # |s| of a learned balance: exp(12) ~ 1.6e5


class LossBalance(nn.Module):
    """Learned log-weights s, one per term of the weighted objective (starting at 0)."""

    def __init__(self, names=BALANCED_TERMS):
        super().__init__()
        self.log_weights = nn.ParameterDict({name: nn.Parameter(torch.zeros(())) for name in names})

    def weigh(self, name: str, weight: float, value: torch.Tensor) -> torch.Tensor:
        s = self.log_weights[name].clamp(-LOG_WEIGHT_LIMIT, LOG_WEIGHT_LIMIT)
        return weight * torch.exp(-s) * value + s

    def metrics(self) -> dict:
        return {f"balance_{name}": float(torch.exp(-p.detach())) for name, p in self.log_weights.items()}
