"""The shipped configs and structures (presets/): each plans, trains a step and reloads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flexvae.config import load_config
from flexvae.objective.adversarial import plan_discriminator

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ presets
SHIPPED = sorted(p for p in (REPO / "configs").glob("*.toml") if p.name != "matrix_example.toml")


@pytest.mark.parametrize("preset", ["dcae_f32", "vit_ae", "lfq_tokenizer"])
def test_new_presets_train_a_step_and_reload_from_their_checkpoint(preset, tmp_path):
    """Each preset (residual spans, S2C/C2S, Patch/Pos2d/ViT/Unpatch, LFQ) trains one step on two
    64 px images, and the checkpoint rebuilds a model that reconstructs exactly as the saved one."""
    import csv

    import numpy as np
    from PIL import Image

    from flexvae.checkpoint import load_run
    from helpers.inprocess import run_in_process
    from helpers.runs import REPO

    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for index in range(2):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(images / f"{index}.png")
    run = tmp_path / "run"
    result = run_in_process(["-t", "-c", str(REPO / "configs" / f"{preset}.toml"), "--set", f"data.path={images}",
                             "--set", f"train.out_dir={run}", "--set", "train.max_steps=1", "--set",
                             "train.batch_size=2", "--set", "data.num_workers=0", "--set", "train.device=cpu",
                             "--set", "train.fit_prior=0", "--set", "train.log_every=1"])
    assert result.returncode == 0, result.stderr
    first, second = load_run(run), load_run(run)
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        a, b = first.vae.reconstruct(x), second.vae.reconstruct(x)
    assert torch.isfinite(a).all() and torch.equal(a, b)
    columns = next(csv.reader(open(run / "metrics.csv")))
    if preset == "lfq_tokenizer":
        assert {"lfq_commit", "lfq_entropy", "lfq_usage", "lfq_perplexity"} <= set(columns), columns


@pytest.mark.usefixtures("in_repo")
@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_every_shipped_config_plans_with_its_discriminator(path):
    from flexvae.assemble import plan_from_config

    cfg = load_config(path)
    # labelled presets read their classes from the digits' folders, which tests do not make
    classes = tuple(str(d) for d in range(10)) if cfg.data.labels != "none" else None
    plan = plan_from_config(cfg, path, classes)
    assert plan.data_shape == (cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
    if cfg.adversarial.discriminator:
        assert plan_discriminator(cfg.adversarial.discriminator, plan.data_shape, path).params > 0


@pytest.mark.usefixtures("in_repo")
def test_the_latent_configs_differ_only_in_the_latent():
    kinds = {}
    for path in REPO.glob("configs/latent_*.toml"):
        cfg = load_config(path)
        kinds[cfg.model.latent] = cfg
    assert set(kinds) == {"deterministic", "gaussian", "vq", "fsq", "categorical"}
    for cfg in kinds.values():
        assert cfg.loss.objective == "elbo" and cfg.data == kinds["gaussian"].data
