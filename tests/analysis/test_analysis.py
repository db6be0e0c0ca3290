"""Analysis tools: evaluation (metrics, active units, IS-NLL), interpolation, pictures, probe,
experiment matrix, and each CLI mode on a tiny trained checkpoint."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flexvae.analysis import MissingDependency, require
from flexvae.analysis.common import image_dataset, image_loader, sample_images
from flexvae.analysis.evaluate import (
    bits_per_dim,
    evaluate_model,
    format_report,
    importance_log_weights,
    importance_nll,
)
from flexvae.analysis.interpolate import (
    interpolate,
    interpolate_inputs,
    path_latents,
    slerp,
)
from flexvae.build import build_vae
from flexvae.checkpoint import load_run as load_model

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny_test.toml"


def tiny_overrides(data: Path, out_dir: Path, steps: int = 4) -> list[str]:
    return [f"data.path={data.as_posix()}",
            f"model.encoder={(REPO / 'structures' / 'tiny_encoder.json').as_posix()}",
            f"model.decoder={(REPO / 'structures' / 'tiny_decoder.json').as_posix()}",
            f"train.out_dir={out_dir.as_posix()}", f"train.max_steps={steps}", "train.device=cpu"]


def write_labelled_folder(root: Path, per_class: int = 12, size: int = 16) -> Path:
    """Two visually distinct classes: horizontal stripes and vertical stripes, noisy."""
    rng = np.random.default_rng(0)
    stripes = (np.arange(size) // 2 % 2).astype(np.float64)
    patterns = {"horizontal": np.repeat(stripes[:, None], size, 1), "vertical": np.repeat(stripes[None, :], size, 0)}
    for label, pattern in patterns.items():
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            rgb = np.stack([pattern * rng.uniform(150, 255)] * 3, -1) + rng.normal(0, 20, (size, size, 3))
            Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).save(root / label / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A 4-step tiny run on a generated 16 px labelled folder (checkpoints at steps 2 and 4)."""
    from flexvae.config import load_config
    from flexvae.train.trainer import train

    base = tmp_path_factory.mktemp("tiny")
    data = write_labelled_folder(base / "images")
    run = base / "run"
    train(load_config(TINY, tiny_overrides(data, run)), str(TINY), quiet=True)
    return {"data": data, "run": run}


@pytest.fixture(scope="module")
def tiny_model(tiny_run):
    return load_model(tiny_run["run"])


# ----------------------------------------------------------------- likelihood
def linear_gaussian_vae(sigma: float, exact_posterior: bool = True, seed: int = 0):
    """x = W z + b + sigma * eps on 2x2 one-channel data; W has orthogonal columns, so the exact
    posterior is a diagonal Gaussian and the encoder can represent it."""
    g = torch.Generator().manual_seed(seed)
    vae = build_vae(["Flat", "Lin_4_4"], ["Lin_2_4", "Reshape_1_2_2"], (1, 2, 2))
    q, _ = torch.linalg.qr(torch.randn(4, 2, generator=g))
    w = q * torch.tensor([1.5, 0.7])
    b = 0.2 * torch.randn(4, generator=g)
    m_inv = torch.linalg.inv(torch.eye(2) + w.T @ w / sigma ** 2)
    a = m_inv @ w.T / sigma ** 2
    encoder, decoder = vae.encoder[1], vae.decoder[0]
    with torch.no_grad():
        decoder.weight.copy_(w)
        decoder.bias.copy_(b)
        encoder.weight.zero_()
        encoder.weight[:2] = a if exact_posterior else 0.8 * a
        encoder.bias[:2] = -(a @ b) if exact_posterior else -(0.8 * a @ b) + 0.1
        encoder.bias[2:] = torch.log(torch.diagonal(m_inv)) + (0.0 if exact_posterior else 0.4)
    data = (w @ torch.randn(2, 32, generator=g) + b[:, None] + sigma * torch.randn(4, 32, generator=g)).T
    marginal = torch.distributions.MultivariateNormal(b.double(), (w @ w.T + sigma ** 2 * torch.eye(4)).double())
    return vae, data.reshape(-1, 1, 2, 2), -marginal.log_prob(data.double())


