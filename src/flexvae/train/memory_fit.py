"""The arithmetic of ``-mem``: peak memory is linear in the batch size; fit, predict, report."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..errors import FlexVAEError

MiB = 2**20


def fit_linear(sizes, peaks) -> tuple[float, float]:
    """Least-squares line peak = fixed + per_sample * size; returns (fixed, per_sample)."""
    if len(sizes) != len(peaks) or len(set(sizes)) < 2:
        raise FlexVAEError(f"a memory fit needs at least two different batch sizes, got {list(sizes)}")
    n = len(sizes)
    mean_size, mean_peak = sum(sizes) / n, sum(peaks) / n
    spread = sum((s - mean_size) ** 2 for s in sizes)
    per_sample = sum((s - mean_size) * (p - mean_peak) for s, p in zip(sizes, peaks)) / spread
    return mean_peak - per_sample * mean_size, per_sample


def predict_batch(fixed: float, per_sample: float, budget: float, max_batch: int) -> int:
    """Largest batch with fixed + per_sample * batch <= budget, at most max_batch."""
    if per_sample <= 0:
        raise ValueError(f"per-sample memory must be positive, got {per_sample}")
    if fixed + per_sample > budget:
        raise FlexVAEError(
            f"even batch size 1 does not fit: a training step needs about {(fixed + per_sample) / MiB:,.1f} MiB, "
            f"the budget is {budget / MiB:,.1f} MiB. Use a smaller model or image size, or another device")
    return max(1, min(max_batch, math.floor((budget - fixed) / per_sample)))


# ------------------------------------------------------------------ result
@dataclass
class MemResult:
    device: str
    probe_sizes: list[int]
    probe_peaks_bytes: list[int]
    fixed_bytes: float
    per_sample_bytes: float
    budget_bytes: int
    predicted: int
    confirmed: int | None
    confirm_note: str
    probes: int  # training steps run, warm-up and confirmation included
    budget_note: str = ""
    notes: list[str] = field(default_factory=list)
    capped: bool = False  # the confirmation step ran below the prediction (CPU time or RAM safety)

    limit: int | None = None  # what the data makes sensible (see limit_to)

    @property
    def recommended(self) -> int:
        """The size to train with: the confirmed one, or the prediction when only a smaller step was
        run, and never more than ``limit``."""
        size = self.predicted if self.capped or self.confirmed is None else self.confirmed
        return size if self.limit is None else min(size, self.limit)

    def limit_to(self, limit: int, why: str) -> None:
        """Recommend at most ``limit``, noting ``why`` when that lowers the recommendation."""
        if limit < self.recommended:
            self.notes.append(f"recommendation capped at {limit:,}: {why}")
        self.limit = limit if self.limit is None else min(self.limit, limit)

    def format(self) -> str:
        peaks = ", ".join(f"{s}: {p / MiB:,.1f}" for s, p in zip(self.probe_sizes, self.probe_peaks_bytes))
        confirmed = f"{self.confirmed:,}" if self.confirmed is not None else "none"
        lines = [
            f"batch-size search on {self.device} (whole training steps: forward, loss, backward, AdamW step)",
            f"  probe peaks (batch: MiB): {peaks}",
            f"  per-sample memory:       {self.per_sample_bytes / MiB:,.2f} MiB",
            f"  fixed memory:            {self.fixed_bytes / MiB:,.1f} MiB "
            f"(runtime, weights, gradients, optimizer state)",
            f"  budget:                  {self.budget_bytes / MiB:,.1f} MiB {self.budget_note}".rstrip(),
            f"  predicted batch size:    {self.predicted:,}",
            f"  confirmed batch size:    {confirmed} ({self.confirm_note})",
            f"  recommended batch size:  {self.recommended:,}",
            f"  training steps run:      {self.probes}",
        ]
        return "\n".join(lines + [f"  note: {note}" for note in self.notes])
