"""Skipping gradient spikes (``train.skip_spikes``), the stability guard of deep hierarchical
VAEs (VDVAE): an update whose gradient norm (before clipping) is not finite, or above
``skip_factor`` times the ``skip_quantile`` of the last ``skip_window`` norms, is not applied.

The threshold adapts: every finite norm joins the window, spikes included, so a lasting rise
of the norms (a new phase of training) raises the threshold instead of skipping every step
from then on, which a fixed threshold can do. The guard waits for ``MIN_HISTORY`` norms
before it skips anything finite. Its window and count are part of the checkpoint, so a
resumed run skips exactly what an uninterrupted one would.
"""

from __future__ import annotations

import math
from collections import deque

MIN_HISTORY = 20


class SpikeGuard:
    def __init__(self, window: int = 200, quantile: float = 0.99, factor: float = 2.0):
        self.window, self.quantile, self.factor = int(window), float(quantile), float(factor)
        self.norms: deque = deque(maxlen=self.window)
        self.skipped = 0

    @classmethod
    def from_config(cls, tcfg) -> "SpikeGuard | None":
        return cls(tcfg.skip_window, tcfg.skip_quantile, tcfg.skip_factor) if tcfg.skip_spikes else None

    def threshold(self) -> float:
        """The current limit (infinite until MIN_HISTORY norms are known)."""
        if len(self.norms) < MIN_HISTORY:
            return math.inf
        ordered = sorted(self.norms)
        position = self.quantile * (len(ordered) - 1)
        low = int(math.floor(position))
        high = min(low + 1, len(ordered) - 1)
        value = ordered[low] + (ordered[high] - ordered[low]) * (position - low)
        return self.factor * value

    def skip(self, norm: float) -> bool:
        """Whether the update with this gradient norm is skipped; records the norm."""
        if not math.isfinite(norm):
            self.skipped += 1
            return True
        spike = norm > self.threshold()
        self.norms.append(float(norm))
        self.skipped += spike
        return spike

    def state_dict(self) -> dict:
        return {"norms": list(self.norms), "skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        norms = state.get("norms", [])
        if not isinstance(norms, list) or not all(isinstance(v, (int, float)) for v in norms):
            raise ValueError("the spike guard's stored norms must be a list of numbers")
        self.norms = deque((float(v) for v in norms), maxlen=self.window)
        self.skipped = int(state.get("skipped", 0))