# ----------------------------------------------------------------------- CLI
def cli(*args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(REPO / "train.py"), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_is_nll_is_exact_with_the_exact_posterior():
    vae, x, exact = linear_gaussian_vae(sigma=0.3)
    estimate = importance_nll(vae, x, num_samples=5, sigma=0.3, generator=torch.Generator().manual_seed(1),
                              discrete=False)  # the estimator against the continuous model's exact density
    assert torch.allclose(estimate, exact, atol=1e-4)


def test_is_nll_converges_with_an_approximate_posterior():
    vae, x, exact = linear_gaussian_vae(sigma=0.3, exact_posterior=False)
    log_w = importance_log_weights(vae, x, num_samples=4000, sigma=0.3, generator=torch.Generator().manual_seed(2),
                                   discrete=False)
    nll = -(torch.logsumexp(log_w, 0) - math.log(4000))
    assert (nll - exact).abs().mean() < 0.05
    assert (-log_w.mean(0) > exact).all()  # -ELBO is an upper bound and this posterior is not exact


def test_evaluate_reports_the_linear_model_nll_and_bits_per_dim():
    vae, x, exact = linear_gaussian_vae(sigma=0.3)
    result = evaluate_model(vae, [x[:16], x[16:]], nll_samples=3, nll_sigma=0.3)
    nll = result["nll"]
    assert nll["images"] == 32 and nll["dims"] == 4
    # the mass of 8-bit bins: inside (-1, 1) about the density times the bin width 2/255; beyond,
    # the tails give more than that, so the NLL is at most the continuous one plus 4 ln(255/2)
    assert 0 < nll["nats"] <= float(exact.mean()) + 4 * math.log(127.5) + 1e-3
    assert nll["bits_per_dim"] == pytest.approx(nll["nats"] / (4 * math.log(2)))
    assert nll["neg_elbo_nats"] >= nll["nats"] - 1e-6
    assert result["reconstruction"]["ssim"] is None  # 2x2 images: no SSIM window fits
    assert result["active_units"]["of_elements"] == 2


def test_bits_per_dim_of_a_mass_need_no_change_of_variables():
    assert bits_per_dim(10 * math.log(2), 10, "logits") == pytest.approx(1.0)
    assert bits_per_dim(10 * math.log(2), 10, "value") == pytest.approx(1.0)


# ---------------------------------------------------------------- checkpoint
def test_evaluate_tiny_checkpoint(tiny_run, tiny_model):
    dataset = image_dataset(tiny_model, cfg=tiny_model.cfg)
    result = evaluate_model(tiny_model.vae, image_loader(dataset, 8), nll_samples=4)
    assert result["images"] == 24
    rec = result["reconstruction"]
    assert rec["mse"] > 0 and math.isfinite(rec["psnr"]) and -1 <= rec["ssim"] <= 1
    channels = tiny_model.vae.latent_shape[0]
    assert len(result["kl"]["per_channel"]) == channels
    assert result["kl"]["total_nats"] == pytest.approx(sum(result["kl"]["per_channel"]), rel=1e-6)
    au = result["active_units"]
    assert 0 <= au["elements"] <= au["of_elements"] == math.prod(tiny_model.vae.latent_shape)
    nll = result["nll"]
    assert math.isfinite(nll["nats"]) and nll["neg_elbo_nats"] >= nll["nats"] - 1e-6
    assert "active units" in format_report(result)


def test_evaluate_reports_the_runs_own_loss_terms(tiny_model):
    """-eval asks the run's Objective: its loss and terms over the folder, one latent sample per
    image from a generator seeded by the seed and the batch's index (so torchrun's processes
    draw what one process draws), equal to the terms written out on the same samples."""
    import torch.nn.functional as F

    from flexvae.objective import Objective

    dataset = image_dataset(tiny_model, cfg=tiny_model.cfg)
    objective = Objective.from_config(tiny_model.cfg, tiny_model.data_shape, setup=False)
    result = evaluate_model(tiny_model.vae, image_loader(dataset, 8), nll_samples=0, objective=objective, seed=3)
    terms = result["objective"]
    assert terms["terms"] == ["Recon_kind=mse_weight=1.0", "KL_weight=0.0001"] and terms["images"] == 24
    from flexvae.analysis.split import batch_generator

    recon = kl = 0.0
    with torch.no_grad():
        for index, batch in enumerate(image_loader(dataset, 8)):
            out = tiny_model.vae(batch.images, sample=True, generator=batch_generator("cpu", 3, index))
            recon += float(F.mse_loss(out.recon, batch.images)) * len(batch.images) / 24
            kl += float(out.posterior.kl_elements().mean()) * len(batch.images) / 24
    assert terms["recon"] == pytest.approx(recon, rel=1e-6) and terms["kl"] == pytest.approx(kl, rel=1e-6)
    assert terms["loss"] == pytest.approx(recon + 1e-4 * kl, rel=1e-6)
    assert "the run's loss" in format_report(result)


def test_interpolation_endpoints_are_the_reconstructions(tiny_model):
    vae = tiny_model.vae
    images = sample_images(image_dataset(tiny_model, cfg=tiny_model.cfg), 4)
    a, b = images[:2], images[2:4]
    for mode in ("linear", "slerp"):
        path = interpolate(vae, a, b, steps=5, mode=mode)
        assert path.shape == (2, 5, *a.shape[1:])
        assert torch.equal(path[:, 0], vae.reconstruct(a))
        assert torch.equal(path[:, -1], vae.reconstruct(b))
    za, zb = vae.encode(a).mode(), vae.encode(b).mode()
    steps = path_latents(za, zb, 3, "slerp")
    assert torch.equal(steps[0], za) and torch.equal(steps[-1], zb)


def test_slerp_keeps_unit_norm_and_handles_parallel_vectors():
    a, b = torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([[0.0, 1.0, 0.0]])
    mid = slerp(a, b, 0.5)
    assert mid.norm().item() == pytest.approx(1.0) and torch.allclose(mid, torch.tensor([[0.5 ** 0.5] * 2 + [0.0]]))
    assert torch.allclose(slerp(a, 2 * a, 0.5), 1.5 * a)  # parallel: linear fallback


def test_interpolate_two_folders_writes_strips(tiny_run, tiny_model, tmp_path):
    data = tiny_run["data"]
    summary = interpolate_inputs(tiny_model, data / "horizontal", data / "vertical", tmp_path, steps=4)
    assert summary["pairs"] == 12
    for mode in ("linear", "slerp"):
        width, height = Image.open(tmp_path / f"interpolate_{mode}.png").size
        assert (width, height) == (2 + 6 * 18, 2 + 12 * 18)  # A | 4 steps | B, one row per pair


def test_pictures(tiny_run, tiny_model, tmp_path):
    from flexvae.analysis.pictures import (
        kl_per_channel_history,
        plot_history,
        prior_grid,
        traversal_grid,
    )
    from flexvae.metrics import read_metrics

    vae = tiny_model.vae
    images = sample_images(image_dataset(tiny_model, cfg=tiny_model.cfg), 16)
    info = traversal_grid(vae, images[:1], images, tmp_path / "traversal.png", top_k=8, steps=5)
    channels = vae.latent_shape[0]
    assert len(info["channels"]) == min(8, channels) and info["kl"] == sorted(info["kl"], reverse=True)
    assert Image.open(tmp_path / "traversal.png").size == (2 + 6 * 18, 2 + min(8, channels) * 18)
    prior_grid(vae, tmp_path / "prior.png", n=16)
    assert Image.open(tmp_path / "prior.png").size == (2 + 4 * 18, 2 + 4 * 18)
    history = kl_per_channel_history(tiny_run["run"], images)
    assert history["steps"] == [2, 4] and len(history["kl"][0]) == channels
    written = plot_history(read_metrics(tiny_run["run"] / "metrics.csv"), tmp_path, history)
    assert {p.name for p in written} == {"history_losses.png", "history_schedule.png", "history_kl_channels.png"}


def test_prior_samples_decode_raw_latents():
    vae = build_vae(["Flat", "Lin_4_4"], ["Lin_2_4", "Reshape_1_2_2"], (1, 2, 2), scaling_factor=5.0)
    samples = vae.sample_prior(3, generator=torch.Generator().manual_seed(0))
    z = torch.randn((3, 2), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(samples, vae.to_image(vae.decode_latents(5.0 * z)))


def test_probe_beats_chance(tiny_run, tiny_model):
    from flexvae.analysis.probe import format_probe, run_probe

    result = run_probe(tiny_model, tiny_run["data"], test_fraction=0.5)
    assert result["classes"] == ["horizontal", "vertical"]
    assert result["vae_accuracy"] > result["chance"]
    assert result["pca_dims"] == min(result["latent_dims"], result["train_images"] - 1, result["pixel_dims"])
    assert "PCA of pixels" in format_probe(result)


@pytest.mark.parametrize("module, extra", [("sklearn", "probe"), ("matplotlib", "plots")])
def test_missing_extra_names_the_pip_command(monkeypatch, module, extra):
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(MissingDependency, match=rf'pip install "flexvae\[{extra}\]"'):
        require(module, "this")


# -------------------------------------------------------------------- matrix
@pytest.mark.slow
def test_matrix_runs_each_combination_once(tiny_run, tmp_path):
    from flexvae.analysis.matrix import run_matrix

    q = lambda value: json.dumps(str(value.as_posix() if isinstance(value, Path) else value))  # noqa: E731
    spec = tmp_path / "m.toml"
    spec.write_text(
        f"base = {q(TINY)}\nout_dir = {q(tmp_path / 'runs')}\n"
        '[matrix]\n"train.lr" = [1e-3, 3e-4]\n"data.resize_filter" = ["nearest"]\n'
        f'[fixed]\n"data.path" = {q(tiny_run["data"])}\n'
        f'"model.encoder" = {q(REPO / "structures" / "tiny_encoder.json")}\n'
        f'"model.decoder" = {q(REPO / "structures" / "tiny_decoder.json")}\n'
        '"train.max_steps" = 2\n"train.device" = "cpu"\n')
    first = run_matrix(spec, quiet=True, log=lambda *_: None)
    assert [r["status"] for r in first["rows"]] == ["trained", "trained"]
    assert [r["run"] for r in first["rows"]] == ["lr-0.001_resize_filter-nearest", "lr-0.0003_resize_filter-nearest"]
    ckpts = sorted((tmp_path / "runs").glob("*/checkpoints/step_00000002.safetensors"))
    stamps = [p.stat().st_mtime_ns for p in ckpts]
    assert len(ckpts) == 2

    second = run_matrix(spec, quiet=True, log=lambda *_: None)
    assert [r["status"] for r in second["rows"]] == ["skipped: already at step 2"] * 2
    assert [p.stat().st_mtime_ns for p in ckpts] == stamps
    lines = Path(second["csv"]).read_text().strip().splitlines()
    assert len(lines) == 3 and lines[0].startswith("run,train.lr,data.resize_filter,final_loss")
    assert "eval_psnr" in lines[0]
    table = [line for line in Path(second["markdown"]).read_text().splitlines() if line.startswith("| lr-")]
    assert len(table) == 2

    out = cli("-matrix", "--matrix", spec, cwd=tmp_path)  # the CLI mode: both runs finished, none retrained
    assert sum(line.startswith("[") and line.endswith(": skipped: already at step 2")
               for line in out.splitlines()) == 2
    assert [p.stat().st_mtime_ns for p in ckpts] == stamps

    # fewer steps: nothing to train, and the table says so; another setting: the runs are retrained
    spec.write_text(spec.read_text().replace('"train.max_steps" = 2', '"train.max_steps" = 1'))
    fewer = run_matrix(spec, quiet=True, log=lambda *_: None)
    assert [r["status"] for r in fewer["rows"]] == ["skipped: already at step 2 (beyond train.max_steps = 1)"] * 2
    spec.write_text(spec.read_text().replace('"train.max_steps" = 1', '"train.max_steps" = 2\n"loss.kl_weight" = 0.01'))
    changed = run_matrix(spec, quiet=True, log=lambda *_: None)
    assert [r["status"] for r in changed["rows"]] == ["retrained: settings changed (loss.kl_weight)"] * 2
    assert all((p.parent.parent / "previous").is_dir() for p in ckpts)  # the old runs were moved aside


@pytest.mark.slow
def test_cli_modes(tiny_run, tmp_path):
    run, data = tiny_run["run"], tiny_run["data"]
    out = cli("-eval", "--ckpt", run, "--nll-samples", "4", "--output", tmp_path / "ev", "--input2", data,
              cwd=tmp_path)
    assert "PSNR" in out and "Frechet distance in the judge's features" in out and "classified with p > 0.9" in out
    stored = json.loads((tmp_path / "ev" / "evaluation.json").read_text())
    assert stored["images"] == 24 and stored["nll"]["samples"] == 4
    generation = stored["generation"]
    assert generation["samples"] == 500 and 0 <= generation["confident"] <= 1
    assert generation["classes"] == len([p for p in data.iterdir() if p.is_dir()])
    assert sum(generation["predicted_classes"].values()) == pytest.approx(1.0)
    # uniform noise is scored beside the samples (this model of two steps need not beat it; bench_priors's do)
    assert set(generation["noise"]) == {"frechet", "precision", "recall", "confident", "class_entropy_bits"}
    assert generation["noise"]["frechet"] > 0
    assert 0 <= generation["precision"] <= 1 and 0 <= generation["recall"] <= 1
    assert 0 <= stored["two_sample"]["accuracy"] <= 1 and stored["two_sample"]["images"] == 24

    cli("-inter", "--ckpt", run, "--input", data / "horizontal" / "000.png", "--input2",
        data / "vertical" / "000.png", "--steps", "4", cwd=tmp_path)
    assert (run / "interpolation" / "interpolate_linear.png").is_file()
    assert (run / "interpolation" / "interpolate_slerp.png").is_file()

    cli("-pics", "--ckpt", run, cwd=tmp_path)
    names = {p.name for p in (run / "pictures").iterdir()}
    assert {"traversal.png", "prior.png", "history_losses.png", "history_kl_channels.png"} <= names

    out = cli("-probe", "--ckpt", run, "--input", data, cwd=tmp_path)
    assert "VAE latent means" in out and (run / "probe" / "probe.json").is_file()


def test_cli_reports_a_missing_second_input(tiny_run, tmp_path):
    from helpers.inprocess import run_in_process

    done = run_in_process(["-inter", "--ckpt", tiny_run["run"], "--input", tiny_run["data"]], cwd=tmp_path)
    assert done.returncode == 1 and "--input2" in done.stderr
    steps = run_in_process(["-inter", "--ckpt", tiny_run["run"], "--input", tiny_run["data"], "--input2",
                            tiny_run["data"], "--steps", "1"], cwd=tmp_path)
    assert steps.returncode == 1 and steps.stderr.strip() == (
        "error: --steps must be at least 2 for an interpolation (both ends included), got 1")
