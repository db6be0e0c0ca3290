"""LPIPS, the discriminator and ELBO models end to end: properties, gradients, exact resume."""

from __future__ import annotations

import urllib.error
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from flexvae.checkpoint import list_checkpoints, load_run
from flexvae.config import load_config
from flexvae.errors import ConfigError, StructureError
from flexvae.perceptual import backbone_state, load_perceptual
from flexvae.objective.adversarial import Adversary, plan_discriminator
from flexvae.train.distributed import DistInfo
from flexvae.train.trainer import Trainer

lpips = pytest.importorskip("lpips")

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny_test.toml"
SMALL_DISC = "structures/small_discriminator.json"


@pytest.fixture(autouse=True)
def in_repo(monkeypatch):
    monkeypatch.chdir(REPO)


@pytest.fixture(scope="module")
def distance():
    torch.manual_seed(0)
    return load_perceptual("alex", "random")  # AlexNet builds faster than VGG16


def images(n=3, size=32, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# -------------------------------------------------------------------- LPIPS
def test_lpips_is_zero_on_equal_images_symmetric_and_batch_independent(distance):
    a, b = images(seed=0), images(seed=1)
    assert torch.all(distance(a, a) == 0)
    torch.testing.assert_close(distance(a, b), distance(b, a))
    assert torch.all(distance(a, b) > 0)
    one_by_one = torch.cat([distance(a[i:i + 1], b[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(distance(a, b), one_by_one)
    distance.train()  # stays a fixed metric
    torch.testing.assert_close(distance(a, b), one_by_one)


def test_lpips_gradient_reaches_a_decoder(distance):
    decoder = torch.nn.Conv2d(3, 3, 3, padding=1)
    target = images()
    distance(decoder(images(seed=2)), target).mean().backward()
    assert decoder.weight.grad is not None and decoder.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in distance.parameters())  # the metric is frozen


@pytest.mark.slow
def test_lpips_backbone_from_a_local_file(tmp_path):
    import torchvision

    features = torchvision.models.alexnet().features
    path = tmp_path / "alex_features.pth"
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, path)
    loaded = load_perceptual("alex", str(path))
    first = loaded.lpips.net.slice1[0]
    torch.testing.assert_close(first.weight, features[0].weight)
    torch.save({"features.0.weight": torch.zeros(1)}, tmp_path / "wrong.pth")
    with pytest.raises(ConfigError, match="not alexnet weights: features.0.bias is missing"):
        load_perceptual("alex", str(tmp_path / "wrong.pth"))
    with pytest.raises(ConfigError, match="loss.perceptual_weights: file not found"):
        load_perceptual("alex", str(tmp_path / "none.pth"))


def test_lpips_offline_without_weights_says_which_file_to_put_where(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(ConfigError) as info:
        backbone_state("vgg")
    message = str(info.value)
    assert "vgg16-397923af.pth" in message and str(tmp_path / "hub" / "checkpoints") in message
    assert "loss.perceptual_weights" in message and "\n" not in message


# ----------------------------------------------------------- discriminator
def adversary(*overrides):
    cfg = load_config(TINY, [f"adversarial.discriminator={SMALL_DISC}", *overrides])
    return Adversary(cfg, TINY, (3, 16, 16), "cpu", DistInfo())


def test_hinge_discriminator_loss_and_r1_match_their_formulas():
    torch.manual_seed(0)
    adv = adversary("adversarial.r1_weight=2")
    real, fake = images(4, 16), images(4, 16, seed=3)
    before = {k: v.clone() for k, v in adv.model.state_dict().items()}
    adv.model.load_state_dict(before)
    adv.model.train()
    logits_real, logits_fake = adv.model(real), adv.model(fake)
    adv.model.load_state_dict(before)  # undo the BatchNorm statistics this forward moved
    expected = 0.5 * (F.relu(1 - logits_real).mean() + F.relu(1 + logits_fake).mean())
    terms = adv.discriminator_step([(real, fake)], lambda: torch.autocast("cpu", enabled=False), 0)
    assert terms["d_loss"] == pytest.approx(float(expected.detach()), rel=1e-5)
    assert terms["logits_real"] == pytest.approx(float(logits_real.mean().detach()), rel=1e-5)
    assert terms["r1"] > 0
    assert any(not torch.equal(before[k], v) for k, v in adv.model.state_dict().items() if "weight" in k)


def test_adaptive_weight_is_the_ratio_of_gradient_norms_at_the_last_layer():
    adv = adversary()
    layer = torch.nn.Conv2d(3, 3, 3, padding=1)
    fake = layer(images(2, 16))
    rest = fake.pow(2).mean()
    g_adv = adv.generator_term(fake)
    weight = adv.adaptive_weight(rest, g_adv, layer.weight)
    rest_grad = torch.autograd.grad(rest, layer.weight, retain_graph=True)[0]
    adv_grad = torch.autograd.grad(g_adv, layer.weight, retain_graph=True)[0]
    assert float(weight) == pytest.approx(float(rest_grad.norm() / (adv_grad.norm() + 1e-4)), rel=1e-5)
    assert not weight.requires_grad


def test_a_discriminator_that_does_not_fit_the_data_is_reported_with_its_position():
    with pytest.raises(StructureError, match=r"adversarial.discriminator .*position 1.*C2d_4_8_3"):
        plan_discriminator(["C2d_4_8_3_1_1"], (3, 16, 16))


# ---------------------------------------------------------------- training
def config(images_dir, out, *overrides):
    return load_config(TINY, [f"train.out_dir={out}", f"data.path={images_dir}", "data.num_workers=0",
                              "train.device=cpu", "train.schedule=constant", "train.save_every=3", *overrides])


GAN = ("loss.objective=elbo", "loss.likelihood=laplace", "loss.kld_weight=1e-3", "loss.perceptual_weight=1",
       "loss.perceptual_weights=random", f"adversarial.discriminator={SMALL_DISC}", "adversarial.start=2")


def train(images_dir, out, *overrides):
    trainer = Trainer(config(images_dir, out, *overrides), TINY, quiet=True)
    trainer.train()
    return trainer


@pytest.fixture(scope="module")
def photos():
    return REPO / "assets" / "photos"


@pytest.mark.slow
def test_perceptual_and_adversarial_training_resumes_exactly(photos, tmp_path):
    train(photos, tmp_path / "A", "train.max_steps=6", *GAN)
    train(photos, tmp_path / "B", "train.max_steps=3", *GAN)
    train(photos, tmp_path / "B", "train.max_steps=6", *GAN)
    wa, wb = (load_file(str(list_checkpoints(tmp_path / r)[-1])) for r in "AB")
    keys = [k for k in wa if k.startswith(("model.", "train.adversarial."))]
    assert any(k.startswith("train.adversarial.model.") for k in keys)
    assert any(k.startswith("model.likelihood.") for k in keys)  # the learned scale
    for key in keys:
        assert torch.equal(wa[key], wb[key]), key
    header, *rows = (tmp_path / "A" / "metrics.csv").read_text().splitlines()
    columns = header.split(",")
    for name in ("nll", "kld", "bpd", "perceptual", "g_adv", "adaptive_weight", "d_loss", "logits_real", "logits_fake"):
        assert name in columns, name
    values = dict(zip(columns, rows[-1].split(",")))
    assert float(values["adaptive_weight"]) > 0
    early = dict(zip(columns, rows[0].split(",")))
    assert early["d_loss"] == "nan"  # before adversarial.start


@pytest.mark.parametrize("likelihood", ["gaussian", "bernoulli"])
def test_elbo_models_rebuild_from_the_checkpoint_with_their_likelihood(photos, tmp_path, likelihood):
    train(photos, tmp_path / "run", "train.max_steps=2", "loss.objective=elbo", f"loss.likelihood={likelihood}",
          "loss.scale=channel")
    loaded = load_run(tmp_path / "run", prefer_ema=False)
    assert loaded.vae.likelihood.name == likelihood
    state = load_file(str(list_checkpoints(tmp_path / "run")[-1]))
    if likelihood == "gaussian":
        torch.testing.assert_close(loaded.vae.likelihood.log_scale, state["model.likelihood.log_scale"])
        assert loaded.vae.likelihood.log_scale.shape == (3,)
    assert loaded.vae.output == ("logits" if likelihood == "bernoulli" else "value")


def test_a_mixture_likelihood_needs_a_decoder_with_its_channels(photos, tmp_path):
    with pytest.raises(StructureError, match=r"needs \(30, 16, 16\): 30 channels"):
        Trainer(config(photos, tmp_path / "run", "loss.objective=elbo", "loss.likelihood=logistic_mixture",
                       "loss.mixture_components=3"), TINY, quiet=True)
    decoder = ('model.decoder=["C2d_2_8_3_1_1", "VAERB_8_8", "UpS_2", "C2d_8_30_3_1_1"]',)
    trainer = train(photos, tmp_path / "run", "train.max_steps=2", "loss.objective=elbo",
                    "loss.likelihood=logistic_mixture", "loss.mixture_components=3", *decoder)
    image = trainer.model.sample_prior(2)
    assert image.shape == (2, 3, 16, 16) and image.min() >= -1 and image.max() <= 1


# ------------------------------------------------------------------ presets
SHIPPED = sorted(p for p in (REPO / "configs").glob("*.toml") if p.name != "matrix_example.toml")


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_every_shipped_config_plans_with_its_discriminator(path):
    from flexvae.assemble import plan_from_config

    cfg = load_config(path)
    # labelled presets read their classes from the digits' folders, which tests do not make
    classes = tuple(str(d) for d in range(10)) if cfg.data.labels != "none" else None
    plan = plan_from_config(cfg, path, classes)
    assert plan.data_shape == (cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
    if cfg.adversarial.discriminator:
        assert plan_discriminator(cfg.adversarial.discriminator, plan.data_shape, path).params > 0


def test_the_latent_configs_differ_only_in_the_latent():
    kinds = {}
    for path in REPO.glob("configs/latent_*.toml"):
        cfg = load_config(path)
        kinds[cfg.model.latent] = cfg
    assert set(kinds) == {"deterministic", "gaussian", "vq", "fsq", "categorical"}
    for cfg in kinds.values():
        assert cfg.loss.objective == "elbo" and cfg.data == kinds["gaussian"].data


def test_an_sd_import_under_the_recipe_config_rebuilds_with_a_fresh_laplace_scale(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    from flexvae.convert_sd import import_weights

    torch.manual_seed(0)
    diffusers.AutoencoderKL(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, latent_channels=2,
                            sample_size=16, down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2).save_pretrained(tmp_path / "vae")
    base = load_config(REPO / "configs" / "sd_vae.toml")
    path = import_weights(tmp_path / "vae", tmp_path / "run", base).path
    loaded = load_run(path)
    assert loaded.vae.likelihood.name == "laplace"
    assert float(loaded.vae.likelihood.log_scale.detach()) == pytest.approx(0.0)  # b = scale_value = 1
    assert loaded.cfg.adversarial.discriminator == "structures/patchgan_discriminator.json"


@pytest.mark.slow
def test_the_photos_gan_recipe_trains(photos, tmp_path):
    """configs/photos_gan.toml as shipped (LPIPS VGG16, PatchGAN) for a few steps, with an untrained
    LPIPS backbone standing in for the ImageNet weights this offline machine lacks."""
    path = REPO / "configs" / "photos_gan.toml"
    cfg = load_config(path, [f"train.out_dir={tmp_path / 'run'}", "train.max_steps=3", "adversarial.start=1",
                             "loss.perceptual_weights=random", "data.num_workers=0", "train.device=cpu",
                             "train.batch_size=4"])
    trainer = Trainer(cfg, path, quiet=True)
    trainer.train()
    header, *rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    values = dict(zip(header.split(","), rows[-1].split(",")))
    assert trainer.objective.term("LPIPS").distance is not None and float(values["perceptual"]) > 0
    assert float(values["d_loss"]) > 0 and float(values["adaptive_weight"]) > 0
