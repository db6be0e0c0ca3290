"""fits.py: what cannot fit in memory is refused before anything is allocated."""

from __future__ import annotations

import math

from flexvae.build import plan_vae
from flexvae.fits import GiB, lower_bound
from flexvae.latents import LATENTS
from helpers.inprocess import run_in_process
from helpers.runs import TINY, make_images, tiny

HUGE = '["Flat", "Lin_?_2000000000", "Lin_?_768", "Reshape_3_16_16"]'


def test_the_lower_bound_counts_weights_optimizer_state_and_the_batch():
    plan = plan_vae(["C2d_3_4_3_1_1"], ["C2d_2_3_3_1_1"], (3, 8, 8), LATENTS.get("gaussian").build(
        LATENTS.get("gaussian").params()))
    params = plan.encoder.params + plan.decoder.params
    assert params == (3 * 4 * 9 + 4) + (2 * 3 * 9 + 3)
    need, what = lower_bound(plan, 10, training=True)
    largest = max(math.prod(s) for s in [(3, 8, 8), (4, 8, 8), (3, 8, 8)])
    assert need == params * 16 + 10 * (3 * 8 * 8 + largest) * 4
    assert lower_bound(plan, 10, training=False)[0] == params * 4 + 10 * (3 * 8 * 8 + largest) * 4
    assert f"{params:,} parameters" in what and "a batch of 10" in what


def test_check_warns_and_train_refuses_a_model_that_cannot_fit(tmp_path):
    proc = run_in_process(["--check", "-c", TINY, "--set", f"model.decoder={HUGE}"])
    assert proc.returncode == 0 and "total parameters: 1,794,000,000,768" in proc.stdout
    assert "warning: training cannot fit in memory: 1,794,000,003,388 parameters" in proc.stderr
    images = make_images(tmp_path / "images", 2)
    proc = run_in_process(["-t", *tiny(images, tmp_path / "run", "--set", f"model.decoder={HUGE}")])
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: this cannot fit in memory: 1,794,000,003,388 "
                                                           "parameters take 26,732.7 GiB")
    assert "the weights alone do not fit: declare a smaller model" in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_train_refuses_a_batch_that_cannot_fit(tmp_path):
    images = make_images(tmp_path / "images", 2)
    proc = run_in_process(["-t", *tiny(images, tmp_path / "run", "--set", "train.batch_size=100000000")])
    line = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 1 and line.startswith("error: this cannot fit in memory: ")
    assert "a batch of 100,000,000 at least" in line and line.endswith(
        "lower train.batch_size (-mem finds the largest that fits) or declare a smaller model")
    assert 100_000_000 * 2 * 3 * 16 * 16 * 4 / GiB > 24  # the bound itself exceeds any machine of this kind
