"""Decoder likelihoods and the elbo objective, against torch.distributions and direct formulas."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributions as D

from flexvae.errors import StructureError
from flexvae.objective import vae_loss
from flexvae.objective.likelihoods import (
    Bernoulli,
    Gaussian,
    Laplace,
    LogisticMixture,
    make_likelihood,
)
from flexvae.train.trainer import Trainer
from helpers.losses import TinyOutputModel, grid_images, loss_cfg, output
from helpers.runs import TINY
from helpers.tiny_training import config, train


# ------------------------------------------------------------- logistic mixture
def direct_mixture_log_prob(params, x, components):
    """The discretized logistic mixture written out level by level, in float64."""
    batch, channels = x.shape[:2]
    spatial = x.shape[2:]
    params, x = params.double(), x.double()
    k = components
    logits = params[:, :k]
    means = params[:, k:k + channels * k].reshape(batch, channels, k, *spatial)
    log_scales = params[:, k + channels * k:k + 2 * channels * k].reshape(batch, channels, k, *spatial).clamp(min=-7)
    coeffs = torch.tanh(params[:, k + 2 * channels * k:]).reshape(batch, -1, k, *spatial)
    weights = torch.softmax(logits, 1)
    total = torch.zeros(batch, *spatial, dtype=torch.float64)
    for comp in range(k):
        prob = torch.ones(batch, *spatial, dtype=torch.float64)
        pair = 0
        for c in range(channels):
            mean = means[:, c, comp].clone()
            for j in range(c):
                mean = mean + coeffs[:, pair, comp] * x[:, j]
                pair += 1
            scale = log_scales[:, c, comp].exp()
            upper = torch.where(x[:, c] > 0.999, torch.ones_like(mean), torch.sigmoid((x[:, c] + 1 / 255 - mean) / scale))
            lower = torch.where(x[:, c] < -0.999, torch.zeros_like(mean), torch.sigmoid((x[:, c] - 1 / 255 - mean) / scale))
            prob = prob * (upper - lower)
        total = total + weights[:, comp] * prob
    return total.log().flatten(1).sum(1)


def _scipy_bin_mass(name, mean, x, scale):
    """float64 reference: log P(bin of x) from scipy's CDF and survival function."""
    import numpy as np
    from scipy import stats

    dist = (stats.norm if name == "gaussian" else stats.laplace)(loc=mean, scale=scale)
    h = 1 / 255
    low = np.where(x < -1 + h, -np.inf, x - h)
    high = np.where(x > 1 - h, np.inf, x + h)
    right = low > mean  # take the difference where it keeps its precision
    mass = np.where(right, dist.sf(low) - dist.sf(high), dist.cdf(high) - dist.cdf(low))
    return np.log(mass).reshape(mean.shape[0], -1).sum(1)


@pytest.mark.parametrize("scale", ["fixed", "learned", "channel"])
def test_gaussian_matches_torch_distributions(scale):
    x, mean = grid_images(), torch.randn(3, 3, 5, 4) * 0.3
    lik = Gaussian(3, scale, 0.2)
    if scale == "channel":
        with torch.no_grad():
            lik.log_scale.copy_(torch.log(torch.tensor([0.1, 0.2, 0.3])))
        sigma = torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1)
    else:
        sigma = torch.tensor(0.2)
    expected = D.Normal(mean, sigma).log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(lik.log_prob(mean, x), expected, rtol=1e-5, atol=1e-3)


def test_laplace_matches_torch_distributions():
    x, mean = grid_images(), torch.randn(3, 3, 5, 4) * 0.3
    expected = D.Laplace(mean, 0.15).log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(Laplace(3, "fixed", 0.15).log_prob(mean, x), expected, rtol=1e-5, atol=1e-3)


def test_bernoulli_matches_torch_distributions():
    x = (torch.rand(2, 1, 6, 6) > 0.5).float() * 2 - 1
    logits = torch.randn(2, 1, 6, 6)
    expected = D.Bernoulli(logits=logits).log_prob((x + 1) / 2).flatten(1).sum(1)
    torch.testing.assert_close(Bernoulli().log_prob(logits, x), expected)
    assert torch.allclose(Bernoulli().image(logits), torch.sigmoid(logits) * 2 - 1)


