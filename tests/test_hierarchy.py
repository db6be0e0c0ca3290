"""Hierarchical VAEs: Keep/Z tokens, per-group KL, sampling by group, the spike guard."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from flexvae.build import plan_vae
from flexvae.errors import StructureError
from flexvae.forward_state import ForwardState
from flexvae.train.guard import MIN_HISTORY, SpikeGuard
from helpers.inprocess import run_in_process
from helpers.runs import TINY, make_images

ENCODER = ["C2d_1_8_3_1_1", "Keep_name=x8", "Down_?_8", "Keep_name=x4", "C2d_8_4_3_1_1"]
DECODER = ["C2d_2_8_3_1_1", "Z_3_enc=x4", "UpS_2", "C2d_8_8_3_1_1", "Z_2_enc=x8_merge=cat", "C2d_10_1_3_1_1"]
# the tiny structures for 16 px RGB with two groups, for runs through train.py
H_ENCODER = '["C2d_3_8_3_1_1", "Keep_name=x16", "Down_?_8", "Keep_name=x8", "GN_4_?", "SiLU", "C2d_?_4_3_1_1"]'
H_DECODER = '["C2d_2_8_3_1_1", "Z_2_enc=x8", "UpS_2", "C2d_?_8_3_1_1", "Z_2_enc=x16_hidden=8", "GN_4_8", "SiLU", ' \
            '"C2d_8_3_3_1_1"]'


def hvae(seed: int = 0):
    torch.manual_seed(seed)
    vae = plan_vae(ENCODER, DECODER, (1, 8, 8)).build()
    with torch.no_grad():  # leave the zero start: priors and posteriors that differ
        for p in vae.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return vae


def h_args(images, run, *extra):
    return ["-c", TINY, "--set", f"train.out_dir={run}", "--set", f"data.path={images}",
            "--set", f"model.encoder={H_ENCODER}", "--set", f"model.decoder={H_DECODER}",
            "--set", "data.num_workers=0", "--set", "train.device=cpu", *extra]


def test_plan_lists_kept_activations_and_groups():
    plan = plan_vae(ENCODER, DECODER, (1, 8, 8))
    assert plan.encoder.kept == {"x8": (8, 8, 8), "x4": (8, 4, 4)}
    assert plan.decoder.groups == [("x4", (3, 4, 4)), ("x8", (2, 8, 8))]
    assert plan.build().groups == ["x4", "x8"]


def test_total_kl_is_the_sum_of_group_kls_against_torch_distributions():
    vae = hvae()
    x = torch.randn(3, 1, 8, 8)
    out = vae(x, generator=torch.Generator().manual_seed(0))
    assert list(out.groups) == ["x4", "x8"]
    expected = kl_divergence(Normal(out.posterior.mean, out.posterior.std), Normal(0.0, 1.0)).flatten(1).sum(1)
    for group in out.groups.values():
        q = Normal(group.mean, torch.exp(0.5 * group.logvar))
        p = Normal(group.prior_mean, torch.exp(0.5 * group.prior_logvar))
        expected = expected + kl_divergence(q, p).flatten(1).sum(1)
    torch.testing.assert_close(out.kl(), expected, rtol=1e-5, atol=1e-5)
    assert all(g.kl_groups().shape == (3, g.mean.shape[1]) for g in out.groups.values())


def test_groups_start_with_zero_kl_and_a_scaled_merge():
    torch.manual_seed(0)
    vae = plan_vae(ENCODER, DECODER, (1, 8, 8)).build()
    out = vae(torch.randn(2, 1, 8, 8))
    assert all(float(g.kl().detach().abs().max()) == 0 for g in out.groups.values())
    plan = plan_vae(ENCODER, DECODER, (1, 8, 8))
    torch.manual_seed(3)
    built = plan.decoder.build()
    torch.manual_seed(3)
    unscaled = [layer.factory(**kwargs) for layer, kwargs in plan.decoder.layers]
    # two groups: each merge projection starts at 1/sqrt(2) of its default initialisation
    torch.testing.assert_close(built[1].project.weight, unscaled[1].project.weight / math.sqrt(2))
    assert built[4].project is None  # merge=cat has no projection


def test_partial_posterior_ends_are_the_prior_and_the_reconstruction():
    vae = hvae().eval()
    x = torch.randn(4, 1, 8, 8)
    torch.testing.assert_close(vae.partial_posterior(x, 3), vae.reconstruct(x))
    torch.testing.assert_close(vae.partial_posterior(x, 0, generator=torch.Generator().manual_seed(5)),
                               vae.sample_prior(4, generator=torch.Generator().manual_seed(5)))
    middle = vae.partial_posterior(x, 1, generator=torch.Generator().manual_seed(5))
    assert not torch.allclose(middle, vae.reconstruct(x))
    with pytest.raises(ValueError, match=r"k must lie in \[0, 3\]"):
        vae.partial_posterior(x, 4)


def test_temperatures_per_group():
    vae = hvae().eval()
    cold = vae.sample_prior(3, generator=torch.Generator().manual_seed(0), temperature=0.0)
    also_cold = vae.sample_prior(3, generator=torch.Generator().manual_seed(9), temperature={"top": 0, "x4": 0, "x8": 0})
    torch.testing.assert_close(cold, also_cold)  # every group at its prior mean: no noise left
    warm = vae.sample_prior(3, generator=torch.Generator().manual_seed(0), temperature={"x8": 0.0})
    assert not torch.allclose(cold, warm)


def test_given_group_values_are_used_as_they_are():
    vae = hvae().eval()
    x = torch.randn(2, 1, 8, 8)
    recon, posterior, state = vae.reconstruct_raw(x)
    given = ForwardState(given=dict(state.values))
    torch.testing.assert_close(vae.decode(posterior.mode(), state=given), recon)


@pytest.mark.parametrize("encoder, decoder, message", [
    (ENCODER, ["C2d_2_8_3_1_1", "Z_3_enc=x2"], r"no encoder activation is kept as 'x2'; the encoder keeps: x8, x4"),
    (ENCODER, ["C2d_2_8_3_1_1", "Z_3_enc=x8"], r"the encoder's 'x8' has shape \(8, 8, 8\), but the decoder's state here "
                                                r"has shape \(8, 4, 4\)"),
    (ENCODER, ["C2d_2_8_3_1_1", "Z_3_enc=x4", "Z_3_enc=x4"], r"a latent group named 'x4' comes twice"),
    (["C2d_1_8_3_1_1", "Keep_name=a", "Keep_name=a", "C2d_8_4_3_1_1"], ["C2d_2_1_3_1_1"], r"the name 'a' is kept twice"),
    (ENCODER, ["C2d_2_8_3_1_1", "Z_3"], r"missing argument 'enc'"),
    (ENCODER, ["C2d_2_8_3_1_1", "Z_3_enc=x4_kernel=2"], r"kernel must be odd"),
    (ENCODER, ["C2d_2_8_3_1_1", "Z_3_enc=x4_merge=mul"], r"argument 'merge' must be one of add, cat"),
    (ENCODER, ["C2d_2_8_3_1_1", "Z_3_enc=x4_merge=cat", "C2d_8_1_3_1_1"], r"channel mismatch: in_channels=8, but the "
                                                                          r"previous layer's output has 11 channels"),
])
def test_grammar_errors_name_the_position_and_token(encoder, decoder, message):
    with pytest.raises(StructureError, match=message) as info:
        plan_vae(encoder, decoder, (1, 8, 8))
    assert "position" in str(info.value) and "token" in str(info.value)


def test_spike_guard_quantile_threshold_and_state():
    guard = SpikeGuard(window=50, quantile=0.5, factor=2.0)
    assert not any(guard.skip(1.0 + 0.01 * i) for i in range(MIN_HISTORY))
    assert guard.threshold() == pytest.approx(2 * (1.0 + 0.01 * (MIN_HISTORY - 1) / 2))
    assert guard.skip(100.0) and guard.skip(float("nan")) and guard.skipped == 2
    assert not guard.skip(1.05)
    restored = SpikeGuard(window=50, quantile=0.5, factor=2.0)
    restored.load_state_dict(guard.state_dict())
    assert restored.threshold() == guard.threshold() and restored.skipped == 2


def test_a_guard_adapts_to_a_lasting_rise():
    guard = SpikeGuard(window=40, quantile=0.9, factor=1.5)
    for _ in range(40):
        guard.skip(1.0)
    skipped = [guard.skip(10.0) for _ in range(60)]
    assert skipped[0] and not skipped[-1]  # a fixed threshold would skip all 60


def test_an_injected_spike_is_skipped_and_counted(tmp_path, monkeypatch):
    """One step's gradient made huge: that update leaves every weight as it was, the count says 1."""
    from flexvae.config import load_config
    from flexvae.train import step as step_module
    from flexvae.train.trainer import Trainer

    images = make_images(tmp_path / "img", 8)
    cfg = load_config(TINY, [f"data.path={images}", f"train.out_dir={tmp_path / 'run'}", "data.num_workers=0",
                             "train.skip_spikes=true", "train.max_steps=30", "train.save_every=100",
                             "train.log_every=1", "train.sample_every=100", "train.grad_clip=0"])
    trainer = Trainer(cfg, quiet=True)
    real_clip = torch.nn.utils.clip_grad_norm_
    before, after = {}, {}

    def clip(parameters, limit):
        parameters = list(parameters)
        if trainer.step == 25:  # the weights before this step's update; then its spike
            before.update({k: v.clone() for k, v in trainer.model.state_dict().items()})
            for p in parameters:
                p.grad.mul_(1e6)
        if trainer.step == 26:  # the weights after the spiked step
            after.update({k: v.clone() for k, v in trainer.model.state_dict().items()})
        return real_clip(parameters, limit)

    monkeypatch.setattr(step_module.torch.nn.utils, "clip_grad_norm_", clip)
    trainer.train()
    assert trainer.guard.skipped == 1
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    counts = [int(float(r.split(",")[header.index("skipped")])) for r in rows[1:]]
    assert counts[24] == 0 and counts[25] == 1 and counts[-1] == 1
    assert math.isfinite(float(rows[-1].split(",")[header.index("skip_threshold")]))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_hierarchical_run_logs_groups_resumes_exactly_and_round_trips(tmp_path):
    import flexvae
    from safetensors.torch import load_file

    images = make_images(tmp_path / "img", 8)
    extra = ["--set", "train.schedule=constant", "--set", "loss.objective=elbo", "--set", "train.skip_spikes=true"]
    assert run_in_process(["-t", *h_args(images, tmp_path / "whole", *extra)]).returncode == 0
    assert run_in_process(["-t", *h_args(images, tmp_path / "split", *extra, "--set", "train.max_steps=2")]).returncode == 0
    result = run_in_process(["-t", *h_args(images, tmp_path / "split", *extra)])
    assert result.returncode == 0, result.stderr
    whole = load_file(str(tmp_path / "whole" / "checkpoints" / "step_00000004.safetensors"))
    split = load_file(str(tmp_path / "split" / "checkpoints" / "step_00000004.safetensors"))
    weights = [k for k in whole if k.startswith("model.")]
    assert any("posterior" in k for k in weights) and all(torch.equal(whole[k], split[k]) for k in weights)
    header = (tmp_path / "whole" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"kld_top", "kld_x8", "kld_x16", "skipped", "skip_threshold"} <= set(header)
    vae = flexvae.load_model(tmp_path / "whole")
    assert vae.groups == ["x8", "x16"]
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert vae.partial_posterior(x, 2).shape == (2, 3, 16, 16)


