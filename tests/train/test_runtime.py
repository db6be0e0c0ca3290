"""Mixed precision, channels_last, torch.compile, gradient checkpointing and DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from flexvae.assemble import model_from_config
from flexvae.build import plan_vae
from flexvae.config import load_config
from flexvae.dsl import parse_structure
from flexvae.dsl.structure import unparse_structure
from flexvae.errors import StructureError
from flexvae.layers.norm_act import FP32GroupNorm
from flexvae.train import runtime as runtime_module
from flexvae.train.distributed import DistInfo
from flexvae.train.runtime import flip_mask, prepare, sample_noise
from flexvae.train.step import MicroBatch, make_optimizer, train_step
from flexvae.train.trainer import Trainer
from helpers.ddp import train_two_and_one
from helpers.hierarchy import H_DECODER, H_ENCODER
from helpers.runs import TINY, make_images

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray((rng.random((20, 20, 3)) * 255).astype("uint8")).save(folder / f"{i}.png")
    return folder


def tiny_cfg(tmp_path, images, *overrides):
    return load_config(TINY, [f"train.out_dir={tmp_path / 'run'}", f"data.path={images}",
                              "data.num_workers=0", *overrides])


def one_step(cfg, seed=0):
    torch.manual_seed(seed)
    model, plan = model_from_config(cfg)
    runtime = prepare(model, cfg, torch.device("cpu"))
    optimizer = make_optimizer(model, cfg.train)
    x = torch.rand((4, *plan.data_shape), generator=torch.Generator().manual_seed(1)) * 2 - 1
    noise = sample_noise(plan.latent_shape, 4, 0, 0, 0, DistInfo(), "cpu")
    result = train_step(runtime, [MicroBatch(runtime.to_input(x), noise=noise)], optimizer, cfg, 0)
    return result, model, runtime


def _losses(run_dir):
    import csv

    with open(run_dir / "metrics.csv", newline="") as fh:
        return [float(row["loss"]) for row in csv.DictReader(fh)]


CATEGORICAL_DECODER = '["C2d_?_8_3_1_1", "VAERB_8_8_dropout=0.3", "UpS_2", "C2d_?_8_3_1_1", "Drop_0.2", "GN_4_8", ' \
                      '"SiLU", "C2d_8_3_3_1_1"]'
LATENT_SETTINGS = {
    "gaussian": [],
    # Gumbel noise and dropout masks are drawn for the global batch as well
    "categorical+dropout": ["model.latent=categorical", "latent.groups=2", "latent.categories=2",
                            f"model.decoder={CATEGORICAL_DECODER}"],
}


def _two_identical_replicas(out_dir, arguments) -> dict:
    """Train with tests/helpers/ddp_train.py under torchrun (2 processes); both processes' weights
    must be identical. Returns rank 0's."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    script = str(ROOT / "tests" / "helpers" / "ddp_train.py")
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", script,
         str(out_dir), *arguments],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    rank0, rank1 = (load_file(str(out_dir / f"rank{r}.safetensors")) for r in (0, 1))
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    return rank0


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_step_trains_and_matches_fp32_roughly(tmp_path, images, precision):
    reference, ref_model, _ = one_step(tiny_cfg(tmp_path, images))
    result, model, runtime = one_step(tiny_cfg(tmp_path, images, f"train.precision={precision}"))
    assert runtime.dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    assert (runtime.scaler is not None) == (precision == "fp16")
    assert np.isfinite(result.loss)
    assert abs(result.loss - reference.loss) < 0.05 * reference.loss
    # The weights stay float32 and were updated.
    moved = [not torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref_model.state_dict().values())]
    assert all(p.dtype == torch.float32 for p in model.parameters()) and any(moved)


