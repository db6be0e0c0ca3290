"""analysis/conditional.py: class interpolation, pictures and the scores of conditional models."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from flexvae.build import plan_vae
from helpers.inprocess import run_in_process
from helpers.labelled import (
    CLASSES,
    cond_args,
    labelled_folder,
    mixed_args,
)
from helpers.runs import TINY


def test_class_interpolation_and_pictures(tmp_path):
    images = labelled_folder(tmp_path / "img")
    run = tmp_path / "run"
    assert run_in_process(["-t", *cond_args(images, run)]).returncode == 0
    result = run_in_process(["-inter", *cond_args(images, run), "--classes", "a,c", "--steps", "4"])
    assert result.returncode == 0, result.stderr
    grid = Image.open(run / "interpolation" / "classes_a_to_c.png")
    assert grid.size == (4 * 16 + 5 * 2, 8 * 16 + 9 * 2)
    bad = run_in_process(["-inter", *cond_args(images, run), "--classes", "a,z"])
    assert bad.returncode != 0 and "class 'z' is not one of the model's 3 classes" in bad.stderr
    plain = run_in_process(["-inter", "-c", TINY, "--ckpt", run, "--classes", "a"])
    assert plain.returncode != 0 and "--classes takes two class names A,B" in plain.stderr


def test_class_interpolation_ends_are_the_class_samples():
    from flexvae.analysis.conditional import class_interpolation

    torch.manual_seed(0)
    vae = plan_vae(["C2d_1_4_3_1_1"], ["CtxCat_2", "C2d_4_1_3_1_1"], (1, 8, 8), classes=3).build().eval()
    vae.class_names = CLASSES
    grid = class_interpolation(vae, 0, 2, steps=3, styles=2, seed=5)
    z = vae.latent.sample_prior(2, vae.latent_shape, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(grid[:, 0], vae.to_image(vae.decode(z, torch.tensor([0, 0]))))
    torch.testing.assert_close(grid[:, 2], vae.to_image(vae.decode(z, torch.tensor([2, 2]))))


def test_eval_scores_conditional_samples_and_the_class_latent_and_pics_plot_the_diagnostics(tmp_path):
    images = labelled_folder(tmp_path / "img", per_class=6)
    run = tmp_path / "run"
    args = mixed_args(images, run, "--set", "train.max_steps=6", "--set", "train.log_every=2")
    assert run_in_process(["-t", *args]).returncode == 0
    result = run_in_process(["-eval", *args, "--input", images, "--input2", images, "--nll-samples", "0"])
    assert result.returncode == 0, result.stderr
    report = json.loads((run / "evaluation" / "evaluation.json").read_text())
    cond, acc = report["conditional_generation"], report["class_accuracy"]
    assert set(cond["per_class"]) == set(CLASSES) and all(0 <= v <= 1 for v in cond["per_class"].values())
    assert cond["mean"] == pytest.approx(np.mean(list(cond["per_class"].values())))
    assert acc["images"] == 18 and 0 <= acc["accuracy"] <= acc["purity"] <= 1 and acc["chance"] == pytest.approx(1 / 3)
    assert "class latent accuracy (18 images" in result.stdout
    pics = run_in_process(["-pics", *args])
    assert pics.returncode == 0, pics.stderr
    assert (run / "pictures" / "history_classes.png").is_file() and "prior samples, one row per class" in pics.stdout
    assert Image.open(run / "pictures" / "prior.png").size[1] == 3 * 16 + 4 * 2


def test_class_accuracy_agrees_with_a_direct_count(tmp_path):
    from flexvae.analysis.conditional import class_accuracy
    from flexvae.checkpoint import load_run

    images = labelled_folder(tmp_path / "img", per_class=3)
    assert run_in_process(["-t", *mixed_args(images, tmp_path / "run", "--set", "train.max_steps=2")]).returncode == 0
    ctx = load_run(tmp_path / "run")
    found = class_accuracy(ctx, images)
    x = ctx.load_images(sorted(images.rglob("*.png")))
    truth = torch.tensor([CLASSES.index(p.parent.name) for p in sorted(images.rglob("*.png"))])
    predicted = ctx.vae.latent.class_probs(ctx.vae.encode(x)).argmax(1)
    assert found["accuracy"] == pytest.approx(float((predicted == truth).float().mean()))