def test_optimal_scale_is_the_batch_maximum_likelihood_and_its_running_value_is_used_in_eval():
    x, mean = grid_images(), torch.randn(3, 3, 5, 4) * 0.3
    lik = Gaussian(3, "optimal", 0.1)
    sigma = (x - mean).pow(2).mean().sqrt()
    expected = D.Normal(mean, sigma).log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(lik.log_prob(mean, x), expected, rtol=1e-5, atol=1e-3)
    # no other sigma gives a higher total likelihood for this batch
    for other in (sigma * 0.9, sigma * 1.1):
        assert D.Normal(mean, other).log_prob(x).sum() < lik.log_prob(mean, x).sum()
    running = math.exp(float(lik.running_log_scale))
    assert 0.1 < running < float(sigma)  # moved from the start value towards the batch's
    lik.eval()
    expected_eval = D.Normal(mean, running).log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(lik.log_prob(mean, x), expected_eval, rtol=1e-5, atol=1e-3)


def test_learned_scale_gets_a_gradient_towards_the_error_scale():
    x, mean = grid_images(), torch.zeros(3, 3, 5, 4)
    lik = Gaussian(3, "learned", 0.01)  # far below the error's scale
    (-lik.log_prob(mean, x).sum()).backward()
    assert lik.log_scale.grad.item() < 0  # descent raises sigma


@pytest.mark.parametrize("channels", [1, 3])
def test_logistic_mixture_matches_a_direct_formula(channels):
    lik = LogisticMixture(channels, components=4)
    x = grid_images((2, channels, 3, 3))
    generator = torch.Generator().manual_seed(1)
    params = torch.randn(2, lik.param_channels(channels), 3, 3, generator=generator) * 0.5
    params[:, 4 + channels * 4:4 + 2 * channels * 4] -= 2.0  # scales around e^-2: bins well resolved
    torch.testing.assert_close(lik.log_prob(params, x).double(), direct_mixture_log_prob(params, x, 4),
                               rtol=1e-4, atol=1e-3)


def test_logistic_mixture_is_a_probability_mass_over_the_256_levels():
    lik = LogisticMixture(1, components=3)
    params = torch.randn(1, lik.param_channels(1), 1, 1)
    levels = torch.arange(256).float().view(256, 1, 1, 1) / 127.5 - 1
    log_p = lik.log_prob(params.expand(256, -1, -1, -1), levels)
    assert float(log_p.exp().sum()) == pytest.approx(1.0, abs=1e-4)


def test_logistic_mixture_channel_count_and_image():
    lik = make_likelihood("logistic_mixture", 3, components=10)
    assert lik.param_channels(3) == 100  # K * (1 + 3 + 3 + 3), as in PixelCNN++
    params = torch.zeros(2, 100, 4, 4)
    params[:, 10:40] = 0.25  # every component's mean 0.25, coefficients tanh(0) = 0
    torch.testing.assert_close(lik.image(params), torch.full((2, 3, 4, 4), 0.25))


def test_bits_per_dim_units():
    dims = 3 * 8 * 8
    assert LogisticMixture(3).bits_per_dim(dims * math.log(2), dims) == pytest.approx(1.0)
    assert Gaussian(3).bits_per_dim(dims * math.log(2), dims) == pytest.approx(1.0)  # of log_mass: a mass too


@pytest.mark.parametrize("name, cls", [("gaussian", Gaussian), ("laplace", Laplace)])
@pytest.mark.parametrize("log_scale", [-6.0, -3.0, -1.0, 1.0])
def test_the_mass_of_each_8bit_bin_matches_scipy_and_bits_per_dim_are_never_negative(name, cls, log_scale):
    import numpy as np

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (2, 3, 4, 4), generator=g).double() / 127.5 - 1  # 8-bit levels, both ends included
    x[0, 0, 0, :2] = torch.tensor([-1.0, 1.0])
    mean = (x + 0.02 * torch.randn(x.shape, generator=g, dtype=torch.float64)).clamp(-1.2, 1.2)
    likelihood = cls(3, "fixed", math.exp(log_scale)).eval()
    got = likelihood.log_mass(mean, x)
    reference = _scipy_bin_mass(name, mean.numpy(), x.numpy(), likelihood.fixed_log_scale.double().exp().item())
    np.testing.assert_allclose(got.numpy(), reference, rtol=1e-9, atol=1e-9)
    perfect = likelihood.log_mass(x, x)  # a perfect reconstruction at the sigma floor: every bin's mass near 1
    bits = likelihood.bits_per_dim(-perfect, x[0].numel())
    assert (bits >= 0).all() and (perfect <= 0).all()


