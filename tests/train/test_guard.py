"""train/guard.py: the spike guard skips a step whose loss jumps, and adapts to a lasting rise."""

from __future__ import annotations

import math

import pytest
import torch

from flexvae.train.guard import MIN_HISTORY, SpikeGuard
from helpers.runs import TINY, make_images


def test_spike_guard_quantile_threshold_and_state():
    guard = SpikeGuard(window=50, quantile=0.5, factor=2.0)
    assert not any(guard.skip(1.0 + 0.01 * i) for i in range(MIN_HISTORY))
    assert guard.threshold() == pytest.approx(2 * (1.0 + 0.01 * (MIN_HISTORY - 1) / 2))
    assert guard.skip(100.0) and guard.skip(float("nan")) and guard.skipped == 2
    assert not guard.skip(1.05)
    restored = SpikeGuard(window=50, quantile=0.5, factor=2.0)
    restored.load_state_dict(guard.state_dict())
    assert restored.threshold() == guard.threshold() and restored.skipped == 2


def test_a_guard_adapts_to_a_lasting_rise():
    guard = SpikeGuard(window=40, quantile=0.9, factor=1.5)
    for _ in range(40):
        guard.skip(1.0)
    skipped = [guard.skip(10.0) for _ in range(60)]
    assert skipped[0] and not skipped[-1]  # a fixed threshold would skip all 60


def test_an_injected_spike_is_skipped_and_counted(tmp_path, monkeypatch):
    """One step's gradient made huge: that update leaves every weight as it was, the count says 1."""
    from flexvae.config import load_config
    from flexvae.train import step as step_module
    from flexvae.train.trainer import Trainer

    images = make_images(tmp_path / "img", 8)
    cfg = load_config(TINY, [f"data.path={images}", f"train.out_dir={tmp_path / 'run'}", "data.num_workers=0",
                             "train.skip_spikes=true", "train.max_steps=30", "train.save_every=100",
                             "train.log_every=1", "train.sample_every=100", "train.grad_clip=0"])
    trainer = Trainer(cfg, quiet=True)
    real_clip = torch.nn.utils.clip_grad_norm_
    before, after = {}, {}

    def clip(parameters, limit):
        parameters = list(parameters)
        if trainer.step == 25:  # the weights before this step's update; then its spike
            before.update({k: v.clone() for k, v in trainer.model.state_dict().items()})
            for p in parameters:
                p.grad.mul_(1e6)
        if trainer.step == 26:  # the weights after the spiked step
            after.update({k: v.clone() for k, v in trainer.model.state_dict().items()})
        return real_clip(parameters, limit)

    monkeypatch.setattr(step_module.torch.nn.utils, "clip_grad_norm_", clip)
    trainer.train()
    assert trainer.guard.skipped == 1
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    counts = [int(float(r.split(",")[header.index("skipped")])) for r in rows[1:]]
    assert counts[24] == 0 and counts[25] == 1 and counts[-1] == 1
    assert math.isfinite(float(rows[-1].split(",")[header.index("skip_threshold")]))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
