"""Training with labels: class counts, stored classes, resuming, several processes."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from flexvae.config import load_config
from flexvae.errors import ConfigError
from helpers.inprocess import run_in_process
from helpers.labelled import (
    CLASSES,
    MIXED_DECODER,
    MIXED_ENCODER,
    cond_args,
    labelled_folder,
    mixed_args,
)


def test_class_count_from_labels_and_mismatches(tmp_path):
    from flexvae.assemble import make_latent

    cfg = load_config(None, ["model.latent=mixed"])
    with pytest.raises(ConfigError, match="latent.classes = 0 takes the number of classes from the labels, but "
                                          "data.labels = 'none'"):
        make_latent(cfg)
    assert make_latent(cfg, CLASSES).class_count == 3
    cfg = load_config(None, ["model.latent=mixed", "latent.classes=5"])
    with pytest.raises(ConfigError, match=r"latent.classes = 5, but the labels have 3 classes \(a, b, c\)"):
        make_latent(cfg, CLASSES)


# ------------------------------------------------------------------ through train.py
def test_conditional_run_stores_classes_and_samples_by_class(tmp_path):
    import flexvae

    images = labelled_folder(tmp_path / "img", unlabelled=2)
    result = run_in_process(["-t", *cond_args(images, tmp_path / "run")])
    assert result.returncode == 0, result.stderr
    assert "labels (folders): 12 of 14 images labelled, 3 classes (a, b, c); used by context tokens" in result.stdout
    vae = flexvae.load_model(tmp_path / "run")
    assert vae.class_names == CLASSES and vae.takes_labels
    samples = vae.sample_prior(3, labels=torch.tensor([0, 1, 2]), generator=torch.Generator().manual_seed(0))
    assert samples.shape == (3, 3, 16, 16)
    with pytest.raises(ValueError, match=r"labels must be class indices in \[0, 2\]"):
        vae.sample_prior(1, labels=torch.tensor([3]))
    with pytest.raises(ValueError, match="2 labels for 3 samples"):
        vae.sample_prior(3, labels=torch.tensor([0, 1]))
    grid = Image.open(sorted((tmp_path / "run" / "samples").glob("*.png"))[-1])
    assert grid.size[1] == 5 * 16 + 6 * 2  # fixed, reconstructions, one row per class (2 px gaps)


def test_a_plain_model_takes_no_labels(tmp_path):
    from flexvae.build import plan_vae

    vae = plan_vae("structures/tiny_encoder.json", "structures/tiny_decoder.json", (3, 16, 16)).build()
    with pytest.raises(ValueError, match="this model takes no labels"):
        vae.sample_prior(2, labels=torch.tensor([0, 1]))


def test_labels_need_a_folder_source_and_a_token_needs_labels(tmp_path):
    images = labelled_folder(tmp_path / "img")
    result = run_in_process(["-t", *cond_args(images, tmp_path / "run", "--set", "data.labels=none")])
    assert result.returncode != 0 and result.stderr.count("\n") == 1
    assert "CtxCat embeds the class label, but this model has no labels" in result.stderr
    result = run_in_process(["-t", *cond_args(images, tmp_path / "run", "--set", "data.source=webdataset")])
    assert result.returncode != 0 and "data.labels = 'folders' reads the labels of an image folder" in result.stderr


def test_resume_refuses_a_different_class_set(tmp_path):
    images = labelled_folder(tmp_path / "img")
    assert run_in_process(["-t", *cond_args(images, tmp_path / "run", "--set", "train.max_steps=2")]).returncode == 0
    labelled_folder(images, classes=("a", "b", "c", "d"))
    result = run_in_process(["-t", *cond_args(images, tmp_path / "run")])
    assert result.returncode != 0
    assert "holds a run trained on 3 label classes" in result.stderr and "now gives 4 (a, b, c, d)" in result.stderr


def test_resumed_mixed_run_equals_an_uninterrupted_one(tmp_path):
    from safetensors.torch import load_file

    images = labelled_folder(tmp_path / "img", unlabelled=3)
    # a constant schedule: under cosine, max_steps itself shapes the learning rate
    extra = ["--set", "data.label_fraction=0.5", "--set", "train.schedule=constant"]
    assert run_in_process(["-t", *mixed_args(images, tmp_path / "whole", *extra)]).returncode == 0
    assert run_in_process(["-t", *mixed_args(images, tmp_path / "split", *extra, "--set", "train.max_steps=2")]).returncode == 0
    assert run_in_process(["-t", *mixed_args(images, tmp_path / "split", *extra)]).returncode == 0
    whole = load_file(str(tmp_path / "whole" / "checkpoints" / "step_00000004.safetensors"))
    split = load_file(str(tmp_path / "split" / "checkpoints" / "step_00000004.safetensors"))
    weights = [k for k in whole if k.startswith("model.")]
    assert weights and all(torch.equal(whole[k], split[k]) for k in weights)
    header = (tmp_path / "whole" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"kl_style", "kl_class", "tau", "label_acc", "label_purity"} <= set(header)


@pytest.mark.slow
def test_two_processes_with_labels_match_one_process(tmp_path):
    """torchrun with 2 CPU processes on a partly labelled folder (a FiLM decoder and a
    supervised mixed latent): each process gets its images' labels, so the replicas stay
    identical and match one process with the same global batch."""
    from helpers.ddp import assert_two_processes_match_one

    images = labelled_folder(tmp_path / "img", unlabelled=4)
    decoder = MIXED_DECODER.replace('"C2d_4_8_3_1_1", ', '"C2d_4_8_3_1_1", "CtxFiLM_?", ')
    common = [f"data.path={images}", "data.num_workers=0", "data.labels=folders", "data.label_fraction=0.5",
              "model.latent=mixed", "latent.classes=0", f"model.encoder={MIXED_ENCODER}", f"model.decoder={decoder}",
              "train.max_steps=4", "train.save_every=4", "train.grad_accum=2", "train.lr=1e-4", "train.grad_clip=0",
              "train.log_every=1"]
    assert_two_processes_match_one(tmp_path, common, columns=("loss", "classify"))


def test_check_and_mem_read_the_classes_of_a_labelled_config(tmp_path):
    images = labelled_folder(tmp_path / "img")
    check = run_in_process(["--check", *cond_args(images, tmp_path / "run")])
    assert check.returncode == 0, check.stderr
    assert "CtxCat_3" in check.stdout and "(11, 16, 16)" in check.stdout  # 8 channels + a 3-d embedding
    mixed = run_in_process(["--check", *mixed_args(images, tmp_path / "run")])
    assert mixed.returncode == 0 and "latent: mixed, shape (4, 8, 8)" in mixed.stdout  # 1 style + 3 classes


@pytest.mark.slow
def test_the_m2_preset_samples_the_class_it_is_asked_for(tmp_path):
    """configs/digits_m2.toml as shipped: its samples of class c look like c to a pixel classifier
    of the real digits (with a 10-dimensional style they did not: 0.17)."""
    import subprocess
    import sys
    from pathlib import Path

    from flexvae.analysis.conditional import conditional_score
    from flexvae.analysis.generation import fit_classifier
    from flexvae.analysis.probe import encode_labelled
    from flexvae.checkpoint import load_run
    from flexvae.train.trainer import Trainer

    repo = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, str(repo / "scripts" / "make_digits.py"), str(tmp_path / "digits"),
                    "--holdout", "0.25"], check=True, capture_output=True)
    config = repo / "configs" / "digits_m2.toml"
    cfg = load_config(config, [f"data.path={tmp_path / 'digits' / 'train'}", f"train.out_dir={tmp_path / 'm2'}",
                               "train.device=cpu", "train.sample_every=1500", "train.save_every=1500"])
    Trainer(cfg, config, quiet=True).train()
    run = load_run(tmp_path / "m2")
    _, pixels, labels = encode_labelled(run, tmp_path / "digits" / "train")
    classifier, accuracy = fit_classifier(pixels, labels, 0, run.data_shape)
    score = conditional_score(run, tmp_path / "digits" / "train", n=100, seed=0, classifier=classifier)
    assert accuracy > 0.9
    assert score["mean"] > 0.8, score