def test_elbo_objective_is_the_negative_elbo_per_dimension():
    x, out = output()
    lik = Gaussian(3, "fixed", 0.1)
    loss = vae_loss(x, out, loss_cfg(objective="elbo", kl_weight=1.0), model=TinyOutputModel(lik))
    nll = -D.Normal(out.recon, 0.1).log_prob(x).flatten(1).sum(1)
    q = D.Normal(out.posterior.mean, torch.exp(0.5 * out.posterior.logvar))
    kl = D.kl_divergence(q, D.Normal(0.0, 1.0)).flatten(1).sum(1)
    dims = 3 * 8 * 8
    torch.testing.assert_close(loss.terms["nll"], nll.mean(), rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(loss.terms["kl"], kl.mean(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(loss.total, (nll + kl).mean() / dims, rtol=1e-5, atol=1e-5)
    mass = torch.from_numpy(_scipy_bin_mass("gaussian", out.recon.detach().double().numpy(), x.double().numpy(), 0.1))
    expected_bpd = (-mass + kl.double()).mean() / (dims * math.log(2))  # of the 8-bit bins' mass
    torch.testing.assert_close(loss.terms["bpd"].double(), expected_bpd, rtol=1e-5, atol=1e-4)
    beta = vae_loss(x, out, loss_cfg(objective="elbo", kl_weight=4.0), model=TinyOutputModel(lik))
    torch.testing.assert_close(beta.total, (nll + 4 * kl).mean() / dims, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scale", ["learned", "channel"])
def test_a_learned_log_scale_below_its_bound_keeps_a_gradient_that_raises_it(scale):
    from flexvae.objective.likelihoods import LOG_SCALE_MIN

    likelihood = Gaussian(3, scale=scale, scale_value=0.1)
    with torch.no_grad():
        likelihood.log_scale.fill_(LOG_SCALE_MIN - 2.0)  # fallen under the bound
    x = torch.rand(2, 3, 4, 4) * 2 - 1
    mean = x + 0.3  # errors far above the bound's sigma: the likelihood wants a larger scale
    (-likelihood.log_prob(mean, x).sum()).backward()
    grad = likelihood.log_scale.grad
    assert (grad < 0).all()  # a descent step raises the log scale
    likelihood.log_scale.grad = None
    (-likelihood.log_prob(x.clone(), x).sum()).backward()  # a perfect fit wants it lower still: no push down
    assert (likelihood.log_scale.grad == 0).all()
    with torch.no_grad():
        likelihood.log_scale.fill_(-1.0)  # above the bound: the gradient of the plain clamp
    likelihood.log_scale.grad = None
    (-likelihood.log_prob(mean, x).sum()).backward()
    reference = Gaussian(3, scale=scale, scale_value=math.exp(-1.0))
    (-reference.log_prob(mean, x).sum()).backward()
    torch.testing.assert_close(likelihood.log_scale.grad, reference.log_scale.grad)


def test_the_logistic_mixture_image_is_the_mixture_mean_of_samples_drawn_from_it():
    import numpy as np

    rng = np.random.default_rng(0)
    likelihood = LogisticMixture(3, components=3)
    params = torch.randn(1, likelihood.param_channels(3), 1, 1, generator=torch.Generator().manual_seed(3)) * 1.5
    params[:, 3 + 9:3 + 18] = -1.5  # log scales: sampling noise of the mean well under the tolerance
    logits, means, log_scales, coeffs = (t.double().numpy()[0, ..., 0, 0] for t in likelihood._split(params))
    weights = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    n = 400_000
    k = rng.choice(3, size=n, p=weights)  # one component per pixel, for all its channels
    x = np.zeros((n, 3))
    for c in range(3):
        loc = means[c, k] + sum(coeffs[c * (c - 1) // 2 + j, k] * x[:, j] for j in range(c))
        x[:, c] = rng.logistic(loc, np.exp(log_scales[c, k]))
    image = likelihood.image(params)[0, :, 0, 0].double().numpy()
    np.testing.assert_allclose(image, x.mean(0), atol=0.01)


@pytest.mark.usefixtures("in_repo")
def test_a_mixture_likelihood_needs_a_decoder_with_its_channels(photos, tmp_path):
    with pytest.raises(StructureError, match=r"needs \(30, 16, 16\): 30 channels"):
        Trainer(config(photos, tmp_path / "run", "loss.objective=elbo", "loss.likelihood=logistic_mixture",
                       "loss.mixture_components=3"), TINY, quiet=True)
    decoder = ('model.decoder=["C2d_2_8_3_1_1", "VAERB_8_8", "UpS_2", "C2d_8_30_3_1_1"]',)
    trainer = train(photos, tmp_path / "run", "train.max_steps=2", "loss.objective=elbo",
                    "loss.likelihood=logistic_mixture", "loss.mixture_components=3", *decoder)
    image = trainer.model.sample_prior(2)
    assert image.shape == (2, 3, 16, 16) and image.min() >= -1 and image.max() <= 1
