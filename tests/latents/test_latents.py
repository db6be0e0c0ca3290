"""Latent spaces: VQ, FSQ, LFQ/BSQ, residual VQ and Gumbel-softmax categorical latents, their
KL per group, codebook statistics, and quantizer tokens."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math

import numpy as np
import pytest
import torch
import torch.distributions as D
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from flexvae.assemble import make_latent
from flexvae.build import build_vae
from flexvae.checkpoint import LoadedModel
from flexvae.config import Config, apply_overrides
from flexvae.data import save_image
from flexvae.errors import ConfigError, StructureError
from flexvae.inference import decode_folder, encode_folder
from flexvae.latents import (
    LATENTS,
    CategoricalLatent,
    DeterministicLatent,
    FSQLatent,
    GaussianLatent,
    VectorQuantizer,
    VQLatent,
)
from flexvae.latents.binary import BinaryQuantizer
from flexvae.latents.categorical import temperature
from flexvae.latents.fsq import FiniteScalarQuantizer
from flexvae.objective import vae_loss
from flexvae.train.step import make_optimizer, train_step
from helpers.losses import output

DATA = (3, 16, 16)


def encoder(channels: int, extra=()) -> list[str]:
    return ["C2d_3_8_3_1_1", "Down_?_8", "SiLU", *extra, f"C2d_?_{channels}_3_1_1"]


def decoder(channels: int, extra=()) -> list[str]:
    return [f"C2d_{channels}_8_3_1_1", *extra, "SiLU", "UpS_2", "C2d_?_3_3_1_1"]


# latent, encoder output channels, decoder input channels
CASES = {
    "gaussian": (lambda: GaussianLatent(), 8, 4),
    "deterministic": (lambda: DeterministicLatent(), 4, 4),
    "vq": (lambda: VQLatent(codebook_size=32, code_dim=4, dead_threshold=0.1), 4, 4),
    "vq-gradient": (lambda: VQLatent(codebook_size=32, code_dim=4, ema_decay=0.0), 4, 4),
    "fsq": (lambda: FSQLatent((5, 5, 4)), 3, 3),
    "categorical": (lambda: CategoricalLatent(categories=8, groups=2, tau_rate=0.01), 16, 16),
    "categorical-soft": (lambda: CategoricalLatent(categories=8, groups=2, hard=False), 16, 16),
}


def model_for(case: str, seed: int = 0):
    make, enc, dec = CASES[case]
    torch.manual_seed(seed)
    return build_vae(encoder(enc), decoder(dec), DATA, make())


def smooth_images(n=4, seed=1):
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand((n, 3, 4, 4), generator=generator)
    return F.interpolate(coarse, size=DATA[1:], mode="bilinear", align_corners=False) * 2 - 1


def train_cfg(lr=3e-3):
    cfg = Config()
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, lr=lr))


# ------------------------------------------------------------------ gradients
@pytest.mark.parametrize("case", ["vq", "vq-gradient", "fsq", "categorical", "categorical-soft"])
def test_straight_through_gradients_reach_the_encoder(case):
    model, x = model_for(case), smooth_images()
    model.train()
    out = model(x, step=0)
    F.mse_loss(out.recon, x).backward()  # reconstruction only: no auxiliary loss helps
    first = model.encoder[0].weight.grad
    assert first is not None and first.abs().sum() > 0


def test_vq_output_is_the_codebook_vector_with_the_encoder_gradient():
    vq = VectorQuantizer(8, 2, decay=0.99)
    z = torch.randn(3, 2, 4, 4, requires_grad=True)
    z_q, codes, losses = vq.eval()(z)
    assert torch.allclose(z_q, vq.lookup(codes), atol=1e-6)
    z_q.sum().backward()
    assert torch.equal(z.grad, torch.ones_like(z))  # identity gradient (straight-through)
    assert set(losses) == {"vq_commit"}


# ------------------------------------------------------------------ VQ codebook
def test_ema_codebook_moves_toward_the_vectors_assigned_to_it():
    torch.manual_seed(0)
    vq = VectorQuantizer(4, 2, decay=0.8, dead_threshold=0.0)
    with torch.no_grad():
        vq.embedding.copy_(torch.tensor([[0.0, 0.0], [10.0, 10.0], [-10.0, 10.0], [10.0, -10.0]]))
        vq.cluster_size[0] = 16.0  # code 0 has a history: 16 vectors per batch at the origin
    target = torch.tensor([2.0, 1.0])
    vectors = target + 0.05 * torch.randn(64, 2)
    z = vectors.view(4, 16, 2).movedim(-1, 1)  # (4, 2, 16): every position near the target
    assigned_mean = vectors.mean(dim=0)
    others = vq.embedding[1:].clone()
    distances = [float((vq.embedding[0] - assigned_mean).norm())]
    vq.train()
    for _ in range(20):
        _, codes, _ = vq(z)
        assert (codes == 0).all()
        distances.append(float((vq.embedding[0] - assigned_mean).norm()))
    assert all(b < a for a, b in zip(distances, distances[1:]))
    assert distances[-1] < 0.01 * distances[0]
    # The code is the EMA of the assigned vectors' sum over the EMA of their count.
    old = 0.8 ** 20
    expected = (1 - old) * vectors.sum(0) / (old * 16 + (1 - old) * 64)
    assert torch.allclose(vq.embedding[0], expected, rtol=1e-4)
    assert torch.equal(vq.embedding[1:], others)  # codes that never received a vector stay put


def test_eval_mode_leaves_the_codebook_alone():
    vq = VectorQuantizer(4, 2, decay=0.5, dead_threshold=1.0)
    before = {k: v.clone() for k, v in vq.state_dict().items()}
    vq.eval()(torch.randn(2, 2, 8))
    assert all(torch.equal(before[k], v) for k, v in vq.state_dict().items())


@pytest.mark.parametrize("decay", [0.99, 0.0])
def test_dead_codes_are_restarted_from_encoder_outputs(decay):
    torch.manual_seed(0)
    z = 0.5 * torch.randn(4, 2, 32)  # 128 vectors near the origin
    far = torch.full((8, 2), 100.0)
    far[:2] = torch.randn(2, 2) * 0.1

    def run(dead):
        vq = VectorQuantizer(8, 2, decay=decay, dead_threshold=dead)
        with torch.no_grad():
            vq.embedding.copy_(far)
        vq.train()
        for _ in range(300):
            vq(z)
        return vq

    plain, restarted = run(0.0), run(0.5)
    assert (plain.embedding.detach().norm(dim=1) > 50).sum() == 6  # six codes never move without restarts
    assert plain.usage() == pytest.approx(2 / 8)
    assert restarted.embedding.detach().norm(dim=1).max() < 5  # every code now lives among the data
    assert restarted.usage() == 1.0
    _, codes, _ = restarted(z)
    assert len(codes.unique()) >= 6


def test_kmeans_initialisation_places_codes_on_the_data():
    torch.manual_seed(0)
    centers = torch.tensor([[5.0, 5.0], [-5.0, 5.0], [5.0, -5.0], [-5.0, -5.0]])
    z = (centers.repeat(32, 1) + 0.1 * torch.randn(128, 2)).t().reshape(1, 2, 128)
    vq = VectorQuantizer(4, 2, kmeans_init=True, dead_threshold=0.0)
    assert not bool(vq.initialized)
    vq.train()(z)
    assert bool(vq.initialized)
    nearest = torch.cdist(centers, vq.embedding).min(dim=1).values
    assert nearest.max() < 0.5


def test_vq_metrics_report_usage_and_perplexity():
    vq = VectorQuantizer(4, 2, decay=0.9, dead_threshold=0.0)
    with torch.no_grad():
        vq.embedding.copy_(torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [9.0, 9.0]]))
    z = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 0.1]]).t().reshape(1, 2, 4)
    vq.train()(z)
    metrics = vq.metrics()
    assert metrics["vq_usage"] == pytest.approx(3 / 4)
    probs = torch.tensor([0.5, 0.25, 0.25])
    assert metrics["vq_perplexity"] == pytest.approx(float(torch.exp(-(probs * probs.log()).sum())), rel=1e-5)


# ------------------------------------------------------------------ FSQ
@pytest.mark.parametrize("levels", [(8, 5, 5, 5), (2, 3), (7,), (4, 4, 6)])
def test_fsq_index_code_round_trip_is_exact(levels):
    fsq = FiniteScalarQuantizer(levels)
    every = torch.arange(math.prod(levels)).view(1, -1)
    codes = fsq.lookup(every)
    assert codes.shape == (1, len(levels), math.prod(levels))
    assert torch.equal(fsq.codes_to_indices(codes), every)
    assert len({tuple(c) for c in codes[0].t().tolist()}) == math.prod(levels)  # all distinct
    z = 3 * torch.randn(4, len(levels), 5, 5)
    z_q, indices, losses = fsq(z)
    assert losses == {}
    assert torch.equal(fsq.lookup(indices), z_q)
    assert z_q.min() >= -1 and z_q.max() <= 1
    for channel, level in enumerate(levels):
        assert len(fsq(20 * torch.randn(1, len(levels), 4096))[0][:, channel].unique()) == level


def test_fsq_rejects_bad_levels():
    with pytest.raises(ValueError, match="at least 2"):
        FiniteScalarQuantizer((8, 1))


# ------------------------------------------------------------------ categorical
def test_temperature_schedule_follows_its_definition():
    latent = CategoricalLatent(categories=4, groups=1, tau_start=2.0, tau_min=0.5, tau_rate=0.01)
    for step in (0, 1, 50, 100, 138):
        assert latent.temperature(step) == pytest.approx(max(0.5, 2.0 * math.exp(-0.01 * step)))
    assert latent.temperature(0) == 2.0
    assert latent.temperature(10_000) == 0.5
    assert latent.temperature(None) == 0.5
    assert temperature(100, 1.0, 0.1, 0.0) == 1.0  # rate 0: constant
    # The trainer's step reaches the posterior through VAE.forward.
    model = build_vae(encoder(4), decoder(4), DATA, latent)
    assert model(smooth_images(), step=50).posterior.tau == pytest.approx(2.0 * math.exp(-0.5))


def test_categorical_samples_and_kl_to_uniform():
    latent = CategoricalLatent(categories=4, groups=2)
    logits = torch.randn(3, 8, 2, 2)
    posterior = latent(logits, step=0)
    hard = posterior.sample(torch.Generator().manual_seed(0))
    assert hard.shape == (3, 8, 2, 2)
    assert torch.equal(hard.view(3, 2, 4, 2, 2).sum(2), torch.ones(3, 2, 2, 2))
    assert set(hard.unique().tolist()) <= {0.0, 1.0}
    q = F.softmax(logits.view(3, 2, 4, 2, 2), dim=2)
    expected = (q * (q * 4).log()).sum(dim=(1, 2, 3, 4))
    assert torch.allclose(posterior.kl(), expected, atol=1e-5)
    assert torch.allclose(posterior.kl_elements().sum(dim=(1, 2, 3)), expected, atol=1e-5)
    assert latent(torch.zeros(1, 8, 2, 2)).kl().abs().max() < 1e-6  # uniform q: no KL
    soft = CategoricalLatent(categories=4, groups=2, hard=False)(logits).sample()
    assert torch.allclose(soft.view(3, 2, 4, 2, 2).sum(2), torch.ones(3, 2, 2, 2), atol=1e-5)
    assert torch.equal(latent.decode_codes(posterior.codes), posterior.mode())


# ------------------------------------------------------------------ training
@pytest.mark.parametrize("case", list(CASES))
def test_each_latent_trains_and_its_loss_decreases(case):
    model, x = model_for(case), smooth_images()
    cfg = train_cfg()
    optimizer = make_optimizer(model, cfg.train)
    model.train()
    losses = [train_step(model, [x], optimizer, cfg, step).loss for step in range(40)]
    assert all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses


def test_quantizer_metrics_are_logged_but_never_added_to_the_loss():
    model, x = model_for("vq"), smooth_images()
    cfg = train_cfg()
    result = train_step(model, [x], make_optimizer(model, cfg.train), cfg, 0)
    assert set(result.terms) == {"recon", "kl", "vq_commit"}
    assert set(model.metrics()) == {"vq_usage", "vq_perplexity"}
    assert 0 < model.metrics()["vq_usage"] <= 1


# ------------------------------------------------------------------ build-time checks
@pytest.mark.parametrize("latent, channels, words", [
    (VQLatent(codebook_size=16, code_dim=8), 7, "a vq latent with code dimension 8 needs 8; "
                                                "make the last layer output 8 channels"),
    (FSQLatent((8, 5, 5, 5)), 3, "needs one channel per level: 4; make the last layer output 4 channels"),
    (CategoricalLatent(categories=16, groups=2), 30, "needs groups x categories = 32 channels of logits"),
])
def test_wrong_encoder_output_for_the_latent_type_is_a_clear_error(latent, channels, words):
    with pytest.raises(StructureError) as info:
        build_vae(encoder(channels), decoder(4), DATA, latent)
    message = str(info.value)
    assert f"the encoder outputs {channels} channels" in message
    assert words in message
    assert f"C2d_?_{channels}_3_1_1" in message  # reported at the encoder's last token
    assert info.value.position == 4


def test_latent_types_come_from_the_config():
    assert set(LATENTS.names()) == {"gaussian", "deterministic", "vq", "rvq", "fsq", "lfq", "bsq", "categorical",
                                    "mixed"}
    cfg = apply_overrides(Config(), ["model.latent=vq", "latent.codebook_size=64", "latent.code_dim=3",
                                     "latent.ema_decay=0.0", "latent.kmeans_init=true"])
    vq = make_latent(cfg).quantizer
    assert (vq.codebook_size, vq.dim, vq.ema, vq.kmeans_init) == (64, 3, False, True)
    fsq = make_latent(apply_overrides(cfg, ["model.latent=fsq"]))
    assert fsq.quantizer.levels == (8, 5, 5, 5)
    bad = apply_overrides(cfg, ["model.latent=categorical", "latent.tau_start=0.1", "latent.tau_min=0.5"])
    with pytest.raises(ConfigError, match="tau_min <= tau_start"):
        make_latent(bad)


# ------------------------------------------------------------------ quantizer tokens
def test_quantizer_tokens_inside_encoder_and_decoder_add_named_losses():
    torch.manual_seed(0)
    model = build_vae(encoder(3, ["VQ_16_?"]), decoder(3, ["VQ_8_?_decay=0", "FSQ_5_5_5_4_4_4_3_3"]), DATA,
                      FSQLatent((5, 5, 4)))
    x = smooth_images()
    model.train()
    out = model(x, step=0)
    assert set(out.aux) == {"enc_vq_commit_3", "dec_vq_commit_1", "dec_vq_codebook_1"}
    loss = vae_loss(x, out, Config().loss)
    for name in out.aux:
        assert torch.equal(loss.terms[name], out.aux[name].float())
    expected = loss.terms["recon"] + loss.kl_weight * loss.terms["kl"] + sum(out.aux.values())
    assert loss.total.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.total.backward()
    assert model.encoder[0].weight.grad.abs().sum() > 0
    assert {"enc_vq_usage_3", "enc_vq_perplexity_3", "dec_vq_usage_1"} <= set(model.metrics())


def test_fsq_token_needs_one_channel_per_level():
    with pytest.raises(StructureError, match="FSQ with 4 levels"):
        build_vae(encoder(3, ["FSQ_8_5_5_5"]), decoder(3), DATA, FSQLatent((5, 5, 4)))


# ------------------------------------------------------------------ prior and codes on disk
@pytest.mark.parametrize("case", ["vq", "fsq", "categorical"])
def test_prior_samples_draw_codes_uniformly(case):
    model = model_for(case)
    z = model.latent.sample_prior(200, model.latent_shape, generator=torch.Generator().manual_seed(0))
    assert z.shape == (200, *model.latent_shape)
    if case == "categorical":
        codes = z.view(200, 2, 8, 8, 8).argmax(2)
        assert torch.equal(model.latent.decode_codes(codes), z)
        counts = torch.bincount(codes.flatten(), minlength=8).float()
    else:
        quantizer = model.latent.quantizer
        if case == "vq":
            codes = quantizer.eval()(z)[1]
        else:
            codes = quantizer.codes_to_indices(z)
        assert torch.allclose(quantizer.lookup(codes), z, atol=1e-6)  # prior draws are code vectors
        counts = torch.bincount(codes.flatten(), minlength=quantizer.num_codes).float()
    assert (counts > 0).float().mean() > 0.95
    assert model.sample_prior(2).shape == (2, *DATA)


@pytest.mark.parametrize("case, fmt", [("vq", "safetensors"), ("fsq", "npy"), ("categorical", "safetensors")])
def test_encode_then_decode_uses_the_integer_codes(tmp_path, case, fmt):
    model = model_for(case).eval()
    images = tmp_path / "images"
    for index, image in enumerate(smooth_images(3, seed=5)):
        save_image(image, images / f"sub/{index}.png")
    ctx = LoadedModel(model, DATA)
    summary = encode_folder(ctx, images, tmp_path / "latents", fmt=fmt, progress=False)
    assert summary["encoded"] == 3

    if fmt == "safetensors":
        stored = load_file(str(tmp_path / "latents/sub/0.safetensors"))
        codes = stored["codes"]
        assert stored["latent"].shape == model.latent_shape
    else:
        codes = torch.from_numpy(np.load(tmp_path / "latents/sub/0.codes.npy"))
    assert codes.dtype == torch.int64
    assert tuple(codes.shape) == model.latent.code_shape(model.latent_shape)

    assert decode_folder(ctx, tmp_path / "latents", tmp_path / "decoded", progress=False) == \
        {"decoded": 3, "failed": 0, "non_finite_files": 0}
    with torch.no_grad():
        direct = model.to_image(model.decode_codes(codes.unsqueeze(0)))[0]
    save_image(direct, tmp_path / "direct.png")
    decoded = np.asarray(Image.open(tmp_path / "decoded/sub/0.png"))
    assert np.array_equal(decoded, np.asarray(Image.open(tmp_path / "direct.png")))
    # Same images as the model's own reconstruction through its codes.
    with torch.no_grad():
        x = smooth_images(3, seed=5)[:1]
        assert torch.allclose(model.decode_codes(model.latent.codes(model.encode(x))), model.decode(
            model.encode(x).mode()), atol=1e-6)


# ------------------------------------------------------------------ the training loop
def test_training_run_logs_codebook_metrics_and_reloads_the_codebook(tmp_path, monkeypatch):
    import csv
    from pathlib import Path

    from flexvae.checkpoint import (
        list_checkpoints,
        load_checkpoint,
        model_from_checkpoint,
    )
    from flexvae.config import load_config
    from flexvae.train.trainer import Trainer

    repo = Path(__file__).resolve().parents[2]
    monkeypatch.chdir(repo)
    enc = '["C2d_3_8_3_1_1", "Down_?_8", "SiLU", "VQ_16_?", "C2d_?_4_3_1_1"]'
    cfg = load_config(repo / "configs/tiny_test.toml", [
        f"train.out_dir={tmp_path / 'run'}", "train.device=cpu", "model.latent=vq",
        f"model.encoder={enc}", f"model.decoder={decoder(4)!r}".replace("'", '"'),
        "latent.codebook_size=32", "latent.code_dim=4", "latent.dead_threshold=0.5",
    ])
    trainer = Trainer(cfg, quiet=True)
    trainer.train()
    with open(tmp_path / "run/metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 4
    for column in ("vq_commit", "enc_vq_commit_3", "vq_usage", "vq_perplexity", "enc_vq_usage_3"):
        assert column in rows[-1], column
    assert 0 < float(rows[-1]["vq_usage"]) <= 1
    ckpt = load_checkpoint(list_checkpoints(tmp_path / "run")[-1])
    restored, stored_cfg, _ = model_from_checkpoint(ckpt)
    assert stored_cfg.latent.codebook_size == 32
    assert torch.equal(restored.latent.quantizer.embedding, trainer.model.latent.quantizer.embedding)


def test_sampled_categorical_latents_store_the_codes_of_the_sample():
    model = model_for("categorical").eval()
    x = smooth_images(2)
    z, codes = model.encode_with_codes(x, sample=True, generator=torch.Generator().manual_seed(3))
    assert torch.equal(model.latent.decode_codes(codes), z)
    mode, mode_codes = model.encode_with_codes(x)
    assert torch.equal(mode_codes, model.latent.codes(model.encode(x)))


@pytest.mark.parametrize("spherical", [False, True])
def test_binary_entropy_terms_against_enumerating_every_code(spherical):
    """Per-position entropy (exact) and codebook entropy (sum of per-bit marginals, an upper bound
    of the joint) against the softmax over all 2^bits codes of -|x - c|^2 / T."""
    bits, temperature = 4, 0.5
    quantizer = BinaryQuantizer(bits, spherical, commitment=0.0, entropy_weight=1.0, diversity=0.0,
                                entropy_temperature=temperature)
    z = torch.randn(3, bits, 2, 2, dtype=torch.float64)
    x = F.normalize(z, dim=1) if spherical else z
    scale = 1 / math.sqrt(bits) if spherical else 1.0
    codes = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=bits)), dtype=torch.float64) * scale
    vectors = x.permute(0, 2, 3, 1).reshape(-1, bits)
    probs = torch.softmax(-torch.cdist(vectors, codes).square() / temperature, dim=1)  # (N, 16)
    per_position = -(probs * probs.log()).sum(1).mean()
    _, _, losses = quantizer(z)
    kind = "bsq" if spherical else "lfq"
    torch.testing.assert_close(losses[f"{kind}_entropy"].double(), per_position, atol=1e-5, rtol=1e-5)
    joint = probs.mean(0)
    joint_entropy = -(joint * joint.log()).sum()
    diverse = BinaryQuantizer(bits, spherical, commitment=0.0, entropy_weight=1.0, diversity=1.0,
                              entropy_temperature=temperature)
    codebook = per_position - diverse(z)[2][f"{kind}_entropy"].double()
    assert codebook >= joint_entropy - 1e-6  # the factorised codebook entropy bounds the joint one from above
    marginal = (probs[:, None, :] * (codes.T[None] > 0)).sum(2).mean(0)  # P(bit i = 1) over the batch
    torch.testing.assert_close(codebook, -(marginal * marginal.log() + (1 - marginal) * (1 - marginal).log()).sum(),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["lfq", "bsq"])
def test_binary_latents_quantize_to_signs_and_round_trip_codes(kind):
    latent = LATENTS.get(kind).build(LATENTS.get(kind).params(bits=5))
    z = torch.randn(4, 5, 3, 3, requires_grad=True)
    posterior = latent(z)
    value = posterior.mode()
    scale = 1 / math.sqrt(5) if kind == "bsq" else 1.0
    torch.testing.assert_close(value, torch.sign(z.detach()) * scale)
    expected_codes = ((z.detach() > 0).long() * (2 ** torch.arange(5)).view(1, 5, 1, 1)).sum(1)
    assert torch.equal(posterior.codes, expected_codes)
    torch.testing.assert_close(latent.decode_codes(posterior.codes), value)
    value.sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0  # straight through
    if kind == "bsq":
        torch.testing.assert_close(value.norm(dim=1), torch.ones(4, 3, 3))


def test_every_discrete_latent_logs_codebook_usage_and_perplexity():
    for kind, params in (("vq", {}), ("fsq", {}), ("lfq", {"bits": 4}), ("bsq", {"bits": 4})):
        latent = LATENTS.get(kind).build(LATENTS.get(kind).params(**params)).train()
        latent(torch.randn(64, latent.quantizer.dim))  # a training batch of 64 vectors
        metrics = latent.metrics()
        usage = [v for k, v in metrics.items() if k.endswith("usage")]
        perplexity = [v for k, v in metrics.items() if k.endswith("perplexity")]
        assert len(usage) == 1 and 0 < usage[0] <= 1, (kind, metrics)
        assert len(perplexity) == 1 and 1 <= perplexity[0] <= 64, (kind, metrics)
    lfq = LATENTS.get("lfq").build(LATENTS.get("lfq").params(bits=2)).train()
    lfq(torch.tensor([[1.0, 1.0], [-1.0, 1.0], [1.0, -1.0], [-1.0, -1.0]]))
    assert lfq.metrics() == {"lfq_usage": 1.0, "lfq_perplexity": pytest.approx(4.0)}  # 4 codes, evenly


def test_residual_vq_quantizes_residuals_in_turn_and_round_trips_codes():
    """Against a hand-written greedy residual quantizer with the same codebooks."""
    from flexvae.latents.rvq import ResidualQuantizer

    torch.manual_seed(0)
    rvq = ResidualQuantizer(3, 8, 4).eval()
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    z_q, codes, losses = rvq(z)
    vectors = z.detach().movedim(1, -1).reshape(-1, 4)
    residual, total, digits = vectors.clone(), torch.zeros_like(vectors), []
    for quantizer in rvq.quantizers:
        book = quantizer.embedding.detach()
        pick = torch.cdist(residual, book).argmin(1)
        digits.append(pick)
        total += book[pick]
        residual -= book[pick]
    expected_codes = sum(d * 8 ** level for level, d in enumerate(digits)).view(2, 3, 3)
    assert torch.equal(codes, expected_codes)
    torch.testing.assert_close(z_q.detach().movedim(1, -1).reshape(-1, 4), total)
    torch.testing.assert_close(rvq.lookup(codes), z_q.detach())
    z_q.sum().backward()
    torch.testing.assert_close(z.grad, torch.ones_like(z))  # straight through
    assert set(losses) == {"rvq_commit"} and losses["rvq_commit"] > 0


def test_residual_vq_matches_vector_quantize_pytorch_with_the_same_codebooks():
    vqp = pytest.importorskip("vector_quantize_pytorch")
    from flexvae.latents.rvq import ResidualQuantizer

    torch.manual_seed(0)
    ours = ResidualQuantizer(4, 16, 6).eval()
    theirs = vqp.ResidualVQ(dim=6, num_quantizers=4, codebook_size=16, kmeans_init=False).eval()
    with torch.no_grad():
        for layer, quantizer in zip(theirs.layers, ours.quantizers):
            layer._codebook.embed.copy_(quantizer.embedding[None])
    z = torch.randn(3, 6, 5, 5)
    with torch.no_grad():
        z_q, codes, _ = ours(z)
        quantized, indices, _ = theirs(z.movedim(1, -1).reshape(3, 25, 6))
    torch.testing.assert_close(z_q.movedim(1, -1).reshape(3, 25, 6), quantized, atol=1e-5, rtol=1e-5)
    combined = sum(indices[..., level] * 16 ** level for level in range(4))
    assert torch.equal(codes.reshape(3, 25), combined)


@pytest.mark.parametrize("latent, settings, tokens", [
    ("bsq", ["latent.bits=4"], []),
    ("rvq", ["latent.rvq_levels=2", "latent.codebook_size=8", "latent.code_dim=4"], []),
    ("gaussian", [], ["RVQ_2_8_?", "BSQ_?", "LFQ_?"]),
])
def test_new_latents_and_quantizer_tokens_train_a_step_and_reload(latent, settings, tokens, tmp_path):
    """bsq and rvq latents, and the RVQ/BSQ/LFQ tokens inside a decoder, train a step through the
    CLI; the checkpoint rebuilds a model that reconstructs exactly as a second rebuild does, and
    their losses and codebook statistics are logged."""
    import csv

    import numpy as np
    from PIL import Image

    from flexvae.checkpoint import load_run
    from helpers.inprocess import run_in_process
    from helpers.runs import tiny

    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for index in range(4):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(images / f"{index}.png")
    latent_channels = 4 if latent != "gaussian" else 2
    encoder = ["C2d_3_8_3_1_1", "Down_?_8", "C2d_?_4_3_1_1"]
    decoder = [f"C2d_{latent_channels}_8_3_1_1", "C2d_?_4_1_1_0", *tokens, "UpS_2", "C2d_?_3_3_1_1"]
    (tmp_path / "enc.json").write_text(json.dumps(encoder))
    (tmp_path / "dec.json").write_text(json.dumps(decoder))
    run = tmp_path / "run"
    result = run_in_process(["-t", *tiny(images, run, "--set", f"model.latent={latent}", *sum(
        (["--set", s] for s in settings), []), "--set", f"model.encoder={tmp_path / 'enc.json'}", "--set",
        f"model.decoder={tmp_path / 'dec.json'}", "--set", "train.max_steps=1", "--set", "train.log_every=1",
        "--set", "train.fit_prior=0")])
    assert result.returncode == 0, result.stderr
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.equal(load_run(run).vae.reconstruct(x), load_run(run).vae.reconstruct(x))
    columns = set(next(csv.reader(open(run / "metrics.csv"))))
    expected = {"bsq": {"bsq_commit", "bsq_entropy", "bsq_usage"}, "rvq": {"rvq_commit", "rvq_usage"},
                "gaussian": {"dec_rvq_commit_2", "dec_bsq_entropy_3", "dec_lfq_commit_4", "dec_lfq_usage_4"}}[latent]
    assert expected <= columns, columns


def test_kl_groups_sum_to_the_kl_for_every_latent_type():
    from flexvae.latents.categorical import CategoricalPosterior

    logits = torch.randn(3, 2, 4, 5, 5)  # (B, groups, categories, H, W)
    categorical = CategoricalPosterior(logits, tau=1.0)
    assert categorical.kl_groups().shape == (3, 2)  # one floor per categorical variable group
    torch.testing.assert_close(categorical.kl_groups().sum(1), categorical.kl())
    _, out = output()
    assert out.posterior.kl_groups().shape == (4, 2)
    torch.testing.assert_close(out.posterior.kl_groups().sum(1), out.posterior.kl())


@pytest.mark.parametrize("shape", [(3, 2, 4), (3, 2, 4, 5), (3, 2, 4, 5, 5)])
def test_categorical_kl_groups_of_vectors_and_maps_match_a_float64_reference(shape):
    from flexvae.latents.categorical import CategoricalPosterior

    logits = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    groups = CategoricalPosterior(logits, tau=1.0).kl_groups()
    q = D.Categorical(logits=logits.double().movedim(2, -1))
    uniform = D.Categorical(logits=torch.zeros_like(logits.double().movedim(2, -1)))
    reference = D.kl_divergence(q, uniform)  # (B, G, *spatial)
    reference = reference.flatten(2).sum(2) if reference.dim() > 2 else reference
    assert groups.shape == (3, 2)
    torch.testing.assert_close(groups.double(), reference, rtol=1e-5, atol=1e-6)
