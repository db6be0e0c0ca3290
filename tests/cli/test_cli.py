"""The command line end to end: every mode, on a generated image folder.

One tiny run is trained once per module (``-t``, in a subprocess through train.py) and then
reconstructed (``-i``), encoded (``-e``, also through the installed ``flexvae`` command from
another folder) and decoded (``-d``). User mistakes must give one ``error:`` line on stderr,
a non-zero exit status and no traceback (``--debug`` shows it, in a subprocess).

Most commands run in this process through ``flexvae.cli.main`` with stdout and stderr
captured: a subprocess costs a torch import (seconds) each.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from helpers.inprocess import run_in_process
from helpers.runs import make_images as random_images
from helpers.runs import tiny

REPO = Path(__file__).resolve().parents[2]
TINY = "configs/tiny_test.toml"
READABLE = ["cats/a.png", "cats/b.png", "cats/deep/c.JPG", "cats/deep/d.jpeg", "dogs/e.png",
            "dogs/f.png", "grey.png", "wide.png"]
BROKEN = ["broken.png", "dogs/truncated.png"]


def make_images(root: Path) -> Path:
    """Small smooth images in nested folders (PNG and JPEG, grey, non-square), plus a
    truncated PNG, a text file named broken.png and a text file that is not an image."""
    rng = np.random.default_rng(0)
    for i, rel in enumerate(READABLE):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        h, w = (16 + i % 3 * 4, 24) if rel != "wide.png" else (16, 24)
        y, x = np.mgrid[0:h, 0:w]
        base = np.stack([x * 255 / w, y * 255 / h, np.full((h, w), 40.0 * (i % 6))], -1)
        array = np.clip(base + rng.normal(0, 10, base.shape), 0, 255).astype(np.uint8)
        img = Image.fromarray(array)
        img = img.convert("L") if rel == "grey.png" else img
        img.save(path, format="JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG")
    (root / "broken.png").write_text("this is not a PNG file")
    data = (root / "dogs/e.png").read_bytes()
    (root / "dogs/truncated.png").write_bytes(data[: len(data) // 2])
    (root / "notes.txt").write_text("not an image, not an input")
    return root


def run_cli(*args, cwd=REPO, program=None, expect=0, subprocess_run=False):
    """Run ``train.py`` (in this process unless ``subprocess_run``) or ``program`` (a subprocess)
    with ``args``; check the exit status unless ``expect`` is None."""
    args = [str(a) for a in args]
    if program is None and not subprocess_run:
        proc = run_in_process(args, cwd)
    else:
        command = program or [sys.executable, str(REPO / "train.py")]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny tensors: one thread is fastest
        proc = subprocess.run([*command, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    if expect is not None:
        check_rc(proc, expect)
    return proc


def check_rc(proc, expect=0):
    assert proc.returncode == expect, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


def run_many(jobs: dict[str, dict]) -> dict[str, subprocess.CompletedProcess]:
    """Run independent commands: {name: run_cli kwargs}. Subprocesses (mostly a torch import)
    run side by side while the in-process ones run here, one after another."""
    external = {name: job for name, job in jobs.items() if job.get("program") or job.get("subprocess_run")}
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 1)) as pool:
        futures = {name: pool.submit(run_cli, *job.pop("args"), expect=None, **job) for name, job in external.items()}
        results = {name: run_cli(*job.pop("args"), expect=None, **job)
                   for name, job in jobs.items() if name not in external}
        results.update({name: future.result() for name, future in futures.items()})
    return {name: results[name] for name in jobs}


def console_script() -> list[str]:
    """The installed ``flexvae`` command, or the same entry point through this Python."""
    program = Path(sys.executable).with_name("flexvae")
    if program.exists():
        return [str(program)]
    return [sys.executable, "-c", "import sys; from flexvae.cli import main; sys.exit(main())"]


def tiny_args(images: Path, run_dir: Path, *extra) -> list:
    return ["-c", TINY, "--set", f"train.out_dir={run_dir}", "--set", f"data.path={images}",
            "--set", "data.num_workers=0", *extra]


def error_line(proc) -> str:
    """The single stderr line of a user mistake; fails on a traceback or extra lines."""
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: "), lines[0]
    return lines[0]


def steps_of(run_dir: Path) -> list[int]:
    return sorted(int(p.stem.split("_")[1]) for p in (run_dir / "checkpoints").glob("step_*.safetensors"))


def metric_steps(run_dir: Path) -> list[int]:
    with open(run_dir / "metrics.csv", newline="") as fh:
        return [int(row["step"]) for row in csv.DictReader(fh)]


# ------------------------------------------------------------------ fixtures
@dataclass
class Runs:
    root: Path
    images: Path
    run: Path  # the 4-step run trained by -t
    results: dict = field(default_factory=dict)  # job name -> CompletedProcess

    def __getitem__(self, name):
        return self.results[name]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    """Every subprocess of this module that needs torch, run in three waves of parallel jobs:
    training and the jobs that need no checkpoint; then those that use the trained run;
    then those that use the outputs of the second wave."""
    root = tmp_path_factory.mktemp("cli")
    r = Runs(root, make_images(root / "images"), root / "run")
    bad = root / "bad_encoder.json"
    bad.write_text(json.dumps(["C2d_3_8_3_1_1", "NoSuchLayer_8", "C2d_8_4_3_1_1"]))
    (root / "empty_run").mkdir()
    r.results.update(run_many({
        "train": {"args": ["-t", *tiny_args(r.images, r.run)], "subprocess_run": True},
        "check": {"args": ["--check", *tiny_args(r.images, root / "unused")]},
        "layers": {"args": ["--layers"]},
        "non_finite": {"args": ["-t", *tiny_args(r.images, root / "exploding", "--set", "train.lr=1e30",
                                                 "--set", "train.save_every=1", "--set", "train.max_steps=8")]},
        "missing_folder": {"args": ["-t", *tiny_args(root / "no_such_folder", root / "run_missing")]},
        "bad_structure": {"args": ["--check", *tiny_args(r.images, root / "unused", "--set",
                                                         f"model.encoder={bad}")]},
        "no_checkpoint": {"args": ["-i", *tiny_args(r.images, root / "empty_run")]},
    }))
    check_rc(r["train"])
    shutil.copytree(r.run, root / "resumed")
    elsewhere = root / "elsewhere"
    elsewhere.mkdir()
    # names no structure, and another image size: -e must take both from the checkpoint
    (elsewhere / "other.toml").write_text("[data]\nimage_size = 64\nnum_workers = 0\n")
    r.results.update(run_many({
        "reconstruct": {"args": ["-i", *tiny_args(r.images, r.run), "--output", root / "recon"]},
        "encode": {"args": ["-e", *tiny_args(r.images, r.run)]},
        "encode_elsewhere": {"args": ["encode", "-c", "other.toml", "--ckpt", r.run, "--input", "../images",
                                      "--output", root / "npy", "--set", "encode.format=npy"],
                             "cwd": elsewhere, "program": console_script()},
        "resume": {"args": ["-t", *tiny_args(r.images, root / "resumed", "--set", "train.max_steps=6")]},
    }))
    check_rc(r["encode"])
    check_rc(r["resume"])
    r.results["resumed_metric_steps"] = metric_steps(root / "resumed")
    r.results["resumed_steps"] = steps_of(root / "resumed")
    r.results.update(run_many({
        "decode": {"args": ["-d", *tiny_args(r.images, r.run)]},
        "fresh": {"args": ["-t", *tiny_args(r.images, root / "resumed", "--set", "train.max_steps=2", "--fresh")]},
    }))
    return r


# ------------------------------------------------------------------ modes
def test_train_writes_a_complete_run(runs):
    proc, run_dir = check_rc(runs["train"]), runs.run
    assert steps_of(run_dir) == [2, 4]
    assert metric_steps(run_dir) == [1, 2, 3, 4]
    assert sorted(p.name for p in (run_dir / "samples").iterdir()) == ["step_00000002.png", "step_00000004.png"]
    assert "done: step 4" in proc.stdout
    # both unreadable files are reported, training goes on
    assert "broken.png" in proc.stderr and "truncated.png" in proc.stderr
    # the resolved config (file + overrides) is saved in the run directory
    from flexvae.config import load_config

    saved = load_config(run_dir / "config.toml")
    assert saved.train.out_dir == str(run_dir) and saved.data.path == str(runs.images)
    assert saved.data.image_size == 16 and saved.train.max_steps == 4
    assert saved == load_config(REPO / TINY, [f"train.out_dir={run_dir}", f"data.path={runs.images}",
                                              "data.num_workers=0"])


def test_reconstruct_mirrors_the_tree_with_metrics(runs):
    proc, out = check_rc(runs["reconstruct"]), runs.root / "recon"
    assert "reconstructed 8 images" in proc.stdout
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert written == sorted(Path(rel).with_suffix(".png").as_posix() for rel in READABLE)
    for path in out.rglob("*.png"):
        assert Image.open(path).size == (16, 16)
    with open(out / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["path"] for r in rows[:-1]] == sorted(READABLE)
    assert rows[-1]["path"] == "MEAN"
    psnrs = [float(r["psnr"]) for r in rows[:-1]]
    ssims = [float(r["ssim"]) for r in rows[:-1]]
    assert all(np.isfinite(psnrs)) and all(-1 <= s <= 1 for s in ssims)
    assert float(rows[-1]["psnr"]) == pytest.approx(np.mean(psnrs), abs=1e-3)
    assert float(rows[-1]["ssim"]) == pytest.approx(np.mean(ssims), abs=1e-4)


def test_encode_writes_latents_manifest_and_stats(runs):
    proc, latents = check_rc(runs["encode"]), runs.run / "latents"
    manifest = [json.loads(line) for line in (latents / "manifest.jsonl").read_text().splitlines()]
    by_path = {entry["path"]: entry for entry in manifest}
    # every input is accounted for, broken files included; notes.txt is not an input
    assert sorted(by_path) == sorted(READABLE + BROKEN)
    assert all(by_path[rel]["status"] == "failed" and by_path[rel]["reason"] for rel in BROKEN)
    raw = []
    for rel in READABLE:
        entry = by_path[rel]
        assert entry["status"] == "ok" and entry["file"] == Path(rel).with_suffix(".safetensors").as_posix()
        tensor = load_file(str(latents / entry["file"]))["latent"]
        assert list(tensor.shape) == entry["shape"] == [2, 8, 8]
        raw.append(tensor)
    stats = json.loads((latents / "latent_stats.json").read_text())
    std = torch.stack(raw).double().std(unbiased=False).item()  # scaling_factor is 1: raw latents
    assert stats["suggested_scaling_factor"] == pytest.approx(1 / std, rel=1e-4)
    assert "2 failed" in proc.stdout


def test_decode_round_trip(runs):
    proc, decoded, recon = check_rc(runs["decode"]), runs.run / "decoded", runs.root / "recon"
    assert "decoded 8 latents" in proc.stdout
    assert sorted(p.relative_to(decoded).as_posix() for p in decoded.rglob("*.png")) == \
        sorted(Path(rel).with_suffix(".png").as_posix() for rel in READABLE)
    # decode(encode(x)) is the reconstruction -i writes (up to PNG rounding)
    for path in decoded.rglob("*.png"):
        image = np.asarray(Image.open(path), dtype=np.int16)
        assert image.shape == (16, 16, 3)
        other = np.asarray(Image.open(recon / path.relative_to(decoded)), dtype=np.int16)
        assert np.abs(image - other).max() <= 1


def test_checkpoint_is_self_describing(runs):
    """``flexvae encode`` from another folder (input given relative to it), with a config that names
    no structure and a different image size: the model and its preprocessing come from the
    checkpoint alone."""
    proc, out, latents = check_rc(runs["encode_elsewhere"]), runs.root / "npy", runs.run / "latents"
    assert "step 4" in proc.stdout
    for rel in READABLE:
        array = np.load(out / Path(rel).with_suffix(".npy"), allow_pickle=False)
        stored = load_file(str(latents / Path(rel).with_suffix(".safetensors")))["latent"]
        # a second encode (other format, working folder and config) gives the same latents
        assert torch.equal(torch.from_numpy(array), stored)
    assert not list(out.rglob("*.safetensors"))


def test_check_and_layers_modes(runs):
    proc = check_rc(runs["check"])
    assert "VAERB" in proc.stdout or "ResidualBlock" in proc.stdout
    assert not (runs.root / "unused").exists()
    proc = check_rc(runs["layers"])
    for token in ("C2d", "VAERB", "VAEA", "GN", "SiLU", "UpS"):
        assert token in proc.stdout


# ------------------------------------------------------------ run lifecycle
def test_train_again_resumes_and_fresh_starts_over(runs):
    proc = runs["resume"]
    assert "resuming" in proc.stdout and "from step 4" in proc.stdout
    assert runs["resumed_steps"][-1] == 6
    assert runs["resumed_metric_steps"] == [1, 2, 3, 4, 5, 6]

    proc = check_rc(runs["fresh"])
    assert "resuming" not in proc.stdout
    assert steps_of(runs.root / "resumed") == [2]
    assert metric_steps(runs.root / "resumed") == [1, 2]


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(runs):
    proc = check_rc(runs["non_finite"], 1)
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "the loss became" in errors[0] and "train.lr" in errors[0]
    failed_at = int(re.search(r"at step (\d+)", errors[0]).group(1))
    assert failed_at >= 2
    # every step before the failing one was checkpointed; the failing one was not
    assert steps_of(runs.root / "exploding")[-1] == failed_at - 1


# ------------------------------------------------------------ user mistakes
def test_unknown_config_key_names_the_closest_key(tmp_path):
    args = tiny_args(tmp_path / "images", tmp_path / "run", "--set", "train.learning_rate=0.1")
    line = error_line(run_cli("-t", *args, expect=None))
    assert "train.learning_rate" in line and "Did you mean 'train.lr'?" in line


def test_unknown_key_in_a_config_file(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text("[train]\nmax_step = 3\n")
    line = error_line(run_cli("-t", "-c", config, expect=None))
    assert str(config) in line and "'train.max_steps'" in line


def test_wrong_type(tmp_path):
    args = tiny_args(tmp_path / "images", tmp_path / "run", "--set", "train.max_steps=many")
    line = error_line(run_cli("-t", *args, expect=None))
    assert "'train.max_steps' must be an int" in line and "'many'" in line


def test_missing_image_folder(runs):
    line = error_line(runs["missing_folder"])
    assert str(runs.root / "no_such_folder") in line and "does not exist" in line


def test_bad_structure(runs):
    line = error_line(runs["bad_structure"])
    assert "NoSuchLayer" in line and "position 2" in line and "--layers" in line


def test_no_checkpoint_found(runs):
    line = error_line(runs["no_checkpoint"])
    assert "no checkpoint found" in line and str(runs.root / "empty_run") in line


def test_debug_shows_the_traceback(tmp_path):
    args = tiny_args(tmp_path / "images", tmp_path / "run", "--set", "train.learning_rate=0.1")
    proc = run_cli("-t", *args, "--debug", expect=None, subprocess_run=True)
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "ConfigError" in proc.stderr and "train.lr" in proc.stderr


def test_exactly_one_mode_is_required():
    proc = run_cli(expect=2)
    assert "one of the arguments" in proc.stderr and "-t" in proc.stderr
    proc = run_cli("-t", "-e", expect=2)
    assert "not allowed with" in proc.stderr


def test_training_says_what_it_does_and_where_things_went(tmp_path):
    images = random_images(tmp_path / "images", 5)
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


def test_each_subcommand_lists_only_its_own_options():
    help_of = {name: run_in_process([name, "-h"], prog="flexvae").stdout for name in ("train", "encode", "mem")}
    assert "--fresh" in help_of["train"] and "--sample" not in help_of["train"] and "--ckpt" not in help_of["train"]
    assert "--sample" in help_of["encode"] and "--fresh" not in help_of["encode"]
    assert "--write" in help_of["mem"] and "--input" not in help_of["mem"]
    for text in help_of.values():
        assert "--config" in text and "--set" in text and "--device" in text
    wrong = run_in_process(["train", "--sample"], prog="flexvae")
    assert wrong.returncode == 2 and "unrecognized arguments: --sample" in wrong.stderr


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
    images = random_images(project / "images", 2)
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
                              "--set", "loss.kl_weight=0.5"])
    assert resumed.returncode == 0, resumed.stderr
    assert "note: resuming with train.max_steps = 2 (the checkpoint was trained with 1)" in resumed.stdout
    assert "note: resuming with train.lr = 0.005 (the checkpoint was trained with 0.001)" in resumed.stdout
    assert "note: resuming with loss.kl_weight = 0.5 (the checkpoint was trained with " in resumed.stdout
    again = run_in_process(["-t", *args, "--set", "train.max_steps=2", "--set", "train.lr=0.005",
                            "--set", "loss.kl_weight=0.5"])
    assert "resuming with" not in again.stdout  # the same settings: nothing to say
    out = run_in_process(["-i", *tiny(folder, run, "--input", folder, "--output", tmp_path / "out", "--labels",
                                      "folders")])
    assert out.returncode == 0
    assert ("note: --labels folders is ignored: this model takes no labels (no context token, no class latent)"
            in out.stderr)


def test_version(capsys):
    proc = run_in_process(["--version"])
    assert proc.returncode == 0 and proc.stdout.strip() == f"flexvae {__import__('flexvae').__version__}"