@pytest.mark.slow
def test_two_processes_train_a_hierarchy_like_one(tmp_path):
    """torchrun with 2 CPU processes: the groups' noise is drawn for the global batch, so the
    replicas stay identical and match one process with the same global batch."""
    from helpers.ddp import assert_two_processes_match_one

    images = make_images(tmp_path / "img", 12)
    common = [f"data.path={images}", "data.num_workers=0", f"model.encoder={H_ENCODER}", f"model.decoder={H_DECODER}",
              "loss.objective=elbo", "train.max_steps=4", "train.save_every=4", "train.grad_accum=2", "train.lr=1e-4",
              "train.grad_clip=0", "train.log_every=1", "train.skip_spikes=true"]
    assert_two_processes_match_one(tmp_path, common, columns=("loss", "kld_x8", "kld_x16"))


def test_encode_writes_every_group_and_decode_reads_them_back(tmp_path):
    from safetensors.torch import load_file

    from flexvae.checkpoint import load_run

    images = make_images(tmp_path / "img", 5)
    run = tmp_path / "run"
    assert run_in_process(["-t", *h_args(images, run, "--set", "train.max_steps=2")]).returncode == 0
    result = run_in_process(["-e", *h_args(images, run), "--input", images, "--output", tmp_path / "lat"])
    assert result.returncode == 0, result.stderr
    stored = load_file(str(tmp_path / "lat" / "0.safetensors"))
    assert set(stored) == {"latent", "group.x8", "group.x16"}
    assert stored["group.x8"].shape == (2, 8, 8) and stored["group.x16"].shape == (2, 16, 16)
    manifest = (tmp_path / "lat" / "manifest.jsonl").read_text()
    assert '"groups": {"x8": [2, 8, 8], "x16": [2, 16, 16]}' in manifest
    decoded = run_in_process(["-d", *h_args(images, run), "--input", tmp_path / "lat", "--output", tmp_path / "dec"])
    assert decoded.returncode == 0, decoded.stderr
    recon = run_in_process(["-i", *h_args(images, run), "--input", images, "--output", tmp_path / "rec"])
    assert recon.returncode == 0
    from PIL import Image
    import numpy as np

    # -e then -d is the reconstruction of -i, to 8-bit rounding
    a = np.asarray(Image.open(tmp_path / "dec" / "0.png"), dtype=np.int16)
    b = np.asarray(Image.open(tmp_path / "rec" / "0.png"), dtype=np.int16)
    assert np.abs(a - b).max() <= 1
    ctx = load_run(run)
    assert ctx.vae.groups == ["x8", "x16"]
    # a file without its groups is reported, not decoded with made-up groups
    from safetensors.torch import save_file

    save_file({"latent": stored["latent"]}, str(tmp_path / "lat" / "bare.safetensors"))
    partly = run_in_process(["-d", *h_args(images, run), "--input", tmp_path / "lat", "--output", tmp_path / "dec2"])
    assert partly.returncode == 0 and "no latent group 'x8' in this file" in partly.stderr
    npy = run_in_process(["-e", *h_args(images, run, "--set", "encode.format=npy"), "--input", images,
                          "--output", tmp_path / "npy"])
    assert npy.returncode != 0 and "latent groups (x8, x16) are stored beside its top latent" in npy.stderr
    tiled = run_in_process(["-d", *h_args(images, run), "--input", tmp_path / "lat", "--output", tmp_path / "t",
                            "--tile", "16"])
    assert tiled.returncode != 0 and "this model is hierarchical" in tiled.stderr


