"""Learned priors (priors/): densities against independent references, the Monte Carlo KL's
expectation against numerical integration, training, checkpoints, hierarchies, free bits,
stages, DDP, and the config's mistakes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from flexvae.latents.gaussian import DiagonalGaussian
from flexvae.priors import PRIORS, PriorKL, build_prior
from flexvae.priors.flow import FlowNetwork, FlowPrior, flow_parameters
from flexvae.priors.mixture import MixturePrior
from helpers.inprocess import run_in_process
from helpers.runs import REPO, make_images, tiny


def _mog_1d():
    prior = MixturePrior(3, latent_shape=(1,), data_shape=(1, 4, 4))
    with torch.no_grad():
        prior.means.copy_(torch.tensor([[-2.0], [0.5], [3.0]]))
        prior.logvars.copy_(torch.tensor([[-1.0], [0.0], [0.7]]))
        prior.logits.copy_(torch.tensor([0.2, -0.3, 0.6]))
    return prior


def _train(tmp_path, name, *extra, steps=2):
    images = tmp_path / "images"
    if not images.exists():
        make_images(images, 8)
    run = tmp_path / name
    result = run_in_process(["-t", *tiny(images, run, "--set", f"train.max_steps={steps}", "--set",
                                         f"train.save_every={steps}", *extra)])
    return result, run


LAPLACE_PRIOR = '''
import torch
from flexvae.priors import Arg, Prior, register_prior


@register_prior("Laplace", Arg("scale", float, 1.0, "the scale b"), doc="i.i.d. Laplace(0, b)")
class LaplacePrior(Prior):
    def __init__(self, scale=1.0, latent_shape=(), data_shape=()):
        super().__init__(latent_shape, data_shape)
        self.log_scale = torch.nn.Parameter(torch.tensor(float(scale)).log())

    def log_prob(self, z, vae=None):
        b = self.log_scale.exp()
        return (-z.flatten(1).abs() / b - torch.log(2 * b)).sum(1)

    def sample(self, n, vae=None, generator=None, device=None, temperature=1.0):
        u = torch.rand((n, self.dims), generator=generator, device=device) - 0.5
        return (-self.log_scale.exp() * temperature * u.sign() * torch.log1p(-2 * u.abs())).view(n, *self.latent_shape)
'''


def test_the_mixture_density_is_torch_distributions_mixture():
    prior = MixturePrior(4, latent_shape=(2, 3), data_shape=(1, 4, 4))
    with torch.no_grad():
        prior.logits.copy_(torch.tensor([0.1, -1.0, 0.5, 2.0]))
        prior.logvars.normal_(0, 0.5, generator=torch.Generator().manual_seed(3))
    z = torch.randn(5, 2, 3, generator=torch.Generator().manual_seed(4))
    D = torch.distributions
    reference = D.MixtureSameFamily(D.Categorical(logits=prior.logits.double()),
                                    D.Independent(D.Normal(prior.means.double(), (0.5 * prior.logvars.double()).exp()), 1))
    torch.testing.assert_close(prior.log_prob(z).double(), reference.log_prob(z.flatten(1).double()),
                               rtol=1e-5, atol=1e-5)


def test_the_monte_carlo_kl_has_the_kl_of_numerical_integration_as_its_expectation():
    """E over z ~ q of the one-sample estimate -H(q) - log p(z) against the integral of
    q (log q - log p) on a fine grid in float64, for a posterior inside and one beside the mixture."""
    prior = _mog_1d()
    grid = np.linspace(-15, 15, 300_001)
    weights = np.exp(prior.logits.detach().double().numpy())
    weights /= weights.sum()
    means, stds = prior.means.detach().double().numpy()[:, 0], np.exp(0.5 * prior.logvars.detach().double().numpy()[:, 0])

    def normal(x, m, s):
        return np.exp(-0.5 * ((x - m) / s) ** 2) / (s * math.sqrt(2 * math.pi))

    p = sum(w * normal(grid, m, s) for w, m, s in zip(weights, means, stds))
    for mean, logvar in ((0.3, -0.5), (-4.0, 1.0)):
        q = normal(grid, mean, math.exp(0.5 * logvar))
        exact = np.trapezoid(q * (np.log(q + 1e-300) - np.log(p)), grid)
        n = 400_000
        posterior = DiagonalGaussian(torch.full((n, 1), mean, dtype=torch.float64),
                                     torch.full((n, 1), logvar, dtype=torch.float64))
        z = posterior.sample(generator=torch.Generator().manual_seed(0))
        estimate = PriorKL(posterior, z, prior.log_prob(z).double()).kl()
        assert estimate.mean().item() == pytest.approx(exact, abs=4 * estimate.std().item() / math.sqrt(n) + 1e-3)
        # the per-element estimate sums to the image's, and the latent is one free-bits group
        torch.testing.assert_close(PriorKL(posterior, z, prior.log_prob(z)).kl_groups()[:, 0].float(), estimate.float(),
                                   rtol=1e-5, atol=1e-5)


def test_with_the_prior_equal_to_the_posterior_family_the_estimate_matches_the_closed_form_kl():
    """A one-component mixture is a diagonal Gaussian: the Monte Carlo KL averages to the closed form."""
    prior = MixturePrior(1, latent_shape=(3,), data_shape=(1, 4, 4))
    with torch.no_grad():
        prior.means.copy_(torch.tensor([[0.5, -1.0, 2.0]]))
        prior.logvars.copy_(torch.tensor([[0.3, -0.2, 1.0]]))
    n = 200_000
    q = DiagonalGaussian(torch.tensor([0.0, 0.5, 1.0]).expand(n, 3), torch.tensor([-1.0, 0.0, 0.5]).expand(n, 3))
    closed = DiagonalGaussian(q.mean[:1], q.logvar[:1], prior=DiagonalGaussian(prior.means.detach(), prior.logvars.detach())).kl()
    z = q.sample(generator=torch.Generator().manual_seed(1))
    estimate = PriorKL(q, z, prior.log_prob(z)).kl()
    assert estimate.mean().item() == pytest.approx(closed.item(), abs=4 * estimate.std().item() / math.sqrt(n))


def test_a_flow_is_a_density_and_its_sampling_inverts_it():
    torch.manual_seed(0)
    flow = FlowNetwork(2, layers=4, hidden=16)
    with torch.no_grad():  # away from the identity it starts as
        for p in flow.parameters():
            p.add_(0.3 * torch.randn_like(p))
    axis = torch.linspace(-9, 9, 601, dtype=torch.float32)
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), -1).reshape(-1, 2)
    with torch.no_grad():
        density = flow.log_prob(grid).double().exp().reshape(601, 601)
    step = float(axis[1] - axis[0])
    assert density.sum().item() * step * step == pytest.approx(1.0, abs=5e-3)
    u = torch.randn(64, 2, generator=torch.Generator().manual_seed(1))
    z = u.clone()
    with torch.no_grad():
        for coupling in reversed(flow.couplings):
            z = coupling.inverse(z)
        back = z
        for coupling in flow.couplings:
            back, _ = coupling(back)
    torch.testing.assert_close(back, u, rtol=1e-5, atol=1e-5)
    assert flow_parameters(2, 4, 16) == sum(p.numel() for p in flow.parameters())
    fresh = FlowPrior(2, 8, latent_shape=(2,), data_shape=(1, 4, 4))  # starts as N(0, I)
    torch.testing.assert_close(fresh.log_prob(u), torch.distributions.Normal(0.0, 1.0).log_prob(u).sum(1))


@pytest.mark.parametrize("token, keys", [("MoG_components=3", {"prior.means", "prior.logvars", "prior.logits"}),
                                         ("Vamp_components=2", {"prior.pseudo_inputs"}),
                                         ("Flow_layers=2_hidden=8", None)])
def test_a_learned_prior_trains_with_the_model_and_round_trips_its_checkpoint(tmp_path, token, keys):
    from flexvae.checkpoint import load_run

    result, run = _train(tmp_path, "run", "--set", f"model.prior={token}")
    assert result.returncode == 0, result.stderr
    assert f"prior {token}" in result.stdout + result.stderr
    saved = load_file(str(sorted((run / "checkpoints").glob("*.safetensors"))[-1]))
    prior_keys = {k[len("model."):] for k in saved if k.startswith("model.prior.")}
    assert prior_keys and (keys is None or prior_keys == keys)
    loaded = load_run(run)
    for key in prior_keys:  # trained (not the initial values) and loaded as saved
        assert torch.equal(loaded.vae.state_dict()[key], saved["model." + key])
    fresh = build_prior(token, loaded.vae.latent_shape, (3, 16, 16))
    assert any(not torch.equal(v, saved["model.prior." + k]) for k, v in fresh.state_dict().items())
    draws = [loaded.vae.sample_prior(3, generator=torch.Generator().manual_seed(5)) for _ in range(2)]
    assert torch.equal(*draws) and draws[0].shape == (3, 3, 16, 16)


def test_the_normal_prior_is_the_model_without_a_prior_weight_for_weight(tmp_path):
    _, plain = _train(tmp_path, "plain")
    _, normal = _train(tmp_path, "normal", "--set", "model.prior=Normal")
    a, b = (load_file(str(sorted((r / "checkpoints").glob("*.safetensors"))[-1])) for r in (plain, normal))
    model = {k for k in a if k.startswith("model.")}
    assert model == {k for k in b if k.startswith("model.")} and not any(".prior." in k for k in model)
    assert all(torch.equal(a[k], b[k]) for k in model)


def test_a_hierarchys_top_latent_takes_the_learned_prior_and_its_groups_keep_theirs(tmp_path):
    from flexvae.assemble import model_from_config
    from flexvae.config import load_config

    cfg = load_config(REPO / "configs" / "digits_hvae.toml", ["model.prior=MoG_components=4"])
    model, plan = model_from_config(cfg, REPO / "configs" / "digits_hvae.toml")
    torch.manual_seed(0)
    x = torch.rand(3, *plan.data_shape) * 2 - 1
    out = model(x, generator=torch.Generator().manual_seed(0))
    assert isinstance(out.posterior, PriorKL) and out.groups
    expected = -0.5 * (1 + math.log(2 * math.pi) + out.posterior.logvar).flatten(1).sum(1) - model.prior.log_prob(out.z)
    groups = sum(g.kl() for g in out.groups.values())
    torch.testing.assert_close(out.kl(), (expected + groups).float(), rtol=1e-5, atol=1e-4)
    out.kl().mean().backward()
    assert model.prior.means.grad is not None and model.prior.means.grad.abs().sum() > 0


def test_free_bits_floor_the_whole_latents_kl_under_a_learned_prior():
    from flexvae.objective.kl import kl_per_image

    prior = _mog_1d()
    q = DiagonalGaussian(torch.zeros(4, 1), torch.zeros(4, 1))
    z = q.sample(generator=torch.Generator().manual_seed(0))
    posterior = PriorKL(q, z, prior.log_prob(z))
    kl = posterior.kl().mean()
    assert kl_per_image(posterior, free_bits=kl.item() + 1.0).item() == pytest.approx(kl.item() + 1.0)
    assert kl_per_image(posterior, free_bits=max(kl.item() - 1.0, 0.01)).item() == pytest.approx(kl.item(), rel=1e-6)


def test_a_stage_can_train_the_prior_alone(tmp_path):
    images = make_images(tmp_path / "images", 8)
    config = tmp_path / "c.toml"
    config.write_text((REPO / "configs" / "tiny_test.toml").read_text().replace('"structures/', f'"{REPO}/structures/')
                      + '\n[[stage]]\ntrain = ["prior"]\n')
    run = tmp_path / "run"
    result = run_in_process(["-t", "-c", str(config), "--set", f"train.out_dir={run}", "--set", f"data.path={images}",
                             "--set", "train.device=cpu", "--set", "model.prior=MoG_components=2", "--set",
                             "train.max_steps=2", "--set", "train.save_every=1", "--set", "train.ema=false"])
    assert result.returncode == 0, result.stderr
    first, last = (load_file(str(run / "checkpoints" / f"step_0000000{s}.safetensors")) for s in (1, 2))
    for key in first:
        if key.startswith("model.") and not key.startswith("model.likelihood."):
            changed = not torch.equal(first[key], last[key])
            assert changed == key.startswith("model.prior."), key


@pytest.mark.parametrize("override, message", [
    ("model.prior=MoGG", "model.prior, token 'MoGG': unknown prior 'MoGG'. Did you mean 'MoG'?"),
    ("model.prior=MoG_components=0", "components must lie in [1, 4096], found 0"),
    ("model.prior=Flow_depth=3", "Flow has no argument 'depth'"),
    ("model.prior=Normal_3", "the Normal prior takes no arguments"),
])
def test_prior_mistakes_get_one_line(tmp_path, override, message):
    result, _ = _train(tmp_path, "bad", "--set", override)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and message in lines[-1], result.stderr
    assert "Traceback" not in result.stderr


def test_a_learned_prior_on_a_latent_without_a_density_is_refused_in_one_line():
    from flexvae.errors import ConfigError

    for kind in ("vq", "deterministic", "categorical"):
        with pytest.raises(ConfigError, match=f"model.prior = 'MoG' is a density over a Gaussian latent.*"
                                              f"model.latent is '{kind}'"):
            build_prior("MoG", (4, 2, 2), (3, 16, 16), kind)


def test_the_registry_lists_every_prior_for_the_priors_mode():
    result = run_in_process(["--priors"])
    assert result.returncode == 0
    for name in ("Normal", *PRIORS.layers):
        assert name + "(" in result.stdout


@pytest.mark.slow
def test_two_processes_train_a_vampprior_with_free_bits_as_one_process(tmp_path):
    """The VampPrior runs the encoder a second time inside the forward, and free bits under a
    learned prior floor the global batch's KL: replicas equal, and equal to one process."""
    from helpers.ddp import assert_two_processes_match_one

    images = make_images(tmp_path / "images", 8)
    common = [f"data.path={images}", "data.num_workers=0", "train.max_steps=3", "train.save_every=3",
              "train.grad_accum=2", "train.lr=1e-4", "train.grad_clip=0", "train.log_every=1",
              "loss.objective=elbo", "loss.scale=optimal", "loss.free_bits=0.2", "model.prior=Vamp_components=3"]
    assert_two_processes_match_one(tmp_path, common, columns=("loss", "nll", "kl"))


