"""latents/mixed.py: the mixed (Gaussian + class) latent: its KL, labels and samples."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from flexvae.latents import MixedLatent


# ------------------------------------------------------------------ mixed latent
def _mixed(classes=3, weight=1.0, spatial=(2, 2)):
    torch.manual_seed(0)
    latent = MixedLatent(classes=classes, classify_weight=weight)
    h = torch.randn(4, 2 * 3 + classes, *spatial)
    return latent, h


def test_mixed_latent_kl_is_the_sum_of_its_parts_against_torch_distributions():
    from torch.distributions import Categorical, Normal, kl_divergence

    latent, h = _mixed()
    posterior = latent(h)
    mean, logvar, logits = h[:, :3], h[:, 3:6], h[:, 6:].flatten(2).mean(2)
    gauss = kl_divergence(Normal(mean, torch.exp(0.5 * logvar)), Normal(0.0, 1.0)).flatten(1).sum(1)
    cat = kl_divergence(Categorical(logits=logits), Categorical(probs=torch.full((4, 3), 1 / 3)))
    torch.testing.assert_close(posterior.kl(), gauss + cat, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(posterior.kl_groups().sum(1), gauss + cat, rtol=1e-5, atol=1e-5)
    assert posterior.kl_groups().shape == (4, 4)  # 3 style channels + the class variable
    parts = posterior.diagnostics()
    torch.testing.assert_close(parts["kl_style"], gauss.mean())
    torch.testing.assert_close(parts["kl_class"], cat.mean())
    assert latent.latent_shape((9, 2, 2)) == (6, 2, 2)


def test_mixed_latent_observes_labels_on_the_labelled_rows():
    latent, h = _mixed(weight=0.5)
    posterior = latent(h)
    labels = torch.tensor([2, -1, 0, -1])
    posterior.observe(labels)
    z = posterior.sample(generator=torch.Generator().manual_seed(1))
    assert z.shape == (4, 6, 2, 2)
    assert z[0, 3:, 0, 0].tolist() == [0, 0, 1] and z[2, 3:, 1, 1].tolist() == [1, 0, 0]
    class_kl = posterior.class_kl()
    assert (class_kl[[0, 2]] == 0).all() and (class_kl[[1, 3]].sum(1) > 0).all()
    logits = h[:, 6:].flatten(2).mean(2)
    expected = 0.5 * F.cross_entropy(logits[[0, 2]], torch.tensor([2, 0]), reduction="sum") / 4
    torch.testing.assert_close(posterior.aux_losses()["classify"], expected)
    assert posterior.mode()[0, 3:, 0, 0].tolist() == [0, 0, 1]
    unsupervised = MixedLatent(classes=3, classify_weight=0.0)(h)
    unsupervised.observe(labels)
    assert unsupervised.aux_losses() == {} and (unsupervised.class_kl() > 0).any(dim=1).all()
    assert math.isfinite(float(unsupervised.diagnostics()["label_purity"]))


def test_mixed_latent_noise_makes_the_sample_and_priors_take_labels():
    latent, h = _mixed()
    posterior = latent(h)
    shape = latent.latent_shape(tuple(h.shape[1:]))
    noise = torch.randn(4, *latent.noise_shape(shape))
    assert noise.shape == (4, 3 * 4 + 3)
    torch.testing.assert_close(posterior.sample(noise=noise)[:, :3], posterior.gaussian.sample(noise=noise[:, :12].view(4, 3, 2, 2)))
    z = latent.sample_prior(5, shape, generator=torch.Generator().manual_seed(0))
    assert z.shape == (5, *shape) and (z[:, 3:].sum(1) == 1).all()
    forced = latent.with_labels(z, torch.tensor([0, 1, 2, -1, 1]))
    assert forced[1, 3:, 0, 0].tolist() == [0, 1, 0] and torch.equal(forced[3], z[3]) and torch.equal(forced[:, :3], z[:, :3])


def test_mixed_latent_channel_errors():
    with pytest.raises(ValueError, match=r"needs 2 x c \+ 3 channels"):
        MixedLatent(classes=3).latent_shape((4, 2, 2))
    with pytest.raises(ValueError, match="at least 2 classes"):
        MixedLatent(classes=1)