def test_pics_of_a_hierarchy_show_the_partial_posterior(tmp_path):
    from PIL import Image

    images = make_images(tmp_path / "img", 8)
    run = tmp_path / "run"
    assert run_in_process(["-t", *h_args(images, run, "--set", "train.max_steps=2")]).returncode == 0
    result = run_in_process(["-pics", *h_args(images, run)])
    assert result.returncode == 0, result.stderr
    grid = Image.open(run / "pictures" / "partial_posterior.png")
    assert grid.size == (8 * 16 + 9 * 2, 5 * 16 + 6 * 2)  # inputs, then k = 0 .. 3 (top + 2 groups)


# ------------------------------------------------------------------ hVAE's analysis tools
def linear_vae():
    """A flat model whose top latent's means are a linear map of the pixels: mean_u = w_u . x + b_u."""
    torch.manual_seed(0)
    return plan_vae(["Flat", "Lin_16_4"], ["Lin_2_16", "Reshape_1_4_4"], (1, 4, 4)).build().eval()


def test_white_noise_receptive_fields_recover_a_linear_units_weights():
    from flexvae.analysis.units import receptive_fields

    vae = linear_vae()
    weights = vae.encoder[1].weight[:2].detach()  # the mean half of Lin_16_4
    fields = receptive_fields(vae, [("top", 0, ()), ("top", 1, ())], (1, 4, 4), count=4096, seed=1)
    for unit in range(2):
        corr = torch.corrcoef(torch.stack([fields[unit].flatten(), weights[unit]]))[0, 1]
        assert corr > 0.95, corr


