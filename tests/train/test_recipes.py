"""The published recipes as configs (configs/sd_ft_mse, sd_vae, eq_vae, dcae_phases, ae_lego_twin):
each trains a few steps on the CPU as shipped, small images and an untrained LPIPS backbone
standing in for what this offline machine lacks; frozen parts stay bitwise."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flexvae.config import load_config
from flexvae.train.trainer import Trainer
from helpers.runs import REPO

PHOTOS = REPO / "assets" / "photos"
pytestmark = pytest.mark.slow


def _train(config, tmp_path, *overrides):
    cfg = load_config(config, [f"train.out_dir={tmp_path / 'run'}", "train.device=cpu", "data.num_workers=0",
                               "loss.perceptual_weights=random", "train.log_every=1", *overrides])
    trainer = Trainer(cfg, config, quiet=True)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train()
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    return trainer, before, [dict(zip(header, row.split(","))) for row in rows[1:]]


def _changed(before, model, prefix):
    keys = [k for k in before if k.startswith(prefix) and before[k].dtype.is_floating_point]
    return [k for k in keys if not torch.equal(before[k], model.state_dict()[k])], keys


REPO = Path(__file__).resolve().parents[2]


def test_sd_ft_mse_trains_the_decoder_alone(tmp_path):
    trainer, before, rows = _train(REPO / "configs" / "sd_ft_mse.toml", tmp_path, f"data.path={PHOTOS}",
                                   "data.image_size=32", "train.grad_accum=1", "train.max_steps=2")
    changed, encoder = _changed(before, trainer.model, "encoder.")
    assert encoder and not changed  # the encoder, and so the latent space, is bitwise the imported one
    assert _changed(before, trainer.model, "decoder.")[0]
    assert {"recon", "perceptual"} <= set(rows[-1]) and "kl" not in rows[-1]
    ema = load_file(str(sorted((tmp_path / "run" / "checkpoints").glob("*.safetensors"))[-1]))
    assert all(torch.equal(ema[f"ema.{k}"], before[k]) for k in encoder)


def test_sd_vae_recipe_on_terms_trains(tmp_path):
    trainer, _, rows = _train(REPO / "configs" / "sd_vae.toml", tmp_path, f"data.path={PHOTOS}",
                              "data.image_size=32", "train.grad_accum=1", "train.max_steps=2", "adversarial.start=1")
    assert trainer.objective.names == ["NLL", "KL", "LPIPS", "Adv"]
    assert float(rows[-1]["d_loss"]) > 0 and float(rows[-1]["perceptual"]) > 0


def test_eq_vae_recipe_trains(tmp_path):
    _, _, rows = _train(REPO / "configs" / "eq_vae.toml", tmp_path, f"data.path={PHOTOS}", "train.max_steps=3")
    assert all(float(row["equiv"]) > 0 for row in rows)


def test_dcae_phases_run_their_three_stages(tmp_path):
    text = (REPO / "configs" / "dcae_phases.toml").read_text()
    text = re.sub(r"^start = 300$", "start = 2", text, flags=re.M)
    text = re.sub(r"^start = 500$", "start = 4", text, flags=re.M)
    text = text.replace('"structures/', f'"{REPO}/structures/')
    config = tmp_path / "dcae.toml"
    config.write_text(text)
    _, _, rows = _train(config, tmp_path, f"data.path={PHOTOS}", "train.max_steps=6", "train.save_every=1",
                        "train.batch_size=4")
    assert [row["stage"] for row in rows] == ["1", "1", "2", "2", "3", "3"]
    assert [row["d_loss"] == "nan" for row in rows] == [True] * 4 + [False] * 2
    checkpoints = tmp_path / "run" / "checkpoints"
    weights = {step: load_file(str(checkpoints / f"step_{step:08d}.safetensors")) for step in (4, 6)}
    moved = {k for k in weights[4] if k.startswith("model.") and not torch.equal(weights[4][k], weights[6][k])}
    # phase 3 trains the decoder's head (positions 10-12: modules 9-11) and nothing else of the model
    assert moved and all(re.match(r"model\.decoder\.(9|10|11)\.", k) for k in moved)


def test_ae_lego_twin_recipe_trains_on_labelled_digits(tmp_path):
    subprocess.run([sys.executable, str(REPO / "scripts" / "make_digits.py"), str(tmp_path / "digits"),
                    "--holdout", "0.25"], check=True, capture_output=True)
    _, _, rows = _train(REPO / "configs" / "ae_lego_twin.toml", tmp_path,
                        f"data.path={tmp_path / 'digits' / 'train'}", "train.max_steps=20")
    first, last = rows[0], rows[-1]
    assert float(last["contrast"]) < float(first["contrast"]) and float(last["align"]) < float(first["align"])


@pytest.mark.usefixtures("in_repo")
@pytest.mark.slow
def test_the_photos_gan_recipe_trains(photos, tmp_path):
    """configs/photos_gan.toml as shipped (LPIPS VGG16, PatchGAN) for a few steps, with an untrained
    LPIPS backbone standing in for the ImageNet weights this offline machine lacks."""
    path = REPO / "configs" / "photos_gan.toml"
    cfg = load_config(path, [f"train.out_dir={tmp_path / 'run'}", "train.max_steps=3", "adversarial.start=1",
                             "loss.perceptual_weights=random", "data.num_workers=0", "train.device=cpu",
                             "train.batch_size=4"])
    trainer = Trainer(cfg, path, quiet=True)
    trainer.train()
    header, *rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    values = dict(zip(header.split(","), rows[-1].split(",")))
    assert trainer.objective.term("LPIPS").distance is not None and float(values["perceptual"]) > 0
    assert float(values["d_loss"]) > 0 and float(values["adaptive_weight"]) > 0
