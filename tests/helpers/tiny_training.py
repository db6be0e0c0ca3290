"""Training the tiny config in-process on a folder (config, train), as the objective tests do."""

from __future__ import annotations

from flexvae.config import load_config
from flexvae.train.trainer import Trainer
from helpers.runs import TINY


def config(images_dir, out, *overrides):
    return load_config(TINY, [f"train.out_dir={out}", f"data.path={images_dir}", "data.num_workers=0",
                              "train.device=cpu", "train.schedule=constant", "train.save_every=3", *overrides])


def train(images_dir, out, *overrides):
    trainer = Trainer(config(images_dir, out, *overrides), TINY, quiet=True)
    trainer.train()
    return trainer
