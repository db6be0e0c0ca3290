"""objective/kl.py: the KL term, its weight, and free bits."""

import dataclasses
import math

import pytest
import torch

from flexvae.config import LossConfig
from flexvae.latents import DiagonalGaussian, PointPosterior
from flexvae.model import VAEOutput
from flexvae.objective import kl_per_image, kl_term, vae_loss
from flexvae.objective.likelihoods import Gaussian


def grid_images(shape=(3, 3, 5, 4), seed=0):
    """8-bit images on [-1, 1], with the extreme levels present."""
    generator = torch.Generator().manual_seed(seed)
    levels = torch.randint(0, 256, shape, generator=generator)
    levels.view(-1)[:2] = torch.tensor([0, 255])
    return levels.float() / 127.5 - 1


# -------------------------------------------------------------------- objective
def loss_cfg(**changes):
    return dataclasses.replace(LossConfig(), **changes)


class _Model(torch.nn.Module):
    def __init__(self, likelihood=None, balance=None):
        super().__init__()
        self.likelihood, self.balance = likelihood, balance


def output(seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = grid_images((4, 3, 8, 8), seed)
    recon = x + 0.1 * torch.randn(x.shape, generator=generator)
    posterior = DiagonalGaussian(torch.randn(4, 2, 4, 4, generator=generator),
                                 torch.randn(4, 2, 4, 4, generator=generator) - 1)
    return x, VAEOutput(recon, posterior, posterior.mean)


def cfg(**changes) -> LossConfig:
    return dataclasses.replace(LossConfig(), **changes)


def batch(shape=(2, 3, 16, 16), latent=(2, 4, 4, 4), seed=0):
    """Images in [-1, 1], a nearby reconstruction and a posterior."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=generator) * 2 - 1
    recon = (x + 0.2 * torch.randn(shape, generator=generator)).clamp(-1, 1)
    mean = torch.randn(latent, generator=generator)
    logvar = torch.randn(latent, generator=generator)
    posterior = DiagonalGaussian(mean, logvar)
    return x, VAEOutput(recon, posterior, posterior.mean)


def test_free_bits_floor_each_channel_but_leave_the_logged_kl_true():
    x, out = output()
    per_channel = out.posterior.kl_groups().mean(0)
    floor = float(per_channel.max()) + 1.0  # above every channel: the KL term is constant
    assert float(kl_per_image(out.posterior, floor)) == pytest.approx(floor * 2)
    low = float(per_channel.min()) + 1e-3  # floors only the smallest channel
    assert float(kl_per_image(out.posterior, low)) == pytest.approx(float(per_channel.clamp(min=low).sum()), rel=1e-6)
    mean = out.posterior.mean.detach().requires_grad_()
    posterior = DiagonalGaussian(mean, out.posterior.logvar)
    kl_per_image(posterior, floor).backward()
    assert mean.grad is None or float(mean.grad.abs().max()) == 0.0  # no KL gradient under the floor
    elbo = vae_loss(x, out, loss_cfg(objective="elbo", free_bits=floor), model=_Model(Gaussian(3)))
    torch.testing.assert_close(elbo.terms["kl"], out.posterior.kl().mean())
    # the weighted objective's per-element KL is the per-image one over the elements
    torch.testing.assert_close(kl_term(out.posterior, "mean", floor), torch.tensor(floor * 2 / 32))


def test_free_bits_work_on_a_categorical_latent_vector():
    from flexvae.latents.categorical import CategoricalPosterior

    posterior = CategoricalPosterior(torch.randn(4, 3, 5), tau=1.0)
    log_q = torch.log_softmax(posterior.logits.double(), dim=2)  # float64, written out: sum_k q log(q K)
    per_variable = (log_q.exp() * (log_q + math.log(5))).sum(2)  # (B, G)
    expected = per_variable.mean(0).clamp(min=0.5).sum()
    torch.testing.assert_close(kl_per_image(posterior, 0.5).double(), expected, rtol=1e-5, atol=1e-6)


def test_kl_weight_from_the_config_reaches_the_loss():
    x, out = batch()
    for weight in (0.0, 1e-4, 0.5):
        loss = vae_loss(x, out, cfg(kl_weight=weight))
        assert loss.kl_weight == weight
        assert loss.total.item() == pytest.approx((loss.terms["recon"] + weight * loss.terms["kl"]).item(), rel=1e-6)


# ------------------------------------------------------------------ KL reduction
def test_kl_sum_is_mean_times_latent_elements_per_sample():
    _, out = batch(latent=(3, 4, 5, 6))
    mean_kl = kl_term(out.posterior, "mean")
    sum_kl = kl_term(out.posterior, "sum")
    assert sum_kl.item() == pytest.approx(mean_kl.item() * 4 * 5 * 6, rel=1e-5)
    assert sum_kl.item() == pytest.approx(out.posterior.kl().mean().item(), rel=1e-6)
    with pytest.raises(ValueError, match="reduction"):
        kl_term(out.posterior, "max")


def test_kl_of_a_point_posterior_is_zero():
    posterior = PointPosterior(torch.randn(2, 4, 3, 3))
    assert kl_term(posterior, "mean").item() == 0 and kl_term(posterior, "sum").item() == 0
