"""A term's weight over the run: constant, a linear warm-up, cyclical, from a start step.

Every term token takes these keywords beside its own arguments:

    weight=W    the weight (its final value under a warm-up or cycle); default 1
    start=S     the term is off (not computed) before optimizer step S
    stop=E      and off again from step E (0 = never)
    warmup=N    linear: W * min(1, (step - S) / N)
    cycle=P     cyclical (Fu et al. 2019): within each period of P steps, ramp from 0 to W over
    ratio=R     the first R of it (default 0.5), then hold

``"KL_weight=1e-4_warmup=1000"`` is the KL weight the [loss] keys kl_schedule = "linear",
kl_warmup_steps = 1000 describe, to the bit.
"""

from __future__ import annotations

from dataclasses import dataclass

SCHEDULE_KEYS = ("weight", "start", "stop", "warmup", "cycle", "ratio")


@dataclass(frozen=True)
class Schedule:
    weight: float = 1.0
    start: int = 0
    stop: int = 0
    warmup: int = 0
    cycle: int = 0
    ratio: float = 0.5

    @classmethod
    def from_spec(cls, spec, defaults: dict | None = None) -> "Schedule":
        """The schedule keywords of a term token (TokenSpec); StructureError-style errors name it."""
        values = dict(defaults or {})
        for key in SCHEDULE_KEYS:
            if key not in spec.kwargs:
                continue
            value = spec.kwargs[key]
            whole = key in ("start", "stop", "warmup", "cycle")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or (whole and not isinstance(value, int)):
                raise spec.error(f"{key} must be {'a whole number of steps' if whole else 'a number'}, found {value!r}")
            if value < 0:
                raise spec.error(f"{key} must be at least 0, found {value}")
            values[key] = float(value) if key in ("weight", "ratio") else value
        schedule = cls(**values)
        if not 0 < schedule.ratio <= 1:
            raise spec.error(f"ratio must be in (0, 1], found {schedule.ratio}")
        if schedule.stop and schedule.stop <= schedule.start:
            raise spec.error(f"stop={schedule.stop} must come after start={schedule.start}")
        if schedule.warmup and schedule.cycle:
            raise spec.error("a term takes warmup= or cycle=, not both")
        return schedule

    def active(self, step: int) -> bool:
        return step >= self.start and (not self.stop or step < self.stop)

    def weight_at(self, step: int) -> float:
        """The weight after ``step`` optimizer steps (0 outside [start, stop))."""
        if not self.active(step):
            return 0.0
        since = step - self.start
        if self.warmup > 0:
            return self.weight * min(1.0, since / self.warmup)
        if self.cycle > 0:
            phase = (since % self.cycle) / self.cycle
            return self.weight * min(1.0, phase / self.ratio)
        return self.weight

    def token_keywords(self) -> str:
        """The keywords that write this schedule in a token ('' for weight 1 from step 0)."""
        parts = [] if self.weight == 1.0 else [f"weight={self.weight!r}"]
        for key in ("start", "stop", "warmup", "cycle"):
            if getattr(self, key):
                parts.append(f"{key}={getattr(self, key)}")
        if self.cycle and self.ratio != 0.5:
            parts.append(f"ratio={self.ratio!r}")
        return "_".join(parts)
