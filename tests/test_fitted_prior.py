"""fitted_prior.py and the fit-prior and sample modes: a Gaussian mixture fitted to the encoded
training images, stored beside the checkpoint, used by every sampling path."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from flexvae.errors import CheckpointError
from flexvae.fitted_prior import FittedPrior, choose_covariance, fit_mixture, prior_path
from helpers.inprocess import run_in_process
from helpers.labelled import (
    CLASSES,
    cond_args,
    labelled_folder,
)
from helpers.runs import make_images, tiny


# ------------------------------------------------------------------ the file: untrusted input
def _write(path, tensors, meta):
    save_file(tensors, str(path), metadata={"flexvae_prior": json.dumps(meta)})


# ------------------------------------------------------------------ the modes
@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("prior")
    images = make_images(root / "images", 8)
    run = root / "run"
    assert run_in_process(["-t", *tiny(images, run, "--set", "train.max_steps=2")]).returncode == 0
    return {"images": images, "run": run}


def test_a_one_component_full_mixture_is_the_data_mean_and_covariance_and_samples_follow_it():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(3, 3))
    data = rng.normal(size=(4000, 3)) @ a.T + np.array([1.0, -2.0, 0.5])
    mixture = fit_mixture(torch.from_numpy(data), 1, "full", seed=0)
    np.testing.assert_allclose(mixture["weights"].numpy(), [1.0])
    np.testing.assert_allclose(mixture["means"][0].numpy(), data.mean(0), atol=1e-9)
    cov = mixture["factor"][0].numpy() @ mixture["factor"][0].numpy().T
    np.testing.assert_allclose(cov, np.cov(data, rowvar=False, bias=True) + 1e-6 * np.eye(3), atol=1e-8)
    prior = FittedPrior({None: mixture}, (3,), {})
    draws = prior.sample(40000, generator=torch.Generator().manual_seed(1)).double().numpy()
    np.testing.assert_allclose(draws.mean(0), data.mean(0), atol=0.05)
    np.testing.assert_allclose(np.cov(draws, rowvar=False), np.cov(data, rowvar=False), atol=0.1)


def test_a_two_cluster_mixture_samples_both_clusters_in_proportion():
    rng = np.random.default_rng(1)
    data = np.concatenate([rng.normal(-5, 0.1, (300, 2)), rng.normal(5, 0.1, (100, 2))])
    prior = FittedPrior({None: fit_mixture(torch.from_numpy(data), 2, "diag", seed=0)}, (2,), {})
    draws = prior.sample(8000, generator=torch.Generator().manual_seed(0)).numpy()
    assert abs((draws[:, 0] > 0).mean() - 0.25) < 0.02  # the weights: 100 of 400 images
    assert np.abs(np.abs(draws) - 5).max() < 1.0  # nothing in the hole between the clusters
    half = prior.sample(8000, generator=torch.Generator().manual_seed(0), temperature=0.5).numpy()
    assert half[half[:, 0] > 0].std() == pytest.approx(0.05, rel=0.1)


@pytest.mark.parametrize("images, covariance", [(56, "diag"), (100_000, "full")])
def test_auto_covariance_is_full_only_with_enough_images(images, covariance):
    assert choose_covariance("auto", images, 256, 10) == covariance
    assert choose_covariance("diag", 10**9, 2, 1) == "diag"
    with pytest.raises(Exception, match="full covariances take at most 4,096 dimensions"):
        choose_covariance("full", 10**9, 16384, 1)


@pytest.mark.parametrize("tensors, meta, words", [
    ({"all.weights": torch.ones(2), "all.means": torch.zeros(2, 4), "all.factor": torch.ones(2, 4)},
     {"latent_shape": [5]}, "a prior for latents of shape (5,), the model's are (4,)"),
    ({"all.weights": torch.ones(2), "all.means": torch.zeros(3, 4), "all.factor": torch.ones(2, 4)},
     {"latent_shape": [4]}, "mixture all is malformed"),
    ({"all.weights": -torch.ones(2), "all.means": torch.zeros(2, 4), "all.factor": torch.ones(2, 4)},
     {"latent_shape": [4]}, "mixture all is malformed"),
    ({"all.weights": torch.ones(2), "all.means": torch.zeros(2, 4), "all.other": torch.ones(2, 4)},
     {"latent_shape": [4]}, "unexpected tensor 'all.other'"),
    ({"all.weights": torch.ones(2)}, {"no": "shape"}, "no fitted-prior metadata"),
    ({"all.weights": torch.ones(2), "all.means": torch.zeros(2, 4), "all.factor": torch.ones(2, 5000)},
     {"latent_shape": [4]}, "tensor 'all.factor' of shape (2, 5000) is not part of a prior for 4 latent dimensions"),
])
def test_a_malformed_prior_file_is_one_error(tmp_path, tensors, meta, words):
    path = tmp_path / "prior.safetensors"
    _write(path, tensors, meta)
    with pytest.raises(CheckpointError, match=words.replace("(", r"\(").replace(")", r"\)")):
        FittedPrior.load(path, (4,))
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="not a readable fitted prior"):
        FittedPrior.load(path, (4,))


def test_save_and_load_round_trip(tmp_path):
    mixture = {"weights": torch.tensor([0.3, 0.7]), "means": torch.randn(2, 6), "factor": torch.rand(2, 6, 6).tril()}
    prior = FittedPrior({0: mixture, 2: mixture}, (1, 2, 3), {"components": 2, "covariance": "full"})
    loaded = FittedPrior.load(prior.save(tmp_path / "p.safetensors"), (1, 2, 3))
    assert loaded.per_class and sorted(loaded.mixtures) == [0, 2]
    for name, value in mixture.items():
        assert torch.equal(loaded.mixtures[2][name], value.float())
    draws = loaded.sample(6, generator=torch.Generator().manual_seed(0), labels=torch.tensor([0, 2, 0, 2, 2, 0]))
    assert draws.shape == (6, 1, 2, 3)


def test_fit_prior_then_sample_uses_it_and_the_model_prior_on_request(run, tmp_path):
    import flexvae

    base = tiny(run["images"], run["run"], "--ckpt", run["run"])
    fitted = run_in_process(["--fit-prior", *base, "--components", "2", "--covariance", "diag"])
    assert fitted.returncode == 0, fitted.stderr
    checkpoint = sorted((run["run"] / "checkpoints").glob("*.safetensors"))[-1]
    path = prior_path(checkpoint)
    assert f"a 2-component diag Gaussian mixture, fitted on 8 images of {run['images']}: {path}" in fitted.stdout
    loaded = flexvae.load_run(run["run"])
    assert loaded.vae.fitted_prior is not None and loaded.vae.fitted_prior.meta["images"] == 8
    g = torch.Generator().manual_seed(0)
    z = loaded.vae.fitted_prior.sample(4, generator=g)
    mixture = loaded.vae.fitted_prior.mixtures[None]
    assert z.shape == (4, *loaded.vae.latent_shape)
    # draws lie within a few standard deviations of some component (not N(0, I))
    spread = ((z.flatten(1)[:, None] - mixture["means"][None]) / mixture["factor"][None]).abs().amax(2).amin(1)
    assert (spread < 6).all()

    out = tmp_path / "samples"
    proc = run_in_process(["-sample", *base, "--count", "5", "--output", out])
    assert proc.returncode == 0, proc.stderr
    assert "5 samples from the fitted prior (temperature 1)" in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == [".flexvae-written.jsonl", "made_by.json",
                                                     *[f"sample_{i:05d}.png" for i in range(5)]]
    first = (out / "sample_00000.png").read_bytes()
    assert run_in_process(["-sample", *base, "--count", "5", "--output", out]).returncode == 0
    assert (out / "sample_00000.png").read_bytes() == first  # seeded by train.seed
    model = run_in_process(["-sample", *base, "--count", "5", "--output", out, "--prior", "model"])
    assert model.returncode == 0 and "from the model prior" in model.stdout
    assert (out / "sample_00000.png").read_bytes() != first
    assert json.loads((out / "made_by.json").read_text())["prior"] == "model"


def test_sample_keeps_the_users_files_and_refuses_what_it_cannot_do(run, tmp_path):
    base = tiny(run["images"], run["run"], "--ckpt", run["run"])
    out = tmp_path / "mine"
    out.mkdir()
    (out / "sample_00001.png").write_bytes(b"my drawing")
    proc = run_in_process(["-sample", *base, "--count", "3", "--output", out])
    assert proc.returncode == 1 and "sample_00001.png" in proc.stderr and "--overwrite" in proc.stderr
    assert (out / "sample_00001.png").read_bytes() == b"my drawing"
    assert "does nothing in -sample" not in proc.stderr
    bad = run_in_process(["-sample", *base, "--count", "3", "--output", tmp_path / "o", "--classes", "a"])
    assert bad.returncode == 1 and "this model takes no labels" in bad.stderr
    zero = run_in_process(["-sample", *base, "--count", "0", "--output", tmp_path / "o"])
    assert zero.returncode == 1 and "--count must be at least 1" in zero.stderr
    ignored = run_in_process(["-sample", *base, "--input", run["images"], "--output", tmp_path / "o"])
    assert ignored.returncode == 1 and "--input does nothing in -sample (sample)" in ignored.stderr


def test_a_prior_fitted_to_another_checkpoint_is_not_used(run, tmp_path):
    import shutil

    import flexvae

    copy = tmp_path / "copy"
    shutil.copytree(run["run"], copy)
    base = tiny(run["images"], copy, "--ckpt", copy)
    assert run_in_process(["--fit-prior", *base, "--components", "1"]).returncode == 0
    assert run_in_process(["-t", *tiny(run["images"], copy, "--set", "train.max_steps=3",
                                       "--set", "train.save_every=1")]).returncode == 0
    checkpoint = sorted((copy / "checkpoints").glob("*.safetensors"))[-2]  # the one the prior was fitted to
    stale = prior_path(sorted((copy / "checkpoints").glob("*.safetensors"))[-1])
    shutil.copyfile(prior_path(checkpoint), stale)  # a prior under the newest checkpoint's name
    loaded = flexvae.load_run(copy)
    assert loaded.vae.fitted_prior is None and "was fitted to another version" in loaded.prior_note


def test_a_discrete_latent_has_no_fitted_prior(run, tmp_path):
    images = run["images"]
    vq = tmp_path / "vq"
    structures = ["--set", 'model.encoder=["C2d_3_8_3_1_1", "Down_?_8", "C2d_?_4_1_1_0"]',
                  "--set", 'model.decoder=["C2d_4_8_3_1_1", "UpS_2", "C2d_?_3_3_1_1"]']
    trained = run_in_process(["-t", *tiny(images, vq, "--set", "train.max_steps=1", "--set", "model.latent=vq",
                                          *structures)])
    assert trained.returncode == 0, trained.stderr
    proc = run_in_process(["--fit-prior", *tiny(images, vq, "--ckpt", vq)])
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == ("error: a fitted prior stands in for a continuous latent "
                                                    "(gaussian, deterministic); this model's is vq")


def test_a_run_can_fit_its_prior_at_the_end_and_its_last_grid_shows_it(tmp_path):
    import flexvae

    images = make_images(tmp_path / "images", 8)
    plain, fitted = tmp_path / "plain", tmp_path / "fitted"
    assert run_in_process(["-t", *tiny(images, plain, "--set", "train.max_steps=2")]).returncode == 0
    proc = run_in_process(["-t", *tiny(images, fitted, "--set", "train.max_steps=2", "--set", "train.fit_prior=2")])
    assert proc.returncode == 0, proc.stderr
    checkpoint = fitted / "checkpoints" / "step_00000002.safetensors"
    assert (f"fitted prior: a 2-component diag Gaussian mixture, fitted on 8 images of {images}: "
            f"{prior_path(checkpoint)}; the last sample grid shows samples from it") in proc.stdout
    assert flexvae.load_run(fitted).vae.fitted_prior is not None
    # the same training, so the same first rows (images, reconstructions); the prior row differs
    from PIL import Image

    a = np.asarray(Image.open(plain / "samples" / "step_00000002.png"))
    b = np.asarray(Image.open(fitted / "samples" / "step_00000002.png"))
    rows = a.shape[0] // 3
    assert np.array_equal(a[:2 * rows], b[:2 * rows]) and not np.array_equal(a[2 * rows:], b[2 * rows:])


# ---------------------------------------------------------------------- fitted flows
def test_a_fitted_flow_learns_two_clusters_and_round_trips_its_file(tmp_path):
    from flexvae.fitted_prior import fit_flow

    rng = np.random.default_rng(0)
    data = np.concatenate([rng.normal(-3, 0.3, (600, 2)), rng.normal(3, 0.3, (600, 2))]).astype(np.float32)
    flow = fit_flow(torch.from_numpy(data), seed=0, hidden=32, steps=800)
    with torch.no_grad():  # the data are far more likely under it than under N(0, I)
        fitted = flow.log_prob(torch.from_numpy(data)).mean().item()
    normal = torch.distributions.Normal(0.0, 1.0).log_prob(torch.from_numpy(data)).sum(1).mean().item()
    assert fitted > normal + 3
    prior = FittedPrior({None: flow}, (2,), {"density": "flow", "layers": 4, "hidden": 32})
    draws = prior.sample(4000, generator=torch.Generator().manual_seed(0)).numpy()
    assert 0.35 < (draws[:, 0] > 0).mean() < 0.65
    assert (np.abs(draws).max(1) < 1).mean() < 0.1  # few samples in the hole between the clusters
    path = prior.save(tmp_path / "flow.safetensors")
    loaded = FittedPrior.load(path, (2,))
    again = loaded.sample(4000, generator=torch.Generator().manual_seed(0)).numpy()
    np.testing.assert_array_equal(draws, again)


@pytest.mark.parametrize("meta, tensors, message", [
    ({"layers": 99, "hidden": 8}, None, "layers and hidden units must be whole numbers"),
    ({"layers": 2, "hidden": 8}, {"all.flow.couplings.0.net.0.weight": torch.zeros(8, 3)},
     "does not have the tensors of 2 couplings"),
    ({"layers": 2, "hidden": 8}, {"all.flow.couplings.0.net.0.weight": torch.zeros(9000, 9000)}, "is not part of a prior"),
])
def test_a_malformed_fitted_flow_is_one_error(tmp_path, meta, tensors, message):
    from flexvae.priors.flow import FlowNetwork

    state = {f"all.flow.{k}": v for k, v in FlowNetwork(2, 2, 8).state_dict().items()}
    if tensors:
        state.update(tensors)
    path = tmp_path / "bad.safetensors"
    save_file(state, str(path), metadata={"flexvae_prior": json.dumps({"density": "flow", "latent_shape": [2], **meta})})
    with pytest.raises(CheckpointError, match=message):
        FittedPrior.load(path, (2,))


def test_a_class_with_one_image_gets_one_component_at_it_with_the_pooled_variance():
    rng = np.random.default_rng(0)
    pooled = torch.from_numpy(rng.normal(0, 2.0, (500, 3)))
    one = pooled[:1]
    for covariance in ("diag", "full"):
        mixture = fit_mixture(one, 10, covariance, seed=0, pooled=pooled)
        assert mixture["weights"].tolist() == [1.0] and torch.equal(mixture["means"], one)
        factor = mixture["factor"][0]
        variance = factor.pow(2) if covariance == "diag" else torch.diagonal(factor @ factor.T)
        torch.testing.assert_close(variance, pooled.var(0) + 1e-6, rtol=1e-6, atol=1e-6)
    alone = fit_mixture(one, 10, "diag", seed=0)  # nothing to pool: unit variances
    torch.testing.assert_close(alone["factor"][0], torch.full((3,), (1 + 1e-6) ** 0.5, dtype=torch.float64))


def test_a_conditional_model_fits_one_prior_per_class_and_samples_the_classes_asked_for(tmp_path):
    import flexvae

    images = labelled_folder(tmp_path / "images", per_class=4)
    run = tmp_path / "run"
    assert run_in_process(["-t", *cond_args(images, run, "--set", "train.max_steps=2")]).returncode == 0
    fitted = run_in_process(["--fit-prior", *cond_args(images, run, "--ckpt", run, "--components", "1")])
    assert fitted.returncode == 0, fitted.stderr
    assert f"one per class ({len(CLASSES)})" in fitted.stdout
    loaded = flexvae.load_run(run)
    prior = loaded.vae.fitted_prior
    assert prior.per_class and sorted(prior.mixtures) == list(range(len(CLASSES)))
    # a one-component mixture per class is that class's encoded mean and spread: a draw with a tiny
    # temperature is the mean of its class
    z = prior.sample(3, generator=torch.Generator().manual_seed(0), labels=torch.tensor([0, 1, 2]),
                     temperature=1e-6)
    for c in range(3):
        torch.testing.assert_close(z[c].flatten(), prior.mixtures[c]["means"][0].float(), rtol=0, atol=1e-5)
    out = tmp_path / "samples"
    proc = run_in_process(["-sample", *cond_args(images, run, "--ckpt", run, "--count", "4", "--output", out,
                                                 "--classes", f"{CLASSES[1]},{CLASSES[2]}")])
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "made_by.json").read_text())["classes"] == f"{CLASSES[1]},{CLASSES[2]}"
    inter = run_in_process(["-inter", *cond_args(images, run, "--ckpt", run, "--classes",
                                                 f"{CLASSES[0]},{CLASSES[1]}", "--steps", "3")])
    assert inter.returncode == 0, inter.stderr


@pytest.mark.slow
def test_a_conditional_model_fits_one_flow_per_class(tmp_path):
    import flexvae
    from flexvae.priors.flow import FlowNetwork

    images = labelled_folder(tmp_path / "images", per_class=4)
    run = tmp_path / "run"
    assert run_in_process(["-t", *cond_args(images, run, "--set", "train.max_steps=2")]).returncode == 0
    fitted = run_in_process(["--fit-prior", *cond_args(images, run, "--ckpt", run, "--density", "flow")])
    assert fitted.returncode == 0, fitted.stderr
    assert "a RealNVP flow of 4 couplings" in fitted.stdout and f"one per class ({len(CLASSES)})" in fitted.stdout
    prior = flexvae.load_run(run).vae.fitted_prior
    assert prior.density == "flow" and all(isinstance(f, FlowNetwork) for f in prior.mixtures.values())
    labels = torch.tensor([0, 1, 2, 0])
    a, b = (prior.sample(4, generator=torch.Generator().manual_seed(0), labels=labels) for _ in range(2))
    assert torch.equal(a, b)
    # each class's rows are drawn from that class's flow, classes in order from one generator
    generator = torch.Generator().manual_seed(0)
    expected = {c: prior.mixtures[c].sample(n, generator) for c, n in ((0, 2), (1, 1), (2, 1))}
    torch.testing.assert_close(a.flatten(1)[[0, 3]], expected[0])
    torch.testing.assert_close(a.flatten(1)[1:2], expected[1])
    torch.testing.assert_close(a.flatten(1)[2:3], expected[2])
