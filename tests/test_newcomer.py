"""A newcomer's first hour: outputs that stay true to their checkpoint, single image files,
and a terminal that says what happened."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers.inprocess import run_in_process
from helpers.runs import make_images, tiny

REPO = Path(__file__).resolve().parents[1]


def test_encode_redoes_latents_of_another_checkpoint(tmp_path):
    images = make_images(tmp_path / "images", 4)
    for run in ("a", "b"):
        proc = run_in_process(["-t", *tiny(images, tmp_path / run, "--set", "train.max_steps=1",
                                           "--set", f"train.seed={ord(run)}")])
        assert proc.returncode == 0, proc.stderr
    out = tmp_path / "latents"
    base = ["--input", images, "--output", out]
    first = run_in_process(["-e", *tiny(images, tmp_path / "a"), *base])
    assert "encoded 4 images" in first.stdout
    again = run_in_process(["-e", *tiny(images, tmp_path / "a"), *base])
    assert "encoded 0 images" in again.stdout and "4 already done" in again.stdout
    other = run_in_process(["-e", *tiny(images, tmp_path / "b"), *base])
    assert "encoded 4 images" in other.stdout and "4 redone" in other.stdout
    assert "4 latent(s)" in other.stderr and "came from another checkpoint or other settings" in other.stderr
    entries = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    made_by = {e["made_by"]["checkpoint"] for e in entries}
    assert made_by == {str(next((tmp_path / "b" / "checkpoints").glob("*.safetensors")))}
    assert all(len(e["made_by"]["sha256"]) == 64 and e["made_by"]["step"] == 1 for e in entries)
    sampled = run_in_process(["-e", *tiny(images, tmp_path / "b"), *base, "--sample"])
    assert "4 redone" in sampled.stdout  # another setting: posterior samples instead of means


def test_reconstruct_and_encode_take_a_single_image_file(tmp_path):
    images = make_images(tmp_path / "images", 3)
    run = tmp_path / "run"
    assert run_in_process(["-t", *tiny(images, run, "--set", "train.max_steps=1")]).returncode == 0
    proc = run_in_process(["-i", *tiny(images, run, "--input", images / "1.png", "--output", tmp_path / "one")])
    assert proc.returncode == 0 and "reconstructed 1 images" in proc.stdout
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == [".flexvae-written.jsonl", "1.png", "made_by.json", "metrics.csv"]
    proc = run_in_process(["-e", *tiny(images, run, "--input", images / "2.png", "--output", tmp_path / "lat")])
    assert proc.returncode == 0 and (tmp_path / "lat" / "2.safetensors").is_file()
    # the folder of an input file is the input folder: writing there is refused
    proc = run_in_process(["-i", *tiny(images, run, "--input", images / "1.png", "--output", images)])
    assert proc.returncode == 1 and "is the input folder" in proc.stderr


def test_training_says_what_it_does_and_where_things_went(tmp_path):
    images = make_images(tmp_path / "images", 5)
    (images / "broken.png").write_text("not an image")
    run = tmp_path / "run"
    proc = run_in_process(["-t", *tiny(images, run, "--set", "train.max_steps=2")])
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("model: 4,791 parameters (encoder 2,620, decoder 2,171); gaussian latent 2 x 8 x 8")
    assert lines[1].startswith(f"data: 6 images in {images}; 4 a step (4 x 1 accumulated); steps 1 to 2")
    assert "Layer (type" not in proc.stdout  # the layer table only with --verbose
    assert lines[-1].startswith("done: step 2 in ") and f"samples in {run / 'samples'}" in lines[-1]
    assert "(latest step_00000002.safetensors)" in lines[-1] and f"metrics in {run / 'metrics.csv'}" in lines[-1]
    assert "warning: skipping unreadable image broken.png: not an image, or a format Pillow cannot read" \
        in proc.stderr.splitlines()
    verbose = run_in_process(["-t", *tiny(images, run, "--set", "train.max_steps=3", "--verbose")])
    assert "Layer (type" in verbose.stdout


def test_options_a_mode_would_ignore_are_errors():
    for args, words in ((["-e", "--side-by-side"], "--side-by-side does nothing in -e (encode); it is read by -i"),
                        (["-t", "--ckpt", "x"], "--ckpt does nothing in -t (train)"),
                        (["-mem", "--steps", "3"], "--steps does nothing in -mem (mem)"),
                        (["-i", "--fresh"], "--fresh does nothing in -i (reconstruct); it is read by -t (train)")):
        proc = run_in_process(args)
        assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
        assert proc.stderr.startswith(f"error: {words}"), proc.stderr


def test_mem_recommends_no_more_than_the_data_holds():
    from flexvae.train.memory_fit import MemResult

    result = MemResult("cpu", [1, 2], [10, 20], 0.0, 10.0, 10**6, 4096, 900, "ran", 3)
    assert result.recommended == 900
    result.limit_to(56, "data.path holds 56 images")
    assert result.recommended == 56
    assert "recommendation capped at 56: data.path holds 56 images" in result.format()
    result.limit_to(1000, "a looser limit")
    assert result.recommended == 56 and len(result.notes) == 1


def test_files_honour_the_umask(tmp_path):
    import os

    images = make_images(tmp_path / "images", 2)
    run = tmp_path / "run"
    previous = os.umask(0o027)
    try:
        assert run_in_process(["-t", *tiny(images, run, "--set", "train.max_steps=1")]).returncode == 0
    finally:
        os.umask(previous)
    written = [run / "config.toml", run / "metrics.csv", *run.glob("checkpoints/*"), *run.glob("samples/*")]
    assert len(written) >= 4
    assert {oct(p.stat().st_mode & 0o777) for p in written} == {oct(0o640)}


@pytest.mark.slow
def test_a_new_project_trains_from_any_folder(tmp_path):
    """flexvae init, then train, encode, decode and evaluate from that folder (outside the clone)."""
    import subprocess
    import sys

    project = tmp_path / "myproject"
    proc = run_in_process(["--init", project], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.relative_to(project).as_posix() for p in project.rglob("*")) == [
        "config.toml", "images", "structures", "structures/small_decoder.json", "structures/small_encoder.json"]
    again = run_in_process(["--init", project], cwd=tmp_path)
    assert again.returncode == 1 and "is not an empty folder" in again.stderr
    make_images(project / "images", 4)
    small = ["--set", "train.max_steps=2", "--set", "data.num_workers=0"]  # config.toml found in the project
    for args in (["-t", *small], ["-e", *small], ["-d", *small], ["-eval", *small, "--nll-samples", "0"]):
        proc = run_in_process(args, cwd=project)
        assert proc.returncode == 0, (args, proc.stderr)
    assert (project / "runs" / "default" / "latents" / "manifest.jsonl").is_file()
    assert (project / "runs" / "default" / "decoded" / "0.png").is_file()
    # a shipped config names its structures relative to the clone: from another folder they are
    # found among the installed presets (a subprocess, so nothing of this process helps)
    check = subprocess.run([sys.executable, "-c", "import sys; from flexvae.cli import main; sys.exit(main())",
                            "check", "-c", str(REPO / "configs" / "config.toml")], cwd=tmp_path,
                           capture_output=True, text=True, timeout=300)
    assert check.returncode == 0, check.stderr
    assert "total parameters: 188,963" in check.stdout


def test_each_subcommand_lists_only_its_own_options():
    help_of = {name: run_in_process([name, "-h"], prog="flexvae").stdout for name in ("train", "encode", "mem")}
    assert "--fresh" in help_of["train"] and "--sample" not in help_of["train"] and "--ckpt" not in help_of["train"]
    assert "--sample" in help_of["encode"] and "--fresh" not in help_of["encode"]
    assert "--write" in help_of["mem"] and "--input" not in help_of["mem"]
    for text in help_of.values():
        assert "--config" in text and "--set" in text and "--device" in text
    wrong = run_in_process(["train", "--sample"], prog="flexvae")
    assert wrong.returncode == 2 and "unrecognized arguments: --sample" in wrong.stderr


def test_reconstruct_and_decode_record_their_checkpoint(tmp_path):
    images = make_images(tmp_path / "images", 2)
    run = tmp_path / "run"
    assert run_in_process(["-t", *tiny(images, run, "--set", "train.max_steps=1")]).returncode == 0
    checkpoint = str(next((run / "checkpoints").glob("*.safetensors")))
    assert run_in_process(["-i", *tiny(images, run, "--input", images, "--output", tmp_path / "r")]).returncode == 0
    made_by = json.loads((tmp_path / "r" / "made_by.json").read_text())
    assert made_by["checkpoint"] == checkpoint and made_by["step"] == 1 and len(made_by["sha256"]) == 64
    assert run_in_process(["-e", *tiny(images, run, "--input", images, "--output", tmp_path / "z")]).returncode == 0
    assert run_in_process(["-d", *tiny(images, run, "--input", tmp_path / "z", "--output", tmp_path / "d")]).returncode == 0
    entries = [json.loads(line) for line in (tmp_path / "d" / "manifest.jsonl").read_text().splitlines()]
    assert len(entries) == 2 and all(e["made_by"]["checkpoint"] == checkpoint for e in entries)


def test_native_size_reconstructs_at_each_images_own_resolution(tmp_path):
    from PIL import Image

    images = make_images(tmp_path / "images", 2)  # 20 x 20
    Image.new("RGB", (23, 17), (200, 40, 40)).save(images / "odd.png")
    run = tmp_path / "run"
    assert run_in_process(["-t", *tiny(images, run, "--set", "train.max_steps=1")]).returncode == 0
    out = tmp_path / "native"
    proc = run_in_process(["-i", *tiny(images, run, "--input", images, "--output", out, "--native-size")])
    assert proc.returncode == 0, proc.stderr
    sizes = {p.name: Image.open(p).size for p in out.glob("*.png")}
    assert sizes == {"0.png": (20, 20), "1.png": (20, 20), "odd.png": (22, 16)}  # the tiny model halves once
    # a model with a fully connected layer takes one size only: a clear error
    flat = tmp_path / "flat"
    enc = '["C2d_3_4_3_1_1", "Flat", "Lin_?_8", "Reshape_8_1_1"]'
    dec = '["Flat", "Lin_?_768", "Reshape_3_16_16"]'
    args = tiny(images, flat, "--set", f"model.encoder={enc}", "--set", f"model.decoder={dec}")
    assert run_in_process(["-t", *args, "--set", "train.max_steps=1"]).returncode == 0
    proc = run_in_process(["-i", *args, "--input", images, "--output", tmp_path / "n2", "--native-size"])
    assert proc.returncode == 1 and "--native-size: this model cannot reconstruct 20 x 20 images" in proc.stderr


def test_train_py_mode_help_lists_only_that_mode():
    text = run_in_process(["-e", "-h"]).stdout
    assert text.startswith("usage: train.py -e") and "--sample" in text and "--fresh" not in text
    assert "--fresh" in run_in_process(["-t", "--help"]).stdout


@pytest.mark.slow
def test_plugins_beside_the_config_resolve_in_every_mode(tmp_path):
    """A plugin file named relative to its config works in -t and -i from another folder, and the
    checkpoint records it by name (a subprocess: registering a token changes the process)."""
    import subprocess
    import sys

    from flexvae.checkpoint import list_checkpoints, load_checkpoint

    project = tmp_path / "project"
    images = make_images(project / "images", 2)
    (project / "my_layers.py").write_text(
        "import torch.nn as nn\nfrom flexvae.registry import Arg, register\n\n"
        "@register('Twice', doc='multiply by two')\nclass Twice(nn.Module):\n"
        "    def forward(self, x):\n        return 2 * x\n")
    (project / "config.toml").write_text(
        f'[data]\npath = "images"\nimage_size = 16\nnum_workers = 0\n[model]\nplugins = ["my_layers.py"]\n'
        f'encoder = ["C2d_3_8_3_1_1", "Twice", "Down_?_4"]\n'
        f'decoder = ["C2d_2_8_3_1_1", "UpS_2", "C2d_?_3_3_1_1"]\n'
        f'[train]\nmax_steps = 1\nout_dir = "{(tmp_path / "run").as_posix()}"\n')
    code = ("import sys; from flexvae.cli import main\n"
            "for args in (['-t'], ['-i', '--input', sys.argv[2], '--output', sys.argv[3]]):\n"
            "    print('rc', main([*args, '-c', sys.argv[1]], prog='train.py'))\n")
    done = subprocess.run([sys.executable, "-c", code, str(project / "config.toml"), str(images),
                           str(tmp_path / "recon")], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.stdout.count("rc 0") == 2, done.stdout + done.stderr
    assert load_checkpoint(list_checkpoints(tmp_path / "run")[-1]).metadata["plugins"] == ["my_layers.py"]


def test_train_without_a_config_says_none_was_found(tmp_path):
    proc = run_in_process(["train"], cwd=tmp_path, prog="flexvae")
    assert proc.returncode == 1
    assert proc.stderr.strip() == (f"error: no config found: neither configs/config.toml nor config.toml is in "
                                   f"{tmp_path}, and the built-in defaults train on assets/photos, which is not "
                                   "here; start a project with `flexvae init DIR` (then train from DIR), or name a "
                                   "config with -c CONFIG")


def test_hints_speak_as_the_command_the_user_typed():
    bad = ["--set", 'model.encoder=["Foo_1"]']
    as_flexvae = run_in_process(["check", *bad], prog="flexvae").stderr
    as_train_py = run_in_process(["--check", *bad]).stderr
    assert "Run `flexvae layers` for the full list." in as_flexvae
    assert "Run `python train.py --layers` for the full list." in as_train_py
    from flexvae.cli import speak_as

    assert speak_as("flexvae", "lower train.batch_size (-mem finds it); -t resumes; see /tmp/a-d and x-e") == (
        "lower train.batch_size (flexvae mem finds it); flexvae train resumes; see /tmp/a-d and x-e")


def test_a_closed_pipe_ends_quietly(tmp_path):
    import subprocess
    import sys

    script = "import sys; from flexvae.cli import main; sys.exit(main(['layers']))"
    proc = subprocess.run(f"{sys.executable} -c \"{script}\" | true", shell=True, capture_output=True, text=True,
                          cwd=tmp_path)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr


def test_the_python_quickstart_works_outside_a_clone(tmp_path, monkeypatch):
    import torch

    import flexvae

    monkeypatch.chdir(tmp_path)  # no structures/ here: the shipped presets are found, as configs find them
    plan = flexvae.plan_vae("structures/small_encoder.json", "structures/small_decoder.json", (3, 32, 32))
    vae = plan.build()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    z = vae.encode_latents(x)
    assert not z.requires_grad and not vae.decode_latents(z).requires_grad
    assert not vae.sample_prior(2).requires_grad
    assert vae.encode(x).mode().requires_grad and vae.decode(z).requires_grad  # for training code
    with pytest.raises(ValueError, match="gaussian latent has no class part"):
        vae.class_probs(x)


def test_a_run_has_config_as_well_as_cfg(tmp_path):
    images = make_images(tmp_path / "images", 2)
    assert run_in_process(["-t", *tiny(images, tmp_path / "run", "--set", "train.max_steps=1")]).returncode == 0
    import flexvae

    run = flexvae.load_run(tmp_path / "run")
    assert run.config is run.cfg and run.config.train.max_steps == 1


def test_silent_conversions_get_one_note_each(tmp_path):
    from PIL import Image

    folder = tmp_path / "grey"
    folder.mkdir()
    for i in range(5):
        Image.new("L", (40, 40), color=40 * i).save(folder / f"{i}.png")
    run = tmp_path / "run"
    args = tiny(folder, run, "--set", "train.max_steps=1", "--set", "train.batch_size=16")
    proc = run_in_process(["-t", *args])
    assert proc.returncode == 0, proc.stderr
    notes = [line for line in proc.stdout.splitlines() if line.startswith("note:")]
    assert notes == [
        "note: 5 images for 16 a step: every step repeats images (lower train.batch_size to step through the data "
        "without repeats)",
        "note: 5 of 5 images are greyscale and are trained as RGB (data.channels = 3); set data.channels = 1 to "
        "train on grey",
        "note: images are downscaled to 16 x 16 (data.image_size); 5 of 5 are 40 x 40"]
    resumed = run_in_process(["-t", *args, "--set", "train.max_steps=2", "--set", "train.lr=0.005",
                              "--set", "loss.kld_weight=0.5"])
    assert resumed.returncode == 0, resumed.stderr
    assert "note: resuming with train.max_steps = 2 (the checkpoint was trained with 1)" in resumed.stdout
    assert "note: resuming with train.lr = 0.005 (the checkpoint was trained with 0.001)" in resumed.stdout
    assert "note: resuming with loss.kld_weight = 0.5 (the checkpoint was trained with " in resumed.stdout
    again = run_in_process(["-t", *args, "--set", "train.max_steps=2", "--set", "train.lr=0.005",
                            "--set", "loss.kld_weight=0.5"])
    assert "resuming with" not in again.stdout  # the same settings: nothing to say
    out = run_in_process(["-i", *tiny(folder, run, "--input", folder, "--output", tmp_path / "out", "--labels",
                                      "folders")])
    assert out.returncode == 0
    assert ("note: --labels folders is ignored: this model takes no labels (no context token, no class latent)"
            in out.stderr)


def test_verbose_without_torchinfo_prints_the_structures_table(tmp_path, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_torchinfo(name, *args, **kwargs):
        if name == "torchinfo":
            raise ImportError("No module named 'torchinfo'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torchinfo)
    images = make_images(tmp_path / "images", 4)
    proc = run_in_process(["-t", *tiny(images, tmp_path / "run", "--set", "train.max_steps=1", "--verbose")])
    assert proc.returncode == 0, proc.stderr
    assert "total parameters: 2,620" in proc.stdout and "pip install torchinfo" in proc.stdout
