"""Exponential moving average of the weights."""

from __future__ import annotations

import torch


class EMA:
    """Exponential moving average of the weights, updated after every optimizer step."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for key, value in model.state_dict().items():
            if value.dtype.is_floating_point:
                self.state[key].lerp_(value, 1 - self.decay)
            else:
                self.state[key].copy_(value)
