"""Exponential moving average of the weights."""

from __future__ import annotations

import torch


class EMA:
    """Exponential moving average of the weights, updated after every optimizer step: every
    floating-point tensor of the state in one multi-tensor lerp (torch's own EMA update,
    ``torch.optim.swa_utils.get_ema_multi_avg_fn``); integer buffers are copied."""

    def __init__(self, model: torch.nn.Module, decay: float):
        from torch.optim.swa_utils import get_ema_multi_avg_fn

        self.decay = decay
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self._average = get_ema_multi_avg_fn(decay)

    @torch.no_grad()
    def update(self, model: torch.nn.Module, skip=()) -> None:
        """One step towards the current weights; ``skip``: names of frozen parameters, whose
        average stays as it is (a training stage that does not train them)."""
        current = model.state_dict()
        floats = [key for key, value in current.items() if value.dtype.is_floating_point and key not in skip]
        if floats:
            self._average([self.state[key] for key in floats], [current[key] for key in floats], None)
        for key, value in current.items():
            if not value.dtype.is_floating_point:
                self.state[key].copy_(value)