def test_most_exciting_inputs_follow_a_linear_units_weights_within_bounds():
    from flexvae.analysis.units import most_exciting

    vae = linear_vae()
    weights = vae.encoder[1].weight[:2].detach()
    x = most_exciting(vae, [("top", 0, ()), ("top", 1, ())], (1, 4, 4), norm=1.0, steps=80)
    assert x.abs().max() <= 1 and (x.flatten(1).norm(dim=1) <= 1.0 + 1e-5).all()
    for unit in range(2):
        assert torch.corrcoef(torch.stack([x[unit].flatten(), weights[unit]]))[0, 1] > 0.95
        assert float(x[unit].flatten() @ weights[unit]) > 0


def test_divergence_statistics_match_the_groups_kl():
    from flexvae.analysis.units import divergence_statistics

    vae = hvae().eval()
    x = torch.randn(6, 1, 8, 8)
    stats = divergence_statistics(vae, x)
    with torch.no_grad():
        out = vae(x, sample=False)
    assert list(stats) == ["top", "x4", "x8"]
    assert stats["top"]["mean"] == pytest.approx(float(out.posterior.kl().mean()), rel=1e-5)
    assert stats["x8"]["mean"] == pytest.approx(float(out.groups["x8"].kl().mean()), rel=1e-5)
    assert sum(stats["x4"]["per_channel"]) == pytest.approx(stats["x4"]["mean"], rel=1e-5)


