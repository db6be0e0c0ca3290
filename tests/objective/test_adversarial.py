"""objective/adversarial.py: the discriminator losses, R1, the adaptive weight, and adversarial
training that resumes exactly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from flexvae.checkpoint import list_checkpoints
from flexvae.config import load_config
from flexvae.errors import StructureError
from flexvae.objective.adversarial import Adversary, plan_discriminator
from flexvae.train.distributed import DistInfo
from helpers.runs import TINY
from helpers.tiny_training import train

pytestmark = pytest.mark.usefixtures("in_repo")  # configs name their structures from the repository root

SMALL_DISC = "structures/small_discriminator.json"


def images(n=3, size=32, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ----------------------------------------------------------- discriminator
def adversary(*overrides):
    cfg = load_config(TINY, [f"adversarial.discriminator={SMALL_DISC}", *overrides])
    return Adversary(cfg, TINY, (3, 16, 16), "cpu", DistInfo())


GAN = ("loss.objective=elbo", "loss.likelihood=laplace", "loss.kl_weight=1e-3", "loss.perceptual_weight=1",
       "loss.perceptual_weights=random", f"adversarial.discriminator={SMALL_DISC}", "adversarial.start=2")


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
    for name in ("nll", "kl", "bpd", "perceptual", "g_adv", "adaptive_weight", "d_loss", "logits_real", "logits_fake"):
        assert name in columns, name
    values = dict(zip(columns, rows[-1].split(",")))
    assert float(values["adaptive_weight"]) > 0
    early = dict(zip(columns, rows[0].split(",")))
    assert early["d_loss"] == "nan"  # before adversarial.start