def test_a_prior_from_a_plugin_file_is_one_class_and_one_decorator(tmp_path):
    """Nothing in flexvae edited: the plugin's prior trains, its KL is the Monte Carlo estimate
    against torch.distributions.Laplace, and --priors lists it."""
    from flexvae.assemble import model_from_config
    from flexvae.config import load_config

    plugin = tmp_path / "laplace_prior.py"
    plugin.write_text(LAPLACE_PRIOR)
    result, run = _train(tmp_path, "laplace", "--set", f"model.plugins={plugin}", "--set",
                         "model.prior=Laplace_scale=0.5")
    assert result.returncode == 0, result.stderr
    assert any(k.startswith("model.prior.log_scale") for k in load_file(str(sorted((run / "checkpoints").glob("*.safetensors"))[-1])))
    cfg = load_config(REPO / "configs" / "tiny_test.toml", [f"model.plugins={plugin}", "model.prior=Laplace_scale=0.5"])
    model, plan = model_from_config(cfg, REPO / "configs" / "tiny_test.toml")
    x = torch.rand(2, *plan.data_shape) * 2 - 1
    out = model(x, generator=torch.Generator().manual_seed(0))
    reference = torch.distributions.Laplace(0.0, 0.5).log_prob(out.z.flatten(1).double()).sum(1)
    entropy = 0.5 * (1 + math.log(2 * math.pi) + out.posterior.logvar.double()).flatten(1).sum(1)
    torch.testing.assert_close(out.kl().double(), -entropy - reference, rtol=1e-5, atol=1e-3)
    listed = run_in_process(["--priors", "-c", str(REPO / "configs" / "tiny_test.toml"), "--set",
                             f"model.plugins={plugin}"])
    assert "Laplace(scale=1.0)" in listed.stdout


