"""objective/kl.py: the KL term, its weight, and free bits."""

import math

import pytest
import torch

from flexvae.latents import DiagonalGaussian, PointPosterior
from flexvae.objective import kl_per_image, kl_term, vae_loss
from flexvae.objective.likelihoods import Gaussian
from helpers.losses import TinyOutputModel, batch, cfg, loss_cfg, output


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
    elbo = vae_loss(x, out, loss_cfg(objective="elbo", free_bits=floor), model=TinyOutputModel(Gaussian(3)))
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
