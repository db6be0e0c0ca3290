"""The Stable Diffusion autoencoder: structures, weight import, agreement with diffusers."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file  # noqa: E402

from flexvae.assemble import plan_from_config
from flexvae.checkpoint import (
    load_checkpoint,  # noqa: E402
    load_run,
    model_from_checkpoint,  # noqa: E402
)
from flexvae.config import config_from_dict, load_config  # noqa: E402
from flexvae.convert_sd import import_weights, sd_structures  # noqa: E402
from flexvae.errors import CheckpointError  # noqa: E402
from helpers.inprocess import run_in_process  # noqa: E402

diffusers = pytest.importorskip(
    "diffusers", reason="diffusers is a test-only dependency (pip install -e .[test]); it is the reference here")
ROOT = Path(__file__).resolve().parents[2]
TOL = 1e-4
TINY = dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, latent_channels=2, sample_size=16)
SD = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32, latent_channels=4,
          sample_size=512, scaling_factor=0.18215)
SDXL = {**SD, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}


def make_vae(config, folder=None, seed=0):
    """A randomly initialised AutoencoderKL; every bias and norm parameter is perturbed too,
    so that a swapped GroupNorm or bias would show in the outputs."""
    levels = len(config["block_out_channels"])
    torch.manual_seed(seed)
    vae = diffusers.AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * levels,
                                  up_block_types=("UpDecoderBlock2D",) * levels, **config).eval()
    with torch.no_grad():
        for p in vae.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    if folder is not None:
        vae.save_pretrained(folder, safe_serialization=True)
    return vae


def to_original(state, levels):
    """diffusers AutoencoderKL keys -> the original SD (CompVis) layout, written independently
    of the converter: decoder levels are numbered from the output side, attention as 1x1 convs."""
    out = {}
    for key, value in state.items():
        k = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2.", key)
        k = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", k)
        k = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.",
                   lambda m: f"decoder.up.{levels - 1 - int(m[1])}.block.{m[2]}.", k)
        k = re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
                   lambda m: f"decoder.up.{levels - 1 - int(m[1])}.upsample.", k)
        k = k.replace("mid_block.resnets.0.", "mid.block_1.").replace("mid_block.resnets.1.", "mid.block_2.")
        k = k.replace("mid_block.attentions.0.", "mid.attn_1.")
        for new, old in (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")):
            k = k.replace(f".attn_1.{new}.", f".attn_1.{old}.")
        k = k.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
        if ".attn_1." in k and k.endswith(".weight") and value.dim() == 2:
            value = value[:, :, None, None]
        out[k] = value.contiguous()
    return out


def imported(src, tmp_path, name="run", **kwargs):
    path = import_weights(src, tmp_path / name / "checkpoints" / "step_00000000.safetensors", **kwargs).path
    model, cfg, plan = model_from_checkpoint(load_checkpoint(path, with_train_state=False))
    return model, cfg, plan, path


@torch.no_grad()
def assert_matches(vae, model, size, batch=2):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(batch, 3, size, size, generator=g) * 2 - 1
    ref, post = vae.encode(x).latent_dist, model.encode(x)
    z = torch.randn(ref.mean.shape, generator=g)
    ref_out, out = vae.decode(z).sample, model.decode(z)
    for name, a, b in (("mean", ref.mean, post.mean), ("logvar", ref.logvar, post.logvar), ("decoder", ref_out, out)):
        assert a.shape == b.shape, name
        assert (a - b).abs().max().item() <= TOL, f"{name}: {(a - b).abs().max().item()}"


def _tiny_folder_with(tmp_path, edit):
    make_vae(TINY, tmp_path / "vae")
    weights = tmp_path / "vae" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    edit(state)
    save_file(state, str(weights))
    return tmp_path / "vae"


def _images(folder, count, size):
    from PIL import Image

    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    for i in range(count):
        pixels = (torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"img{i}.png")
    return folder


def run_cli(*args, cwd):
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


REPO = Path(__file__).resolve().parents[2]


def test_committed_structures_are_the_generated_ones():
    enc, dec = sd_structures()
    assert json.loads((ROOT / "structures/sd_vae_encoder.json").read_text()) == enc
    assert json.loads((ROOT / "structures/sd_vae_decoder.json").read_text()) == dec
    assert sd_structures(SD) == (enc, dec)
    cfg = load_config(ROOT / "configs/sd_vae.toml")
    plan = plan_from_config(cfg, ROOT / "configs/sd_vae.toml")
    assert plan.latent_shape == (4, cfg.data.image_size // 8, cfg.data.image_size // 8)
    assert cfg.model.scaling_factor == pytest.approx(0.18215)


@pytest.mark.parametrize("layout", ["diffusers", "original", "full-sd-checkpoint"])
def test_tiny_import_matches_diffusers(tmp_path, layout):
    vae = make_vae(TINY, tmp_path / "vae")
    src = tmp_path / "vae"
    if layout != "diffusers":
        state = to_original(load_file(str(src / "diffusion_pytorch_model.safetensors")), levels=2)
        if layout == "full-sd-checkpoint":  # a whole SD model: only first_stage_model.* is the VAE
            state = {f"first_stage_model.{k}": v for k, v in state.items()}
            state["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(3)
            state["cond_stage_model.transformer.x"] = torch.zeros(2)
        src = tmp_path / "sd.safetensors"
        save_file(state, str(src))
    # The original layout has no config: groups (not visible in shapes) and image size are given.
    extra = {} if layout == "diffusers" else {"config": {"norm_num_groups": 4}, "image_size": 16}
    model, cfg, plan, path = imported(src, tmp_path, **extra)
    assert_matches(vae, model, 16)
    assert plan.data_shape == (3, 16, 16) and plan.latent_shape == (2, 8, 8)
    assert model.scaling_factor == pytest.approx(0.18215)
    assert cfg.model.encoder == sd_structures(TINY)[0]  # inline: the checkpoint rebuilds alone
    assert cfg.train.out_dir.endswith("run")


@pytest.mark.parametrize("layout", ["diffusers", "original"])
def test_variant_without_attention_or_quant_convs(tmp_path, layout):
    config = {**TINY, "latent_channels": 3, "mid_block_add_attention": False, "use_quant_conv": False,
              "use_post_quant_conv": False, "layers_per_block": 2}
    vae = make_vae(config, tmp_path / "vae", seed=1)
    src, extra = tmp_path / "vae", {}
    if layout == "original":
        src, extra = tmp_path / "vae.safetensors", {"config": {"norm_num_groups": 4}, "image_size": 16}
        save_file(to_original(vae.state_dict(), levels=2), str(src))
    model, cfg, plan, _ = imported(src, tmp_path, **extra)
    assert not any(t.startswith("VAEA") for t in cfg.model.encoder + cfg.model.decoder)
    assert cfg.model.decoder[0].startswith("C2d_3_16_3_1_1")  # no post-quant 1x1 conv
    assert plan.latent_shape == (3, 8, 8)
    assert_matches(vae, model, 16)


def test_output_may_be_a_run_folder(tmp_path):
    make_vae(TINY, tmp_path / "vae")
    result = import_weights(tmp_path / "vae" / "diffusion_pytorch_model.safetensors", tmp_path / "runs" / "x")
    assert result.path == tmp_path / "runs" / "x" / "checkpoints" / "step_00000000.safetensors"
    assert load_checkpoint(result.path).metadata["config"]["train"]["out_dir"] == (tmp_path / "runs" / "x").as_posix()


@pytest.mark.slow
def test_full_sd_config_matches_diffusers(tmp_path):
    vae = make_vae(SD, tmp_path / "vae")
    model, cfg, plan, path = imported(tmp_path / "vae", tmp_path)
    assert cfg.model.encoder == json.loads((ROOT / "structures/sd_vae_encoder.json").read_text())
    assert plan.data_shape == (3, 512, 512) and plan.latent_shape == (4, 64, 64)
    assert_matches(vae, model, 32, batch=1)
    # The original layout of the same weights gives the same checkpoint (architecture from shapes).
    original = tmp_path / "v1-5-vae.safetensors"
    save_file(to_original(vae.state_dict(), levels=4), str(original))
    other = load_checkpoint(import_weights(original, tmp_path / "orig.safetensors").path)
    mine = load_checkpoint(path)
    assert other.model_state.keys() == mine.model_state.keys()
    assert all(torch.equal(other.model_state[k], v) for k, v in mine.model_state.items())
    assert other.metadata["encoder"] == mine.metadata["encoder"]


@pytest.mark.slow
def test_sdxl_config_needs_only_configuration(tmp_path):
    vae = make_vae(SDXL, tmp_path / "vae", seed=3)
    model, cfg, plan, _ = imported(tmp_path / "vae", tmp_path)
    assert model.scaling_factor == pytest.approx(0.13025) and cfg.model.scaling_factor == pytest.approx(0.13025)
    assert cfg.model.encoder == sd_structures()[0] and cfg.model.decoder == sd_structures()[1]
    assert plan.data_shape == (3, 1024, 1024)
    assert_matches(vae, model, 16, batch=1)


def test_extra_missing_and_wrong_shape_keys_are_listed(tmp_path):
    def edit(state):
        state["encoder.extra_layer.weight"] = torch.zeros(1)
        del state["decoder.conv_out.bias"]
        state["encoder.conv_in.weight"] = torch.zeros(8, 3, 5, 5)

    src = _tiny_folder_with(tmp_path, edit)
    with pytest.raises(CheckpointError) as info:
        import_weights(src, tmp_path / "out.safetensors")
    message = str(info.value)
    assert "1 unexpected key: encoder.extra_layer.weight" in message
    assert "1 missing key: decoder.conv_out.bias" in message
    assert "1 key with the wrong shape: encoder.conv_in.weight (8, 3, 5, 5) (expected (8, 3, 3, 3))" in message
    assert not (tmp_path / "out.safetensors").exists()


def test_config_that_does_not_fit_the_weights_lists_the_first_keys(tmp_path):
    src = _tiny_folder_with(tmp_path, lambda state: None)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "layers_per_block": 3}))
    with pytest.raises(CheckpointError, match=r"missing keys: .*\.\.\. and \d+ more"):
        import_weights(src, tmp_path / "out.safetensors")


def test_unsupported_sources_are_refused(tmp_path):
    (tmp_path / "vae.ckpt").write_bytes(b"not read")
    with pytest.raises(CheckpointError, match="pickle"):
        import_weights(tmp_path / "vae.ckpt", tmp_path / "out.safetensors")
    save_file({"something.else": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match="not a Stable Diffusion VAE"):
        import_weights(tmp_path / "other.safetensors", tmp_path / "out.safetensors")
    src = _tiny_folder_with(tmp_path, lambda state: None)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "act_fn": "relu"}))
    with pytest.raises(CheckpointError, match="act_fn"):
        import_weights(src, tmp_path / "out.safetensors")


@pytest.mark.slow
def test_cli_import_then_encode_decode_reconstruct(tmp_path, capsys):
    from flexvae.cli import main

    make_vae(TINY, tmp_path / "vae")
    images = _images(tmp_path / "images", 3, 16)
    ckpt = tmp_path / "runs" / "sd" / "checkpoints" / "step_00000000.safetensors"
    result = run_cli("--import-weights", str(tmp_path / "vae"), "--output", str(ckpt), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "imported" in result.stdout and ckpt.is_file()
    run = tmp_path / "runs" / "sd"
    result = run_cli("-e", "--ckpt", str(run), "--input", str(images), "--output", str(tmp_path / "latents"),
                     "--device", "cpu", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    latents = sorted((tmp_path / "latents").glob("*.safetensors"))
    assert len(latents) == 3
    assert main(["-d", "--ckpt", str(run), "--input", str(tmp_path / "latents"), "--output",
                 str(tmp_path / "decoded"), "--device", "cpu"], prog="train.py") == 0
    assert len(list((tmp_path / "decoded").rglob("*.png"))) == 3
    assert main(["reconstruct", "--ckpt", str(run), "--input", str(images), "--output",
                 str(tmp_path / "recon"), "--device", "cpu"]) == 0
    # The subcommand form and a mistake: one clear line, no traceback.
    assert main(["import-weights", str(tmp_path / "vae"), "--output", str(tmp_path / "b.safetensors")]) == 0
    capsys.readouterr()
    assert main(["--import-weights", str(images)], prog="train.py") == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "diffusers VAE folder needs config.json" in err


def test_fine_tuning_continues_from_the_imported_weights(tmp_path):
    from flexvae.train.trainer import train

    make_vae({**TINY, "sample_size": 32}, tmp_path / "vae")
    run = tmp_path / "run"
    imported_state = load_checkpoint(import_weights(
        tmp_path / "vae", run / "checkpoints" / "step_00000000.safetensors").path).model_state
    enc, dec = sd_structures(TINY)
    cfg = config_from_dict({
        "data": {"path": str(_images(tmp_path / "images", 4, 32)), "image_size": 32, "num_workers": 0},
        "model": {"encoder": enc, "decoder": dec, "scaling_factor": 0.18215},
        "loss": {"kl_weight": 1e-6},
        "train": {"batch_size": 2, "max_steps": 2, "lr": 1e-12, "weight_decay": 0.0, "out_dir": str(run),
                  "device": "cpu", "save_every": 2, "sample_every": 2, "log_every": 1},
    })
    last = train(cfg, quiet=True)
    assert last.name == "step_00000002.safetensors"
    trained = load_checkpoint(last).model_state
    # An lr of 1e-12 barely moves the weights: they are the imported ones, not a random start.
    assert max((trained[k] - v).abs().max().item() for k, v in imported_state.items()) < 1e-6


# ------------------------------------------------------------------ export
def test_export_to_diffusers_round_trips_a_fine_tuned_model(tmp_path):
    """Import a tiny AutoencoderKL, change its weights (a stand-in for fine-tuning), export it:
    diffusers loads the folder and its outputs equal flexvae's."""
    from helpers.inprocess import run_in_process

    make_vae({**TINY, "mid_block_add_attention": True}, tmp_path / "vae")
    _, _, _, path = imported(tmp_path / "vae", tmp_path)
    ckpt = load_checkpoint(path, with_train_state=False)
    model, _, _ = model_from_checkpoint(ckpt)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.01).add_(0.01)
    from flexvae.checkpoint import save_checkpoint

    save_checkpoint(path, model.state_dict(), ckpt.metadata)
    result = run_in_process(["--export", "--ckpt", str(path), "--output", str(tmp_path / "out")], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    exported = diffusers.AutoencoderKL.from_pretrained(tmp_path / "out").eval()
    assert_matches(exported, model, 16)
    assert exported.config.scaling_factor == pytest.approx(0.18215)
    again = run_in_process(["--export", "--ckpt", str(path), "--output", str(tmp_path / "out")], cwd=tmp_path)
    assert again.returncode != 0 and "exists and is not an empty folder" in again.stderr


def test_export_refuses_a_model_without_the_sd_structure(tmp_path):
    from helpers.inprocess import run_in_process
    from helpers.runs import make_images, tiny

    images = make_images(tmp_path / "images", 4)
    run = tmp_path / "run"
    assert run_in_process(["-t", *tiny(images, run, "--set", "train.max_steps=1")]).returncode == 0
    result = run_in_process(["--export", "--ckpt", str(run), "--output", str(tmp_path / "out")])
    assert result.returncode != 0
    assert result.stderr.startswith("error: ") and "Stable Diffusion autoencoder's structure" in result.stderr
    assert not (tmp_path / "out").exists()


def test_import_writes_its_structures_and_training_says_it_starts_from_them(tmp_path):
    from flexvae.build import as_specs

    make_vae({**TINY, "sample_size": 32}, tmp_path / "vae")
    run = tmp_path / "run"
    result = run_in_process(["--import-weights", tmp_path / "vae", "--output", run], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    encoder, decoder = run / "structures" / "encoder.json", run / "structures" / "decoder.json"
    assert f"note: structures: {encoder} and {decoder}" in result.stdout
    enc, dec = sd_structures(TINY)
    assert [s.text for s in as_specs(str(encoder))] == [s.text for s in as_specs(enc)]
    assert [s.text for s in as_specs(str(decoder))] == [s.text for s in as_specs(dec)]
    images = _images(tmp_path / "images", 2, 32)
    result = run_in_process(["-t", "--set", f"model.encoder={encoder}", "--set", f"model.decoder={decoder}",
                             "--set", "model.scaling_factor=0.18215", "--set", "data.image_size=32",
                             "--set", f"data.path={images}", "--set", f"train.out_dir={run}",
                             "--set", "train.max_steps=1", "--set", "train.batch_size=2",
                             "--set", "data.num_workers=0", "--set", "train.device=cpu"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (f"starting from the imported weights in {run / 'checkpoints' / 'step_00000000.safetensors'} "
            "(from diffusion_pytorch_model.safetensors, diffusers layout)") in result.stdout


def test_ckpt_naming_a_diffusers_folder_says_to_import_it(tmp_path):
    make_vae(TINY, tmp_path / "vae")
    result = run_in_process(["-i", "--ckpt", tmp_path / "vae", "--input", _images(tmp_path / "images", 1, 16),
                             "--output", tmp_path / "out"], cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {tmp_path / 'vae'} looks like a diffusers model folder, not a flexvae run; convert it once with "
        f"`python train.py --import-weights {tmp_path / 'vae'} --output runs/NAME`, then use --ckpt runs/NAME")


def test_import_never_replaces_a_file_of_the_users(tmp_path):
    make_vae(TINY, tmp_path / "vae")
    mine = tmp_path / "mine.safetensors"
    mine.write_bytes(b"my own weights")
    result = run_in_process(["--import-weights", tmp_path / "vae", "--output", mine], cwd=tmp_path)
    assert result.returncode == 1 and mine.read_bytes() == b"my own weights"
    assert "1 file would be replaced that is not flexvae's output" in result.stderr
    again = tmp_path / "run" / "checkpoints" / "step_00000000.safetensors"
    for _ in range(2):  # its own earlier import it replaces
        result = run_in_process(["--import-weights", tmp_path / "vae", "--output", again], cwd=tmp_path)
        assert result.returncode == 0, result.stderr


@pytest.mark.usefixtures("in_repo")
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