def test_group_norm_statistics_are_float32_under_half_precision():
    norm = FP32GroupNorm(2, 4)
    x = (torch.randn(2, 4, 8, 8) * 3 + 300).to(torch.bfloat16)  # large offset: bf16 variance is useless
    expected = torch.nn.functional.group_norm(x.float(), 2, norm.weight, norm.bias, norm.eps)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = norm(x)  # no cast of ours here: the kernel accumulates in float32 itself
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)
    out = norm.to(torch.bfloat16)(x)  # outside autocast: normalised in float32 and cast back
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)


def test_channels_last_gives_the_same_step(tmp_path, images):
    reference, _, _ = one_step(tiny_cfg(tmp_path, images))
    result, model, runtime = one_step(tiny_cfg(tmp_path, images, "train.channels_last=true"))
    assert runtime.memory_format is torch.channels_last
    conv = model.encoder[0]
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert result.loss == pytest.approx(reference.loss, rel=1e-5)


@pytest.mark.parametrize("mode", ["marked", "blocks"])
def test_grad_checkpointing_gives_identical_gradients(mode):
    enc = ["C2d_3_8_3_1_1", "@2*VAERB_8_8", "@begin", "Down_?_8", "VAEA_8", "@end", "GN_4_?", "SiLU", "C2d_?_4_3_1_1"]
    dec = ["C2d_2_8_3_1_1", "VAERB_8_8", "UpS_2", "C2d_?_8_3_1_1", "GN_4_8", "SiLU", "C2d_8_3_3_1_1"]
    torch.manual_seed(0)
    model = plan_vae(enc, dec, (3, 16, 16)).build()
    x = torch.randn(2, 3, 16, 16)

    def grads():
        model.zero_grad()
        torch.manual_seed(1)
        model(x).recon.square().mean().backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = grads()
    model.set_grad_checkpointing(mode)
    assert any(recompute for _, _, recompute in model.encoder.segments(mode))
    for a, b in zip(plain, grads()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_checkpoint_marks_parse_and_round_trip():
    tokens = ["C2d_3_8_3_1_1", "@2*VAERB_8_8", "@begin", "Down_?_8", "VAEA_8", "@end", "SiLU"]
    specs = parse_structure(tokens, "enc.json")
    assert [s.checkpoint for s in specs] == [None, "token", 1, 1, None]
    assert unparse_structure(specs) == tokens
    with pytest.raises(StructureError, match=r"enc.json, position 2.*@end without an opening @begin"):
        parse_structure(["SiLU", "@end"], "enc.json")
    with pytest.raises(StructureError, match=r"opened by @begin at position 1 has no @end"):
        parse_structure(["@begin", "SiLU"], "enc.json")
    with pytest.raises(StructureError, match="spans cannot nest"):
        parse_structure(["@begin", "@begin", "SiLU", "@end"], "enc.json")


@pytest.mark.slow
def test_trainer_runs_every_switch_together_with_compile(tmp_path, images):
    cfg = tiny_cfg(tmp_path, images, "train.precision=bf16", "train.channels_last=true", "train.compile=true",
                   "train.grad_checkpointing=blocks", "train.max_steps=2", "train.save_every=2")
    trainer = Trainer(cfg, quiet=True)
    assert trainer.train() is not None
    assert trainer.runtime.compiled and not trainer.runtime.notes
    assert trainer.step == 2


def test_compile_failure_falls_back_to_eager_with_a_message(tmp_path, images, monkeypatch, capsys):
    class Broken(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, *args, **kwargs):
            raise RuntimeError("backend compiler failed: no luck")

    monkeypatch.setattr(torch, "compile", lambda module: Broken(module))
    cfg = tiny_cfg(tmp_path, images, "train.compile=true", "train.max_steps=2", "train.save_every=2")
    trainer = Trainer(cfg)
    trainer.train()
    assert trainer.step == 2 and not trainer.runtime.compiled
    assert "torch.compile failed (RuntimeError: backend compiler failed: no luck); training without compilation" \
        in capsys.readouterr().out


def test_compile_without_a_compiler_says_why(tmp_path, images, monkeypatch):
    monkeypatch.setattr(runtime_module.shutil, "which", lambda name: None)
    _, _, runtime = one_step(tiny_cfg(tmp_path, images, "train.compile=true"))
    assert not runtime.compiled
    assert runtime.notes == ["train.compile: compiling for the CPU needs a C++ compiler (c++, g++ or clang++) "
                             "on PATH; training without compilation"]


def test_noise_and_flips_do_not_depend_on_how_the_batch_is_split():
    whole = sample_noise((2, 4, 4), 6, seed=3, step=5, micro=1, dist=DistInfo(), device="cpu")
    parts = [sample_noise((2, 4, 4), 3, 3, 5, 1, DistInfo(rank, rank, 2), "cpu") for rank in range(2)]
    torch.testing.assert_close(torch.stack([parts[i % 2][i // 2] for i in range(6)]), whole)
    flips = flip_mask(6, 3, 5, 1, DistInfo())
    split = [flip_mask(3, 3, 5, 1, DistInfo(rank, rank, 2)) for rank in range(2)]
    assert torch.equal(torch.stack([split[i % 2][i // 2] for i in range(6)]), flips)
    assert not torch.equal(flip_mask(6, 3, 5, 0, DistInfo()), flips)  # each micro-batch its own


def test_mem_measures_with_the_training_runtime(tmp_path, images):
    from flexvae.train.memory import StepRunner

    cfg = tiny_cfg(tmp_path, images, "train.precision=bf16", "train.grad_checkpointing=blocks")
    runner = StepRunner(cfg, device="cpu")
    assert runner.runtime.dtype is torch.bfloat16 and runner.model.encoder.grad_checkpointing == "blocks"
    runner.step(2)


@pytest.mark.slow
@pytest.mark.parametrize("latent", list(LATENT_SETTINGS))
def test_two_processes_with_gloo_match_one_process(tmp_path, images, latent):
    """torchrun with 2 CPU processes: replicas stay identical, and with the same global batch the
    run matches a single process (per-step losses to float precision; weights closely: Adam's
    normalised steps amplify rounding differences in near-zero gradients)."""
    common = [f"data.path={images}", "data.num_workers=0", "train.max_steps=4", "train.save_every=4",
              "train.grad_accum=2", "train.lr=1e-4", "train.grad_clip=0", "train.log_every=1",
              *LATENT_SETTINGS[latent]]
    rank0, rank1, single = train_two_and_one(tmp_path, common)
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
        torch.testing.assert_close(rank0[key], single[key], rtol=0, atol=5e-5)
    assert _losses(tmp_path / "two") == pytest.approx(_losses(tmp_path / "one"), rel=1e-5)
    # Only rank 0 wrote checkpoints and samples; the one it wrote resumes like any other.
    assert [p.name for p in (tmp_path / "two" / "checkpoints").iterdir()] == ["step_00000004.safetensors"]


@pytest.mark.slow
def test_two_processes_train_an_elbo_model_with_a_discriminator(tmp_path, images):
    """A learned per-channel scale and a DDP-wrapped discriminator: both replicas of both
    networks stay identical. (Unlike the runs above, two processes need not equal one here:
    the discriminator's BatchNorm statistics and the adaptive weight are per process.)"""
    common = [f"data.path={images}", "data.num_workers=0", "train.max_steps=3", "train.save_every=3",
              "train.batch_size=2", "train.log_every=1", "loss.objective=elbo", "loss.scale=channel",
              "adversarial.discriminator=structures/small_discriminator.json", "adversarial.start=1"]
    rank0 = _two_identical_replicas(tmp_path / "two", common)
    assert "likelihood.log_scale" in rank0 and any(k.startswith("discriminator.") for k in rank0)
    header = (tmp_path / "two" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"d_loss", "g_adv", "adaptive_weight"} <= set(header)


def two_and_one(args, tmp_path):
    """train.py with ``args`` under torchrun with two processes (--output tmp/two), then alone
    (--output tmp/one); each must succeed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone"]
    for name, launcher in (("two", torchrun), ("one", [sys.executable])):
        done = subprocess.run([*launcher, "train.py", *args, "--output", str(tmp_path / name)],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.slow
def test_encode_splits_the_folder_across_processes(tmp_path, images):
    from flexvae.checkpoint import checkpoint_metadata, checkpoint_name, save_checkpoint

    cfg = tiny_cfg(tmp_path, images)
    torch.manual_seed(0)
    model, plan = model_from_config(cfg)
    ckpt = save_checkpoint(tmp_path / "run" / "checkpoints" / checkpoint_name(1), model.state_dict(),
                           checkpoint_metadata(cfg, plan, 1, 1.0))
    (images / "broken.png").write_text("not an image")
    two_and_one(["-e", "-c", str(TINY), "--ckpt", str(ckpt), "--input", str(images), "--set", "encode.batch_size=4"],
                tmp_path)
    manifest = (tmp_path / "two" / "manifest.jsonl").read_text()
    assert manifest == (tmp_path / "one" / "manifest.jsonl").read_text()
    assert len(manifest.splitlines()) == 13 and '"status": "failed"' in manifest
    assert not list((tmp_path / "two").glob(".manifest.rank*"))
    for name in (f"{i}.safetensors" for i in range(12)):
        torch.testing.assert_close(load_file(str(tmp_path / "two" / name))["latent"],
                                   load_file(str(tmp_path / "one" / name))["latent"])
    stats = [json.loads((tmp_path / run / "latent_stats.json").read_text()) for run in ("one", "two")]
    assert stats[0]["encoded"] == stats[1]["encoded"] == 12
    assert stats[0]["latent_std"] == pytest.approx(stats[1]["latent_std"], rel=1e-6)
    # both processes wrote into one folder and its one record: rank 0 began it before either wrote
    # (so its first line is the header, written once) and every file is recorded as flexvae's
    from flexvae.outputs import HEADER, RECORD, OutputFolder

    lines = [json.loads(line) for line in (tmp_path / "two" / RECORD).read_text().splitlines()]
    assert lines[0] == HEADER and lines.count(HEADER) == 1
    record = OutputFolder(tmp_path / "two")
    assert all(record.is_ours(tmp_path / "two" / f"{i}.safetensors") for i in range(12))


@pytest.mark.slow
def test_two_processes_share_free_bits_and_the_optimal_scale_of_the_global_batch(tmp_path, images):
    """Free bits and the calibrated decoder's scale are taken over the global batch: two
    processes with two micro-batches each train as one process does (global_batch.py)."""
    from helpers.ddp import assert_two_processes_match_one

    common = [f"data.path={images}", "data.num_workers=0", "train.max_steps=3", "train.save_every=3",
              "train.grad_accum=2", "train.lr=1e-4", "train.grad_clip=0", "train.log_every=1",
              "loss.objective=elbo", "loss.scale=optimal", "loss.free_bits=0.2"]
    assert_two_processes_match_one(tmp_path, common, columns=("loss", "nll", "kl", "scale"))


@pytest.mark.slow
def test_two_processes_train_a_stage_with_the_two_view_and_equivariance_terms(tmp_path, images):
    """Under DDP a frozen encoder stays bitwise its initial self (its gradients are reduced, then
    dropped), the replicas stay identical, and the terms that encode or decode a second time
    (Contrast, Equiv) train with the wrapped model."""
    config = tmp_path / "stage.toml"
    config.write_text((ROOT / "configs" / "tiny_test.toml").read_text().replace(
        '"structures/', f'"{ROOT}/structures/') + '\n[[stage]]\n[[stage]]\nstart = 1\ntrain = ["decoder"]\n')
    common = [str(config), f"data.path={images}", "data.num_workers=0", "train.max_steps=3", "train.save_every=1",
              "train.batch_size=2", "train.log_every=1",
              'loss.terms=["Recon", "KL_weight=0.0001", "Contrast_weight=0.1", "Equiv_weight=0.5"]']
    rank0 = _two_identical_replicas(tmp_path / "two", common)
    after_stage_start = load_file(str(tmp_path / "two" / "checkpoints" / "step_00000001.safetensors"))
    encoder = [k for k in rank0 if k.startswith("encoder.") and rank0[k].dtype.is_floating_point]
    assert encoder and all(torch.equal(rank0[k], after_stage_start[f"model.{k}"]) for k in encoder)
    assert any(not torch.equal(rank0[k], after_stage_start[f"model.{k}"]) for k in rank0 if k.startswith("decoder."))
    header = (tmp_path / "two" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"contrast", "equiv", "stage"} <= set(header)


@pytest.mark.slow
def test_two_nodes_with_a_c10d_rendezvous_train_as_one_process(tmp_path, images):
    """Two torchrun agents as two nodes (one process each) meeting at a c10d rendezvous on
    localhost, as two machines would at the first one's address: the replicas are identical and
    equal one process with the same global batch (to Adam's rounding, as for one node)."""
    import subprocess as sp

    from helpers.ddp import SCRIPT, train_two_nodes

    common = [f"data.path={images}", "data.num_workers=0", "train.max_steps=3", "train.save_every=3",
              "train.lr=1e-4", "train.grad_clip=0", "train.log_every=1"]
    rank0, rank1 = train_two_nodes(tmp_path, common, batch=2)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = sp.run([sys.executable, SCRIPT, str(tmp_path / "one"), *common, "train.batch_size=4"],
                 cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    single = load_file(str(tmp_path / "one" / "rank0.safetensors"))
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
        torch.testing.assert_close(rank0[key], single[key], rtol=0, atol=5e-5)
    assert _losses(tmp_path / "nodes") == pytest.approx(_losses(tmp_path / "one"), rel=1e-5)


@pytest.mark.slow
def test_evaluation_split_across_two_processes_reports_what_one_process_does(tmp_path, images):
    """torchrun -eval: each process evaluates every other batch (with the batch's own seeded draws);
    rank 0 adds the sums up and writes the report, which equals one process's (float order aside)."""
    from flexvae.checkpoint import checkpoint_metadata, checkpoint_name, save_checkpoint

    cfg = tiny_cfg(tmp_path, images)
    torch.manual_seed(0)
    model, plan = model_from_config(cfg)
    ckpt = save_checkpoint(tmp_path / "run" / "checkpoints" / checkpoint_name(1), model.state_dict(),
                           checkpoint_metadata(cfg, plan, 1, 1.0))
    two_and_one(["-eval", "-c", str(TINY), "--ckpt", str(ckpt), "--input", str(images), "--set", "encode.batch_size=3",
                 "--nll-samples", "4"], tmp_path)
    a, b = (json.loads((tmp_path / run / "evaluation.json").read_text()) for run in ("two", "one"))
    assert a.pop("processes") == 2 and a["images"] == b["images"] == 12
    for section in ("reconstruction", "kl", "nll", "objective"):
        for key, value in b[section].items():
            if isinstance(value, float):
                assert a[section][key] == pytest.approx(value, rel=1e-5, abs=1e-7), (section, key)
    assert a["active_units"]["channel_activity"] == pytest.approx(b["active_units"]["channel_activity"], rel=1e-5)


@pytest.mark.slow
def test_two_processes_train_a_hierarchy_like_one(tmp_path):
    """torchrun with 2 CPU processes: the groups' noise is drawn for the global batch, so the
    replicas stay identical and match one process with the same global batch."""
    from helpers.ddp import assert_two_processes_match_one

    images = make_images(tmp_path / "img", 12)
    common = [f"data.path={images}", "data.num_workers=0", f"model.encoder={H_ENCODER}", f"model.decoder={H_DECODER}",
              "loss.objective=elbo", "train.max_steps=4", "train.save_every=4", "train.grad_accum=2", "train.lr=1e-4",
              "train.grad_clip=0", "train.log_every=1", "train.skip_spikes=true"]
    assert_two_processes_match_one(tmp_path, common, columns=("loss", "kl_x8", "kl_x16"))
