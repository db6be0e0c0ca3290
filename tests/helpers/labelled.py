"""Labelled image folders and the conditional structures and command lines the label tests share."""

from __future__ import annotations

import numpy as np
from PIL import Image

from helpers.runs import TINY

CLASSES = ("a", "b", "c")


# the tiny structures with the label embedded in the encoder and FiLM in the decoder
COND_ENCODER = '["C2d_3_8_3_1_1", "CtxCat_3", "VAERB_11_8", "Down_?_8", "GN_4_?", "SiLU", "C2d_?_4_3_1_1"]'
COND_DECODER = '["C2d_2_8_3_1_1", "CtxFiLM_?", "VAERB_8_8", "UpS_2", "C2d_?_8_3_1_1", "GN_4_8", "SiLU", "C2d_8_3_3_1_1"]'


# a mixed latent: 5 encoder channels = 2 x 1 style channel + 3 class logits; the decoder takes 1 + 3
MIXED_ENCODER = '["C2d_3_8_3_1_1", "VAERB_8_8", "Down_?_8", "GN_4_?", "SiLU", "C2d_?_5_3_1_1"]'
MIXED_COND_ENCODER = '["C2d_3_8_3_1_1", "CtxCat_3", "VAERB_11_8", "Down_?_8", "GN_4_?", "SiLU", "C2d_?_5_3_1_1"]'
MIXED_DECODER = '["C2d_4_8_3_1_1", "VAERB_8_8", "UpS_2", "C2d_?_8_3_1_1", "GN_4_8", "SiLU", "C2d_8_3_3_1_1"]'


def labelled_folder(root, per_class: int = 4, classes=CLASSES, unlabelled: int = 0):
    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            values = rng.integers(0, 80, (20, 20, 3)) + 80 * c
            Image.fromarray(values.astype(np.uint8)).save(root / name / f"{i}.png")
    for i in range(unlabelled):
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(root / f"free{i}.png")
    return root


def cond_args(images, run, *extra):
    return ["-c", TINY, "--set", f"train.out_dir={run}", "--set", f"data.path={images}", "--set", "data.labels=folders",
            "--set", f"model.encoder={COND_ENCODER}", "--set", f"model.decoder={COND_DECODER}",
            "--set", "data.num_workers=0", "--set", "train.device=cpu", *extra]


def mixed_args(images, run, *extra):
    return ["-c", TINY, "--set", f"train.out_dir={run}", "--set", f"data.path={images}", "--set", "data.labels=folders",
            "--set", "model.latent=mixed", "--set", "latent.classes=0", "--set", f"model.decoder={MIXED_DECODER}",
            "--set", f"model.encoder={MIXED_ENCODER}",
            "--set", "data.num_workers=0", "--set", "train.device=cpu", *extra]
