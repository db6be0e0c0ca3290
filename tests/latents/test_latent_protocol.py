"""The latent protocol over every registered latent, a latent added by one class and one decorator,
the [latent] keys checked against the chosen type, and old checkpoints' latent settings loading."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from torch.distributions import Categorical, Normal, kl_divergence

from flexvae.build import plan_vae
from flexvae.config import Config, apply_overrides, config_from_dict, config_to_dict
from flexvae.errors import ConfigError
from flexvae.fields import POSITIVE, setting
from flexvae.latents import (
    LATENTS,
    CategoricalPosterior,
    DiagonalGaussian,
    DiscreteLatent,
    Latent,
)
from flexvae.latents.base import PointPosterior
from flexvae.latents.registry import register_latent

SRC = Path(__file__).resolve().parents[2] / "src" / "flexvae"
DATA = (3, 16, 16)


def encoder_for(latent_type_name: str, channels: int) -> list[str]:
    return ["C2d_3_8_3_1_1", "SiLU", "Down_?_8", f"C2d_?_{channels}_3_1_1"]


def decoder_for() -> list[str]:
    return ["C2d_?_8_3_1_1", "SiLU", "UpS_2", "C2d_?_3_3_1_1"]


def encoder_channels(latent: Latent) -> int:
    """The channel count an encoder must output for this latent, found by asking latent_shape."""
    for channels in range(1, 129):
        try:
            latent.latent_shape((channels, 8, 8))
            return channels
        except ValueError:
            continue
    raise AssertionError(f"no encoder width up to 128 feeds {latent.kind}")


@pytest.fixture(params=[t.name for t in LATENTS], ids=str)
def model(request):
    latent_type = LATENTS.get(request.param)
    params = latent_type.params()
    if "classes" in latent_type.keys:  # a class part: its count comes from the labels (assemble.make_latent)
        params = dataclasses.replace(params, classes=3)
    latent = latent_type.build(params)
    torch.manual_seed(0)
    plan = plan_vae(encoder_for(request.param, encoder_channels(latent)), decoder_for(), DATA, latent)
    return plan.build()


# ------------------------------------------------------------------ a new latent
@dataclasses.dataclass(frozen=True)
class SignParams:
    scale: float = setting(1.0, "sign: multiplier of the binary code", POSITIVE)


class SignPosterior(PointPosterior):
    pass


@pytest.fixture
def sign_latent():
    """A toy latent added the documented way: one class, one decorator, its own parameters."""

    @register_latent("sign", SignParams, doc="the sign of each channel, times scale (a toy)")
    class SignLatent(Latent):
        def __init__(self, scale: float = 1.0):
            super().__init__()
            self.scale = scale

        def latent_shape(self, encoder_shape):
            return tuple(encoder_shape)

        def forward(self, h, step=None):
            return SignPosterior(self.scale * (torch.sign(h) - h).detach() + self.scale * h)

        def sample_prior(self, n, latent_shape, generator=None, device=None):
            coin = torch.randint(0, 2, (n, *latent_shape), generator=generator, device=device)
            return self.scale * (2.0 * coin - 1)

    yield SignLatent
    LATENTS.unregister("sign")


# ------------------------------------------------------------------ conformance
def test_every_latent_follows_the_protocol(model):
    latent = model.latent
    assert isinstance(latent, Latent) and latent.kind in LATENTS
    x = torch.rand(4, *DATA) * 2 - 1
    model.train()
    out = model(x, step=3)
    posterior = out.posterior
    kl = posterior.kl()
    assert kl.shape == (4,)
    elements = posterior.kl_elements()
    assert elements.shape == (4, *model.latent_shape)
    assert torch.allclose(elements.flatten(1).sum(1), kl, atol=1e-5)
    assert posterior.variance().shape == (4, *model.latent_shape)
    for z in (posterior.sample(), posterior.mode(), posterior.sample(generator=torch.Generator().manual_seed(1))):
        assert z.shape == (4, *model.latent_shape)
    assert isinstance(posterior.aux_losses(), dict)
    assert all(isinstance(v, float) for v in latent.metrics().values())
    prior = latent.sample_prior(5, model.latent_shape, generator=torch.Generator().manual_seed(0))
    assert prior.shape == (5, *model.latent_shape)
    assert model.sample_prior(2).shape == (2, *DATA)


def test_declared_noise_drives_sampling(model):
    """The noise a latent declares is what sample(noise=...) takes: equal noise, equal sample;
    other noise, another sample (for latents that sample at all)."""
    latent = model.latent
    x = torch.rand(3, *DATA) * 2 - 1
    posterior = model.encode(x)
    shape = latent.noise_shape(model.latent_shape)
    if shape is None:
        assert torch.equal(posterior.sample(), posterior.mode())
        return
    from flexvae.latents.base import draw_noise

    noise = draw_noise(latent.noise_kind, (3, *shape), generator=torch.Generator().manual_seed(0))
    assert torch.equal(posterior.sample(noise=noise), posterior.sample(noise=noise.clone()))
    other = draw_noise(latent.noise_kind, (3, *shape), generator=torch.Generator().manual_seed(1))
    assert not torch.equal(posterior.sample(noise=noise), posterior.sample(noise=other))


def test_discrete_latents_round_trip_codes(model):
    if not isinstance(model.latent, DiscreteLatent):
        pytest.skip(f"{model.latent.kind} has no integer codes")
    model.eval()
    x = torch.rand(3, *DATA) * 2 - 1
    posterior = model.encode(x)
    codes = model.latent.codes(posterior)
    assert tuple(codes.shape[1:]) == model.latent.code_shape(model.latent_shape)
    assert codes.dtype == torch.int64
    z = model.latent.decode_codes(codes)
    assert torch.allclose(z, posterior.mode(), atol=1e-6)
    again = model.latent.codes(model.latent(z))
    if model.latent.requantizes_exactly:  # residual VQ: a decoded sum may re-quantize to other level codes
        assert torch.equal(again, codes)
    beyond = getattr(getattr(model.latent, "quantizer", None), "num_codes", 10**6)  # rvq: 512^4 codes
    with pytest.raises(ValueError, match="codes must lie in"):
        model.latent.decode_codes(codes + beyond)


def test_gaussian_kl_matches_torch_distributions():
    mean, logvar = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    ours = DiagonalGaussian(mean, logvar).kl()
    reference = kl_divergence(Normal(mean, (0.5 * logvar).exp()), Normal(0.0, 1.0)).flatten(1).sum(1)
    assert torch.allclose(ours, reference, atol=1e-5)


def test_categorical_kl_matches_torch_distributions():
    logits = torch.randn(2, 4, 16, 3, 3)  # (B, G, K, H, W)
    ours = CategoricalPosterior(logits, tau=1.0).kl()
    uniform = Categorical(logits=torch.zeros(16))
    reference = kl_divergence(Categorical(logits=logits.movedim(2, -1)), uniform).flatten(1).sum(1)
    assert torch.allclose(ours, reference, atol=1e-5)


def test_a_registered_latent_is_usable_from_the_config(sign_latent, tmp_path):
    cfg = apply_overrides(Config(), ["model.latent=sign", "latent.scale=2.5"])
    assert cfg.latent == SignParams(2.5)
    from flexvae.assemble import make_latent

    latent = make_latent(cfg)
    assert isinstance(latent, sign_latent) and latent.kind == "sign" and latent.scale == 2.5
    vae = plan_vae(encoder_for("sign", 4), decoder_for(), DATA, latent).build()
    assert vae.sample_prior(2).shape == (2, *DATA)
    with pytest.raises(ConfigError, match=r"latent.scale' must be > 0"):
        apply_overrides(Config(), ["model.latent=sign", "latent.scale=-1"])


# ------------------------------------------------------------------ [latent] keys
def test_latent_keys_are_checked_against_the_chosen_type():
    with pytest.raises(ConfigError) as info:
        config_from_dict({"model": {"latent": "gaussian"}, "latent": {"codebook_size": 64}}, "my.toml")
    message = str(info.value)
    assert message.startswith("my.toml: 'latent.codebook_size' is a setting of model.latent = 'vq'")
    assert "model.latent = 'gaussian'" in message
    with pytest.raises(ConfigError, match="Did you mean 'latent.codebook_size'"):
        config_from_dict({"model": {"latent": "vq"}, "latent": {"codebok_size": 64}}, "my.toml")
    with pytest.raises(ConfigError, match="is not a latent type. Did you mean 'gaussian'"):
        config_from_dict({"model": {"latent": "gausian"}}, "my.toml")
    cfg = config_from_dict({"model": {"latent": "vq"}, "latent": {"codebook_size": 64}}, "my.toml")
    assert cfg.latent.codebook_size == 64 and cfg.latent.code_dim == 4


def test_latent_overrides_do_not_depend_on_their_order():
    one = apply_overrides(Config(), ["latent.codebook_size=32", "model.latent=vq"])
    two = apply_overrides(Config(), ["model.latent=vq", "latent.codebook_size=32"])
    assert one == two and one.latent.codebook_size == 32
    vq = apply_overrides(Config(), ["model.latent=vq", "latent.codebook_size=32"])
    fsq = apply_overrides(vq, ["model.latent=fsq"])  # the vq settings do not carry over
    assert dataclasses.asdict(fsq.latent) == {"fsq_levels": [8, 5, 5, 5]}
    with pytest.raises(ConfigError, match="is a setting of model.latent = 'categorical'"):
        apply_overrides(vq, ["latent.groups=2"])


def test_a_stored_config_of_an_older_version_still_loads(tmp_path):
    """Older checkpoints stored every latent type's [latent] keys; they load and keep the
    chosen type's values."""
    old_latent = {"codebook_size": 32, "code_dim": 4, "commitment": 0.25, "ema_decay": 0.99,
                  "dead_threshold": 0.1, "kmeans_init": False, "fsq_levels": [8, 5, 5, 5], "categories": 16,
                  "groups": 4, "tau_start": 1.0, "tau_min": 0.5, "tau_rate": 0.001, "hard": True}
    raw = config_to_dict(apply_overrides(Config(), ["model.latent=vq"]))
    raw["latent"] = old_latent
    cfg = config_from_dict(raw, "old checkpoint", stored=True)
    assert cfg.latent.codebook_size == 32
    with pytest.raises(ConfigError, match="is a setting of model.latent"):
        config_from_dict(raw, "a user's file")


def test_an_old_checkpoint_loads(tmp_path):
    """A checkpoint whose metadata has the old layout (every latent key stored) rebuilds."""
    from flexvae.assemble import model_from_config
    from flexvae.checkpoint import checkpoint_metadata, load_model, save_checkpoint

    cfg = apply_overrides(Config(), ["data.image_size=16", "model.encoder=structures/tiny_encoder.json",
                                     "model.decoder=structures/tiny_decoder.json"])
    repo = SRC.parents[1]
    cfg = apply_overrides(cfg, [f"model.encoder={repo / 'structures/tiny_encoder.json'}",
                                f"model.decoder={repo / 'structures/tiny_decoder.json'}"])
    model, plan = model_from_config(cfg)
    meta = checkpoint_metadata(cfg, plan, 7, 1.0)
    meta["config"]["latent"] = {"codebook_size": 512, "categories": 16, "fsq_levels": [8, 5, 5, 5]}
    path = save_checkpoint(tmp_path / "old.safetensors", model.state_dict(), json.loads(json.dumps(meta)))
    loaded = load_model(path)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
