"""The VAE: determinism, save/load, the posterior's KL, latent scaling and prior sampling."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.distributions import Normal, kl_divergence

from flexvae.build import build_vae, plan_vae
from flexvae.latents import DeterministicLatent, DiagonalGaussian, GaussianLatent, PointPosterior
from flexvae.latents.gaussian import LOGVAR_MAX, LOGVAR_MIN
from flexvae.model import VAE, VAEOutput

STRUCTURES = Path(__file__).resolve().parents[1] / "structures"
ENCODER, DECODER = STRUCTURES / "tiny_encoder.json", STRUCTURES / "tiny_decoder.json"
DATA = (3, 16, 16)


def tiny_model(seed=0, **kwargs) -> VAE:
    torch.manual_seed(seed)
    return build_vae(ENCODER, DECODER, DATA, **kwargs)


def images(n=2, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand((n, *DATA), generator=generator) * 2 - 1


def test_seeded_build_is_deterministic():
    a, b, c = tiny_model(0).state_dict(), tiny_model(0).state_dict(), tiny_model(1).state_dict()
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point() and a[k].numel() > 1)


def test_seeded_forward_is_deterministic():
    model, x = tiny_model(), images()
    first = model(x, generator=torch.Generator().manual_seed(7))
    second = model(x, generator=torch.Generator().manual_seed(7))
    other = model(x, generator=torch.Generator().manual_seed(8))
    assert isinstance(first, VAEOutput)
    assert torch.equal(first.z, second.z) and torch.equal(first.recon, second.recon)
    assert not torch.equal(first.z, other.z)
    mode = model(x, sample=False)
    assert torch.equal(mode.z, mode.posterior.mean)


def test_state_dict_round_trip_through_safetensors(tmp_path):
    model, x = tiny_model(0).eval(), images()
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    restored = tiny_model(5).eval()
    restored.load_state_dict(load_file(str(path)))
    with torch.no_grad():
        assert torch.equal(model.reconstruct(x), restored.reconstruct(x))
        assert torch.equal(model.encode_latents(x), restored.encode_latents(x))


# ------------------------------------------------------------------ posterior
@pytest.mark.parametrize("latent_shape", [(4, 6), (4, 3, 5), (2, 2, 3, 4)], ids=["1d", "2d", "3d"])
def test_kl_matches_torch_distributions(latent_shape):
    generator = torch.Generator().manual_seed(0)
    h = torch.randn((3, 2 * latent_shape[0], *latent_shape[1:]), generator=generator) * 2
    posterior = GaussianLatent()(h)
    mean, logvar = h.chunk(2, dim=1)
    assert torch.equal(posterior.mean, mean)
    reference = kl_divergence(Normal(mean, torch.exp(0.5 * logvar)), Normal(0.0, 1.0)).flatten(1).sum(dim=1)
    assert posterior.kl().shape == (3,)
    assert torch.allclose(posterior.kl(), reference, rtol=1e-5, atol=1e-5)
    assert torch.allclose(posterior.kl_elements().flatten(1).sum(1), posterior.kl())


def test_logvar_is_clamped():
    mean = torch.zeros(1, 2, 2, 2)
    logvar = torch.tensor([-100.0, -30.0, 0.0, 20.0, 100.0, -5.0, 5.0, 50.0]).reshape(1, 2, 2, 2)
    posterior = DiagonalGaussian(mean, logvar)
    assert posterior.logvar.min() == LOGVAR_MIN == -30.0
    assert posterior.logvar.max() == LOGVAR_MAX == 20.0
    assert torch.isfinite(posterior.std).all() and torch.isfinite(posterior.kl()).all()
    assert torch.equal(posterior.logvar.flatten(), torch.tensor([-30.0, -30, 0, 20, 20, -5, 5, 20]))


def test_sample_uses_mean_and_std():
    mean, logvar = torch.full((2, 3, 4), 1.5), torch.full((2, 3, 4), 2 * torch.log(torch.tensor(0.5)).item())
    posterior = DiagonalGaussian(mean, logvar)
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(3))
    sample = posterior.sample(torch.Generator().manual_seed(3))
    assert torch.allclose(sample, 1.5 + 0.5 * noise)
    assert torch.equal(posterior.mode(), mean)


def test_deterministic_latent_has_zero_kl():
    latent = DeterministicLatent()
    h = torch.randn(2, 3, 4, 4)
    posterior = latent(h)
    assert isinstance(posterior, PointPosterior)
    assert torch.equal(posterior.sample(), h) and torch.equal(posterior.mode(), h)
    assert torch.equal(posterior.kl(), torch.zeros(2))
    assert torch.equal(posterior.kl_elements(), torch.zeros_like(h))
    assert latent.latent_shape((3, 4, 4)) == (3, 4, 4)

    model = build_vae(["C2d_3_2_3_2_1"], ["UpS_2", "C2d_2_3_3_1_1"], DATA, DeterministicLatent())
    out = model(images())
    assert torch.equal(out.posterior.kl(), torch.zeros(2))


# ------------------------------------------------------------------ latents and scaling
def test_encode_and_decode_latents_apply_scaling_without_touching_the_input():
    model, x = tiny_model(scaling_factor=0.18215).eval(), images()
    x_before = x.clone()
    with torch.no_grad():
        latents = model.encode_latents(x)
        assert torch.equal(x, x_before)
        assert torch.allclose(latents, model.encode(x).mode() * 0.18215)
        latents_before = latents.clone()
        decoded = model.decode_latents(latents)
        assert torch.equal(latents, latents_before), "decode_latents changed the caller's tensor"
        assert torch.allclose(decoded, model.decode(latents_before / 0.18215))
        # Round trip: decoding the scaled latents gives the unscaled reconstruction.
        assert torch.allclose(model.to_image(decoded), model.reconstruct(x), atol=1e-6)


def test_encode_latents_sample_is_seeded():
    model, x = tiny_model(scaling_factor=0.5), images()
    with torch.no_grad():
        a = model.encode_latents(x, sample=True, generator=torch.Generator().manual_seed(1))
        b = model.encode_latents(x, sample=True, generator=torch.Generator().manual_seed(1))
        posterior = model.encode(x)
        expected = posterior.sample(torch.Generator().manual_seed(1)) * 0.5
    assert torch.equal(a, b) and torch.allclose(a, expected)


def test_sample_prior_decodes_standard_normal_raw_latents():
    model = tiny_model(scaling_factor=0.18215).eval()
    samples = model.sample_prior(3, generator=torch.Generator().manual_seed(0))
    assert samples.shape == (3, *DATA)
    assert samples.min() >= -1 and samples.max() <= 1
    # The KL prior is N(0, I) on raw latents: those are what the decoder must see, unscaled.
    z = torch.randn((3, *model.latent_shape), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(samples, model.decode(z).clamp(-1, 1))


def test_logits_output_maps_through_sigmoid():
    model = tiny_model(output="logits")
    recon = torch.randn(2, *DATA) * 4
    assert torch.allclose(model.to_image(recon), torch.sigmoid(recon) * 2 - 1)
    samples = model.sample_prior(2, generator=torch.Generator().manual_seed(0))
    assert samples.min() >= -1 and samples.max() <= 1
    values = tiny_model(output="value")
    assert torch.equal(values.to_image(recon), recon.clamp(-1, 1))


def test_model_rejects_bad_settings():
    plan = plan_vae(ENCODER, DECODER, DATA)
    with pytest.raises(ValueError, match="scaling_factor"):
        plan.build(scaling_factor=0)
    with pytest.raises(ValueError, match="output"):
        plan.build(output="probabilities")


@pytest.mark.parametrize(
    "encoder, decoder, data_shape",
    [
        (["C1d_2_8_3_1_1", "Down_8_4"], ["UpS_2", "C1d_2_2_3_1_1"], (2, 16)),
        (["C3d_1_4_3_1_1", "VAEA_4"], ["C3d_2_1_3_1_1"], (1, 4, 4, 4)),
    ],
    ids=["1d", "3d"],
)
def test_vae_on_1d_and_3d_data(encoder, decoder, data_shape):
    """In 1D and 3D as in 2D: z = mean + std * noise of the encoder's halves, the decoder's output
    of that z, the closed-form KL per sample, and a gradient reaching the first layer."""
    torch.manual_seed(0)
    model = build_vae(encoder, decoder, data_shape)
    x = torch.randn(2, *data_shape)
    noise = torch.randn(2, *model.latent_shape)
    out = model(x, noise=noise)
    mean, logvar = model.encoder(x).chunk(2, dim=1)
    assert torch.allclose(out.z, mean + torch.exp(0.5 * logvar) * noise, atol=1e-6)
    assert torch.allclose(out.recon, model.decoder(out.z), atol=1e-6)
    expected = kl_divergence(Normal(mean, torch.exp(0.5 * logvar)), Normal(0.0, 1.0)).flatten(1).sum(1)
    assert torch.allclose(out.posterior.kl(), expected, atol=1e-5)
    (out.recon.square().mean() + out.posterior.kl().mean()).backward()
    assert model.encoder[0].weight.grad.abs().sum() > 0
