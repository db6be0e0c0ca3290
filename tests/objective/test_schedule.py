"""objective/schedule.py: the KL weight schedules against their formulas."""


import pytest

from flexvae.objective import (
    kl_weight_at,
)
from helpers.losses import cfg


# ------------------------------------------------------------------ KL schedules
@pytest.mark.parametrize("step", [0, 1, 500, 10_000])
def test_constant_schedule(step):
    assert kl_weight_at(step, cfg(kl_weight=0.3)) == pytest.approx(0.3)


@pytest.mark.parametrize("step, expected", [(0, 0.0), (25, 0.25), (50, 0.5), (100, 1.0), (101, 1.0), (1000, 1.0)])
def test_linear_schedule(step, expected):
    config = cfg(kl_weight=0.02, kl_schedule="linear", kl_warmup_steps=100)
    # kl_weight * min(1, step / kl_warmup_steps)
    assert kl_weight_at(step, config) == pytest.approx(0.02 * expected)


def test_linear_schedule_without_warmup_is_constant():
    assert kl_weight_at(0, cfg(kl_weight=0.02, kl_schedule="linear", kl_warmup_steps=0)) == pytest.approx(0.02)


@pytest.mark.parametrize(
    "step, ratio, expected",
    [(0, 0.5, 0.0), (25, 0.5, 0.5), (50, 0.5, 1.0), (75, 0.5, 1.0), (99, 0.5, 1.0), (100, 0.5, 0.0),
     (110, 0.5, 0.2), (260, 0.5, 1.0), (50, 1.0, 0.5), (99, 1.0, 0.99), (10, 0.25, 0.4), (30, 0.25, 1.0)],
)
def test_cyclical_schedule(step, ratio, expected):
    # Within each period of 100 steps: ramp from 0 over the first `ratio` of it, then hold.
    config = cfg(kl_weight=2.0, kl_schedule="cyclical", kl_cycle_steps=100, kl_cycle_ratio=ratio)
    assert kl_weight_at(step, config) == pytest.approx(2.0 * expected)
