"""analysis/latent_groups.py: -analyze's statistics of latent groups (divergence, latent steps,
receptive fields, most exciting inputs) against linear references."""

from __future__ import annotations

import pytest
import torch

from flexvae.build import plan_vae
from helpers.hierarchy import h_args, hvae
from helpers.inprocess import run_in_process
from helpers.runs import TINY, make_images


# ------------------------------------------------------------------ hVAE's analysis tools
def linear_vae():
    """A flat model whose top latent's means are a linear map of the pixels: mean_u = w_u . x + b_u."""
    torch.manual_seed(0)
    return plan_vae(["Flat", "Lin_16_4"], ["Lin_2_16", "Reshape_1_4_4"], (1, 4, 4)).build().eval()


def test_pics_of_a_hierarchy_show_the_partial_posterior(tmp_path):
    from PIL import Image

    images = make_images(tmp_path / "img", 8)
    run = tmp_path / "run"
    assert run_in_process(["-t", *h_args(images, run, "--set", "train.max_steps=2")]).returncode == 0
    result = run_in_process(["-pics", *h_args(images, run)])
    assert result.returncode == 0, result.stderr
    grid = Image.open(run / "pictures" / "partial_posterior.png")
    assert grid.size == (8 * 16 + 9 * 2, 5 * 16 + 6 * 2)  # inputs, then k = 0 .. 3 (top + 2 groups)


def test_white_noise_receptive_fields_recover_a_linear_units_weights():
    from flexvae.analysis.units import receptive_fields

    vae = linear_vae()
    weights = vae.encoder[1].weight[:2].detach()  # the mean half of Lin_16_4
    fields = receptive_fields(vae, [("top", 0, ()), ("top", 1, ())], (1, 4, 4), count=4096, seed=1)
    for unit in range(2):
        corr = torch.corrcoef(torch.stack([fields[unit].flatten(), weights[unit]]))[0, 1]
        assert corr > 0.95, corr


def test_most_exciting_inputs_follow_a_linear_units_weights_within_bounds():
    from flexvae.analysis.units import most_exciting

    vae = linear_vae()
    weights = vae.encoder[1].weight[:2].detach()
    x = most_exciting(vae, [("top", 0, ()), ("top", 1, ())], (1, 4, 4), norm=1.0, steps=80)
    assert x.abs().max() <= 1 and (x.flatten(1).norm(dim=1) <= 1.0 + 1e-5).all()
    for unit in range(2):
        assert torch.corrcoef(torch.stack([x[unit].flatten(), weights[unit]]))[0, 1] > 0.95
        assert float(x[unit].flatten() @ weights[unit]) > 0


def test_divergence_statistics_match_the_groups_kl():
    from flexvae.analysis.units import divergence_statistics

    vae = hvae().eval()
    x = torch.randn(6, 1, 8, 8)
    stats = divergence_statistics(vae, x)
    with torch.no_grad():
        out = vae(x, sample=False)
    assert list(stats) == ["top", "x4", "x8"]
    assert stats["top"]["mean"] == pytest.approx(float(out.posterior.kl().mean()), rel=1e-5)
    assert stats["x8"]["mean"] == pytest.approx(float(out.groups["x8"].kl().mean()), rel=1e-5)
    assert sum(stats["x4"]["per_channel"]) == pytest.approx(stats["x4"]["mean"], rel=1e-5)


def test_latent_steps_move_only_their_group():
    from flexvae.analysis.units import latent_steps

    vae = hvae().eval()
    x = torch.randn(6, 1, 8, 8)
    rows, described = latent_steps(vae, x[:1], x, steps=5)
    assert [d["group"] for d in described] == ["top", "x4", "x8"] and all(r.shape == (6, 1, 8, 8) for r in rows)
    torch.testing.assert_close(rows[2][3], vae.reconstruct(x[:1])[0])  # the middle step is the reference


def test_analyze_writes_every_picture_and_the_probes(tmp_path):
    import json

    from PIL import Image

    labelled = tmp_path / "labelled"
    for c in range(2):
        make_images(labelled / f"class{c}", 6)
    run = tmp_path / "run"
    assert run_in_process(["-t", *h_args(labelled, run, "--set", "train.max_steps=2")]).returncode == 0
    result = run_in_process(["-analyze", *h_args(labelled, run), "--input2", labelled, "--steps", "5"])
    assert result.returncode == 0, result.stderr
    out = run / "analysis"
    for name in ("latent_steps", "receptive_fields", "most_exciting", "divergence", "decodability"):
        assert (out / f"{name}.png").is_file(), name
    report = json.loads((out / "analysis.json").read_text())
    assert report["groups"] == ["top", "x8", "x16"] and set(report["divergence"]) == {"top", "x8", "x16"}
    assert report["decodability"]["chance"] == 0.5 and 0 <= report["decodability"]["x16"] <= 1
    assert Image.open(out / "latent_steps.png").size == (6 * 16 + 7 * 2, 3 * 16 + 4 * 2)
    flat = run_in_process(["-analyze", "-c", TINY, "--ckpt", run, "--input", labelled, "--output", tmp_path / "a2"])
    assert flat.returncode == 0 and "top: KL" in flat.stdout