def test_latent_steps_move_only_their_group():
    from flexvae.analysis.units import latent_steps

    vae = hvae().eval()
    x = torch.randn(6, 1, 8, 8)
    rows, described = latent_steps(vae, x[:1], x, steps=5)
    assert [d["group"] for d in described] == ["top", "x4", "x8"] and all(r.shape == (6, 1, 8, 8) for r in rows)
    torch.testing.assert_close(rows[2][3], vae.reconstruct(x[:1])[0])  # the middle step is the reference


def test_analyze_writes_every_picture_and_the_probes(tmp_path):
    import json

    from PIL import Image

    labelled = tmp_path / "labelled"
    for c in range(2):
        make_images(labelled / f"class{c}", 6)
    run = tmp_path / "run"
    assert run_in_process(["-t", *h_args(labelled, run, "--set", "train.max_steps=2")]).returncode == 0
    result = run_in_process(["-analyze", *h_args(labelled, run), "--input2", labelled, "--steps", "5"])
    assert result.returncode == 0, result.stderr
    out = run / "analysis"
    for name in ("latent_steps", "receptive_fields", "most_exciting", "divergence", "decodability"):
        assert (out / f"{name}.png").is_file(), name
    report = json.loads((out / "analysis.json").read_text())
    assert report["groups"] == ["top", "x8", "x16"] and set(report["divergence"]) == {"top", "x8", "x16"}
    assert report["decodability"]["chance"] == 0.5 and 0 <= report["decodability"]["x16"] <= 1
    assert Image.open(out / "latent_steps.png").size == (6 * 16 + 7 * 2, 3 * 16 + 4 * 2)
    flat = run_in_process(["-analyze", "-c", TINY, "--ckpt", run, "--input", labelled, "--output", tmp_path / "a2"])
    assert flat.returncode == 0 and "top: KL" in flat.stdout