def test_prior_fitted_without_a_fitted_prior_is_one_line_for_every_sampling_mode(tmp_path):
    _, run = _train(tmp_path, "run")
    for mode in ("-pics", "-eval", "-sample"):
        result = run_in_process([mode, "--ckpt", str(run), "--prior", "fitted", "--output", str(tmp_path / mode)])
        assert result.returncode != 0 and "Traceback" not in result.stderr, (mode, result.stderr)
        assert "has no fitted prior; fit one first: fit-prior --ckpt" in result.stderr.strip().splitlines()[-1]


def test_the_importance_sampled_likelihood_and_evaluations_kl_use_the_learned_prior():
    from flexvae.analysis.evaluate import evaluate_model, importance_log_weights
    from flexvae.assemble import model_from_config
    from flexvae.config import load_config

    cfg = load_config(REPO / "configs" / "tiny_test.toml", ["model.prior=MoG_components=1"])
    model, plan = model_from_config(cfg, REPO / "configs" / "tiny_test.toml")
    model.eval()
    with torch.no_grad():  # the one component is N(0, I): the same weights as the model without a prior
        model.prior.means.zero_()
        model.prior.logvars.zero_()
    x = torch.rand(3, *plan.data_shape, generator=torch.Generator().manual_seed(0)) * 2 - 1

    def weights():
        with torch.no_grad():
            return importance_log_weights(model, x, 4, generator=torch.Generator().manual_seed(1))

    learned = weights()
    prior, model.prior = model.prior, None
    normal = weights()
    model.prior = prior
    torch.testing.assert_close(learned, normal, rtol=1e-5, atol=1e-3)
    with torch.no_grad():
        model.prior.means.fill_(0.7)
    assert not torch.allclose(weights(), normal, atol=1e-2)
    result = evaluate_model(model, [x], nll_samples=0)
    assert "Monte Carlo" in result["kl"]["prior"]
