"""objective/objective.py: the loss of a model output, term by term, against hand-computed values."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from flexvae.errors import ConfigError
from flexvae.latents import DiagonalGaussian
from flexvae.metrics import similarity_loss_value as ssim_value
from flexvae.model import VAEOutput
from flexvae.objective import (
    LossBalance,
    check_loss_config,
    reconstruction_loss,
    vae_loss,
)
from helpers.losses import TinyOutputModel, batch, cfg, loss_cfg, output


# ------------------------------------------------------------------ reconstruction
def test_reconstruction_losses_match_torch():
    x, out = batch()
    assert torch.allclose(reconstruction_loss(out.recon, x, "mse"), F.mse_loss(out.recon, x))
    assert torch.allclose(reconstruction_loss(out.recon, x, "l1"), F.l1_loss(out.recon, x))
    logits = torch.randn_like(x) * 3
    expected = F.binary_cross_entropy(torch.sigmoid(logits), (x + 1) / 2)
    assert torch.allclose(reconstruction_loss(logits, x, "bce"), expected, atol=1e-5)
    with pytest.raises(ValueError, match="unknown reconstruction loss"):
        reconstruction_loss(out.recon, x, "huber")


@pytest.mark.parametrize("recon", ["mse", "l1", "bce"])
def test_vae_loss_recon_term(recon):
    x, out = batch()
    loss = vae_loss(x, out, cfg(recon=recon), output="logits" if recon == "bce" else "value")
    assert torch.allclose(loss.terms["recon"], reconstruction_loss(out.recon, x, recon))


# ------------------------------------------------------------------ SSIM
def test_ssim_off_has_no_term_and_does_not_crash():
    x, out = batch()
    loss = vae_loss(x, out, cfg(ssim=False))
    assert "ssim" not in loss.terms and torch.isfinite(loss.total)
    # Not even on 1D data, where SSIM is undefined.
    x1, out1 = batch(shape=(2, 3, 16), latent=(2, 4, 4))
    check_loss_config(cfg(ssim=False), (3, 16))
    assert "ssim" not in vae_loss(x1, out1, cfg(ssim=False)).terms


def test_ssim_on_logits_output_uses_the_image():
    x, out = batch()
    logits = torch.randn_like(x)
    logits_out = VAEOutput(logits, out.posterior, out.z)
    loss = vae_loss(x, logits_out, cfg(ssim=True, recon="bce"), output="logits")
    expected = 1 - ssim_value(torch.sigmoid(logits) * 2 - 1, x)
    assert torch.allclose(loss.terms["ssim"], expected, atol=1e-6)


def test_check_loss_config_errors():
    with pytest.raises(ConfigError, match="2D or 3D data"):
        check_loss_config(cfg(ssim=True), (3, 64))
    with pytest.raises(ConfigError, match="ms-ssim.*160 px") as info:
        check_loss_config(cfg(ssim=True, ssim_kind="ms-ssim"), (3, 32, 32))
    assert "32x32" in str(info.value)
    with pytest.raises(ConfigError, match="at least 3 px"):
        check_loss_config(cfg(ssim=True), (3, 2, 32))
    check_loss_config(cfg(ssim=True), (3, 32, 32))
    check_loss_config(cfg(ssim=True, ssim_kind="ms-ssim"), (3, 256, 256))


# ------------------------------------------------------------------ sparsity and weights
def test_sparse_term_is_mean_absolute_posterior_mean():
    x, out = batch()
    loss = vae_loss(x, out, cfg(sparse=True))
    assert torch.allclose(loss.terms["sparse"], out.posterior.mean.abs().mean())
    assert loss.terms["sparse"].item() > 0
    assert "sparse" not in vae_loss(x, out, cfg(sparse=False)).terms


def test_weights_multiply_their_terms():
    x, out = batch()
    out.aux["commitment"] = torch.tensor(0.25)
    config = cfg(recon_weight=2.0, kl_weight=0.3, ssim_weight=0.5, sparse_weight=0.7, ssim=True, sparse=True)
    loss = vae_loss(x, out, config)
    terms = loss.terms
    assert set(terms) == {"recon", "kl", "ssim", "sparse", "commitment"}
    expected = 2.0 * terms["recon"] + 0.3 * terms["kl"] + 0.5 * terms["ssim"] + 0.7 * terms["sparse"] + 0.25
    assert loss.total.item() == pytest.approx(expected.item(), rel=1e-6)
    # Each weight really moves the total.
    for field, value in [("recon_weight", 3.0), ("kl_weight", 0.9), ("ssim_weight", 1.5), ("sparse_weight", 2.0)]:
        changed = vae_loss(x, out, dataclasses.replace(config, **{field: value}))
        assert changed.total.item() != pytest.approx(loss.total.item())


def test_scheduled_weight_is_used_in_the_total():
    x, out = batch()
    config = cfg(kl_weight=0.4, kl_schedule="linear", kl_warmup_steps=10)
    loss = vae_loss(x, out, config, step=5)
    assert loss.kl_weight == pytest.approx(0.2)
    assert loss.total.item() == pytest.approx((loss.terms["recon"] + 0.2 * loss.terms["kl"]).item(), rel=1e-6)


def test_loss_backpropagates():
    x, out = batch()
    recon = out.recon.clone().requires_grad_(True)
    mean = out.posterior.mean.clone().requires_grad_(True)
    posterior = DiagonalGaussian(mean, out.posterior.logvar)
    loss = vae_loss(x, VAEOutput(recon, posterior, mean), cfg(ssim=True, sparse=True))
    loss.total.backward()
    assert torch.isfinite(recon.grad).all() and torch.isfinite(mean.grad).all()


# ------------------------------------------------------------------ the global batch
@pytest.mark.parametrize("settings", [
    {"free_bits": "straddling"},  # weighted objective
    {"objective": "elbo", "likelihood": "gaussian", "scale": "optimal"},
    {"objective": "elbo", "likelihood": "laplace", "scale": "optimal", "free_bits": "straddling"},
])
def test_a_step_split_into_micro_batches_is_the_step_of_the_whole_batch(settings):
    """Free bits and the optimal scale are statistics of the whole batch: one batch of 4 and two
    micro-batches of 2 give the same loss and the same gradients (float64 reference: the one batch)."""
    import copy
    import dataclasses as dc

    from flexvae.build import plan_vae
    from flexvae.config import load_config
    from flexvae.objective.likelihoods import make_likelihood
    from flexvae.train.step import MicroBatch, make_optimizer, train_step

    cfg = load_config(None, ["train.lr=1e-12", "train.grad_clip=0", "loss.kl_weight=1", "data.image_size=8"])
    torch.manual_seed(0)
    likelihood = make_likelihood(settings["likelihood"], 3, settings["scale"]) if "likelihood" in settings else None
    model = plan_vae(["C2d_3_8_3_1_1", "SiLU", "C2d_8_4_3_2_1"], ["UpS_2", "C2d_2_3_3_1_1"], (3, 8, 8)).build(
        likelihood=likelihood)
    model.train()
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    if settings.get("free_bits") == "straddling":  # just above channel 0's mean KL over the 4 images, so
        per_image = model.encode(x).kl_groups()[:, 0].detach()  # a micro-batch alone may floor it or not
        settings = {**settings, "free_bits": float(per_image.mean()) * 1.01}
        assert (per_image[:2].mean() > settings["free_bits"]) != (per_image[2:].mean() > settings["free_bits"])
    cfg = dc.replace(cfg, loss=dc.replace(cfg.loss, **settings))
    noise = torch.randn(4, 2, 4, 4, generator=torch.Generator().manual_seed(2))
    results = []
    for batches, noises in (([x], [noise]), ([x[:2], x[2:]], [noise[:2], noise[2:]])):
        copy_ = copy.deepcopy(model)
        optimizer = make_optimizer(copy_, cfg.train)
        result = train_step(copy_, [MicroBatch(b, noise=n) for b, n in zip(batches, noises)], optimizer, cfg, 0)
        results.append((result.loss, {n: p.grad.clone() for n, p in copy_.named_parameters() if p.grad is not None},
                        {n: b.clone() for n, b in copy_.named_buffers()}))
    (whole, whole_grads, whole_buffers), (split, split_grads, split_buffers) = results
    assert split == pytest.approx(whole, rel=1e-5)
    for name, grad in whole_grads.items():
        torch.testing.assert_close(split_grads[name], grad, rtol=1e-4, atol=1e-6)
    for name, value in whole_buffers.items():  # the running optimal scale moved once, as for one batch
        torch.testing.assert_close(split_buffers[name], value, rtol=1e-5, atol=1e-6)


def test_learned_balance_trains_one_log_weight_per_term():
    x, out = output()
    balance = LossBalance()
    loss = vae_loss(x, out, loss_cfg(balance="learned", kl_weight=0.5), model=TinyOutputModel(balance=balance))
    loss.total.backward()
    recon, kl = loss.terms["recon"].detach(), loss.terms["kl"].detach()
    # d/ds (w exp(-s) L + s) at s = 0 is 1 - w L
    assert balance.log_weights["recon"].grad.item() == pytest.approx(1 - float(recon), rel=1e-5)
    assert balance.log_weights["kl"].grad.item() == pytest.approx(1 - 0.5 * float(kl), rel=1e-5)
    assert float(loss.total.detach()) == pytest.approx(float(recon + 0.5 * kl), rel=1e-6)


def test_balance_with_the_elbo_is_refused():
    with pytest.raises(ConfigError, match="loss.balance = 'learned' applies to the weighted objective"):
        check_loss_config(loss_cfg(objective="elbo", balance="learned"), (3, 8, 8))