def test_gradient_checkpointing_of_groups_changes_nothing(tmp_path):
    """'@' segments holding latent groups are recomputed in the backward pass with the same noise:
    the weights are bitwise those of a run without checkpointing."""
    from safetensors.torch import load_file

    images = make_images(tmp_path / "img", 8)
    decoder = ('["C2d_2_8_3_1_1", "@Z_2_enc=x8", "UpS_2", "C2d_?_8_3_1_1", "@begin", "Z_2_enc=x16_hidden=8", '
               '"GN_4_8", "@end", "SiLU", "C2d_8_3_3_1_1"]')
    for mode in ("off", "marked"):
        result = run_in_process(["-t", *h_args(images, tmp_path / mode, "--set", f"model.decoder={decoder}",
                                               "--set", f"train.grad_checkpointing={mode}")])
        assert result.returncode == 0, result.stderr
    a, b = (load_file(str(tmp_path / m / "checkpoints" / "step_00000004.safetensors")) for m in ("off", "marked"))
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith("model."))


def test_a_decoder_can_start_from_a_learned_constant():
    torch.manual_seed(0)
    vae = plan_vae(ENCODER, ["Const_8_4_4", "Z_3_enc=x4", "UpS_2", "C2d_8_8_3_1_1", "Z_2_enc=x8", "C2d_8_1_3_1_1"],
                   (1, 8, 8)).build()
    x = torch.randn(2, 1, 8, 8)
    out = vae(x)
    assert out.recon.shape == x.shape and list(out.groups) == ["x4", "x8"]
    out.kl().sum().backward()
    assert vae.decoder[0].value.grad is not None  # the groups' priors see the constant


def test_residual_branches_of_a_hierarchy_start_scaled():
    encoder = ["C2d_1_8_3_1_1", "VAERB_8_8", "Keep_name=x8", "C2d_8_4_3_1_1"]
    flat_decoder = ["C2d_2_8_3_1_1", "2*VAERB_8_8", "C2d_8_1_3_1_1"]
    deep_decoder = ["C2d_2_8_3_1_1", "2*VAERB_8_8", "Z_2_enc=x8", "C2d_8_1_3_1_1"]
    plans = {name: plan_vae(encoder, dec, (1, 8, 8)) for name, dec in (("flat", flat_decoder), ("deep", deep_decoder))}
    built = {}
    for name, plan in plans.items():
        torch.manual_seed(0)
        built[name] = plan.build()
    # the same draws (the group's layers come after the blocks); three blocks: 1/sqrt(3) in the hierarchy
    for flat_stack, deep_stack in ((built["flat"].encoder, built["deep"].encoder), (built["flat"].decoder, built["deep"].decoder)):
        flat_blocks = [m for m in flat_stack if hasattr(m, "conv2")]
        deep_blocks = [m for m in deep_stack if hasattr(m, "conv2")]
        for a, b in zip(flat_blocks, deep_blocks):
            torch.testing.assert_close(b.conv2.weight, a.conv2.weight / math.sqrt(3))
            torch.testing.assert_close(b.conv1.weight, a.conv1.weight)
