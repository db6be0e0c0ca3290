"""Small hierarchical structures (Keep/Z tokens) and their command lines, shared by the hierarchy tests."""

from __future__ import annotations

import torch

from flexvae.build import plan_vae
from helpers.runs import TINY

ENCODER = ["C2d_1_8_3_1_1", "Keep_name=x8", "Down_?_8", "Keep_name=x4", "C2d_8_4_3_1_1"]
DECODER = ["C2d_2_8_3_1_1", "Z_3_enc=x4", "UpS_2", "C2d_8_8_3_1_1", "Z_2_enc=x8_merge=cat", "C2d_10_1_3_1_1"]


# the tiny structures for 16 px RGB with two groups, for runs through train.py
H_ENCODER = '["C2d_3_8_3_1_1", "Keep_name=x16", "Down_?_8", "Keep_name=x8", "GN_4_?", "SiLU", "C2d_?_4_3_1_1"]'
H_DECODER = '["C2d_2_8_3_1_1", "Z_2_enc=x8", "UpS_2", "C2d_?_8_3_1_1", "Z_2_enc=x16_hidden=8", "GN_4_8", "SiLU", ' \
            '"C2d_8_3_3_1_1"]'


def hvae(seed: int = 0):
    torch.manual_seed(seed)
    vae = plan_vae(ENCODER, DECODER, (1, 8, 8)).build()
    with torch.no_grad():  # leave the zero start: priors and posteriors that differ
        for p in vae.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return vae


def h_args(images, run, *extra):
    return ["-c", TINY, "--set", f"train.out_dir={run}", "--set", f"data.path={images}",
            "--set", f"model.encoder={H_ENCODER}", "--set", f"model.decoder={H_DECODER}",
            "--set", "data.num_workers=0", "--set", "train.device=cpu", *extra]
