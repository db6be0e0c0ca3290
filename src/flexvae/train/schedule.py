"""The learning-rate schedule shared by the VAE's and the discriminator's optimizers."""

from __future__ import annotations

import math


def lr_factor(step: int, cfg) -> float:
    """Multiplier of train.lr at ``step``: linear warm-up, then cosine down to min_lr_ratio."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
