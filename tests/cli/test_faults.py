"""Nothing lost, nothing hangs, no traceback: the faults and odd inputs real users meet, through
the command line."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from flexvae.checkpoint import list_checkpoints, load_checkpoint, load_model
from flexvae.errors import CheckpointError
from flexvae.files import RunLock
from helpers.inprocess import run_in_process
from helpers.runs import make_images, tiny

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny_test.toml"


def one_error(proc, expect: int = 1) -> str:
    """The single ``error:`` line of a failed command (no traceback, nothing else on stderr
    but warnings)."""
    assert proc.returncode == expect, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    return errors[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-step run (checkpoints at 1 and 2) and its images."""
    root = tmp_path_factory.mktemp("hard")
    images = make_images(root / "images")
    run = root / "run"
    proc = run_in_process(["-t", *tiny(images, run, "--set", "train.max_steps=2", "--set", "train.save_every=1")])
    assert proc.returncode == 0, proc.stderr
    return {"root": root, "images": images, "run": run}


# ------------------------------------------------------------------ 4. faults end in one line
def _disk_full(monkeypatch, after: int = 0):
    """Every atomic write after the first ``after`` fails as on a full disk."""
    import flexvae.files as files

    real, calls = files.fsync_path, {"n": 0}

    def full(path):
        calls["n"] += 1
        if calls["n"] > after:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path)

    monkeypatch.setattr(files, "fsync_path", full)


def _temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


# ------------------------------------------------------------------ 6. checkpoint metadata is untrusted
def _rewrite(src: Path, dst: Path, change) -> Path:
    with safe_open(str(src), "pt") as f:
        header, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    meta = json.loads(header["flexvae"])
    change(meta)
    save_file(tensors, str(dst), metadata={**header, "flexvae": json.dumps(meta)})
    return dst


# ------------------------------------------------------------------ a real full disk
def _fill(folder: Path, leave: int = 0) -> Path:
    """Fill the file system of ``folder`` up to ``leave`` bytes; the filler file's path."""
    filler = folder / "filler"
    with open(filler, "ab", buffering=0) as fh:
        block = b"\0" * 4096
        try:
            while True:
                fh.write(block)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    if leave:
        os.truncate(filler, max(0, filler.stat().st_size - leave))
    return filler


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs (root only, as CI runs), else skipped: see the library-error tests below."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("mounting a small file system needs root")
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


# ------------------------------------------------------------------ 1. never destroy user data
@pytest.mark.parametrize("mode", ["-i", "-e", "-d"])
def test_outputs_never_overwrite_or_reread_the_inputs(trained, tmp_path, mode):
    folder = tmp_path / "in"
    make_images(folder, 2)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    base = tiny(trained["images"], trained["run"], "--input", folder)
    line = one_error(run_in_process([mode, *base, "--output", folder]))
    assert "is the input folder" in line
    line = one_error(run_in_process([mode, *base, "--output", folder / "out"]))
    assert "inside the input folder" in line
    line = one_error(run_in_process([mode, *base, "--output", tmp_path]))
    assert "holds the input folder" in line
    (tmp_path / "file.txt").write_text("mine")
    line = one_error(run_in_process([mode, *base, "--output", tmp_path / "file.txt"]))
    assert "is an existing file" in line
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert (tmp_path / "file.txt").read_text() == "mine"


@pytest.mark.parametrize("value", ["", ".", "  "])
def test_out_dir_must_name_a_folder(trained, value):
    line = one_error(run_in_process(["-t", *tiny(trained["images"], trained["run"], "--set",
                                                 f"train.out_dir={value}")]))
    assert "'train.out_dir' must be a folder name" in line


def test_fresh_moves_the_previous_run_aside_and_touches_nothing_else(trained, tmp_path):
    run = tmp_path / "run"
    args = tiny(trained["images"], run, "--set", "train.max_steps=2", "--set", "train.save_every=1")
    assert run_in_process(["-t", *args]).returncode == 0
    before = {p.relative_to(run).as_posix(): p.read_bytes() for p in run.rglob("*") if p.is_file()
              and p.name not in (".flexvae.lock", ".flexvae-written.jsonl")}  # the lock and the record stay
    mine = {run / "notes.txt": "my notes", run / "samples" / "favourite.png": "not ours",
            run / "checkpoints" / "keep.safetensors": "a file of mine"}
    for path, text in mine.items():
        path.write_text(text)
    proc = run_in_process(["-t", *args, "--fresh"])
    assert proc.returncode == 0, proc.stderr
    assert "--fresh: moved the previous run's 2 checkpoint(s), 1 sample grid(s), metrics.csv to " in proc.stdout
    assert all(path.read_text() == text for path, text in mine.items())
    assert [p.name for p in list_checkpoints(run)] == ["step_00000001.safetensors", "step_00000002.safetensors"]
    (aside,) = (run / "previous").iterdir()
    assert {p.relative_to(aside).as_posix(): p.read_bytes() for p in aside.rglob("*") if p.is_file()} == before


def test_a_config_toml_flexvae_did_not_write_is_never_replaced(trained, tmp_path):
    (tmp_path / "config.toml").write_text("# my own project config\n[train]\nlr = 0.1\n")
    line = one_error(run_in_process(["-t", *tiny(trained["images"], tmp_path)]))
    assert "was not written by flexvae" in line
    assert (tmp_path / "config.toml").read_text().startswith("# my own project config")


# ------------------------------------------------------------------ 2. one writer per run directory
def test_a_second_training_on_the_same_run_directory_refuses(trained, tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from flexvae.files import RunLock; "
                               "lock = RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(60)",
         str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        line = one_error(run_in_process(["-t", *tiny(trained["images"], tmp_path)]))
        assert f"is in use by another flexvae process (pid {holder.pid})" in line
        assert not list_checkpoints(tmp_path)
    finally:
        holder.kill()
        holder.wait()
    # the lock died with its process: the next run goes ahead
    proc = run_in_process(["-t", *tiny(trained["images"], tmp_path, "--set", "train.max_steps=1")])
    assert proc.returncode == 0, proc.stderr
    with pytest.raises(BlockingIOError):  # and a finished run holds nothing: take and hold it
        lock = RunLock(tmp_path).acquire()
        RunLock(tmp_path).acquire()
    lock.release()


# ------------------------------------------------------------------ 3. resume is seamless
def test_resume_after_a_hard_kill_cuts_metrics_and_stale_temporaries(trained, tmp_path):
    run = tmp_path / "run"
    args = tiny(trained["images"], run, "--set", "train.save_every=2", "--set", "train.log_every=1")
    assert run_in_process(["-t", *args, "--set", "train.max_steps=3"]).returncode == 0
    # as a hard kill after step 3 would leave it: the last checkpoint is step 2, metrics go to 3,
    # and a checkpoint write was cut short
    list_checkpoints(run)[-1].unlink()  # step 3 (the final save)
    stale = [run / "checkpoints" / ".step_00000004.safetensors.0a1b2c3d.tmp",
             run / "checkpoints" / "step_00000004.safetensors.tmp-4242",  # an older flexvae's name
             run / "samples" / ".step_00000004.png.deadbeef.tmp"]
    for path in stale:
        path.write_bytes(b"partial")
    proc = run_in_process(["-t", *args, "--set", "train.max_steps=5"])
    assert proc.returncode == 0, proc.stderr
    steps = [int(line.split(",")[0]) for line in (run / "metrics.csv").read_text().splitlines()[1:]]
    assert steps == [1, 2, 3, 4, 5]
    assert not any(path.exists() for path in stale)


def test_fp16_resume_is_exact_and_keeps_the_gradient_scaler(trained, tmp_path):
    from flexvae.config import load_config
    from flexvae.train.trainer import Trainer

    def run(out, steps):
        cfg = load_config(TINY, [f"train.out_dir={out}", f"data.path={trained['images']}", "data.num_workers=0",
                                 "train.device=cpu", "train.precision=fp16", f"train.max_steps={steps}",
                                 "train.save_every=2", "train.schedule=constant"])
        trainer = Trainer(cfg, TINY, quiet=True)
        trainer.train()
        return trainer

    straight = run(tmp_path / "a", 4)
    run(tmp_path / "b", 2)
    resumed = run(tmp_path / "b", 4)
    a, b = load_checkpoint(list_checkpoints(tmp_path / "a")[-1]), load_checkpoint(list_checkpoints(tmp_path / "b")[-1])
    assert a.train_state["scaler"] == b.train_state["scaler"]
    assert a.train_state["scaler"]["scale"] == straight.runtime.scaler.get_scale()
    for key in a.model_state:
        assert torch.equal(a.model_state[key], b.model_state[key]), key
    assert resumed.runtime.scaler.get_scale() == straight.runtime.scaler.get_scale()


def test_disk_full_while_training_keeps_the_previous_checkpoint(trained, tmp_path, monkeypatch):
    run = tmp_path / "run"
    args = tiny(trained["images"], run, "--set", "train.save_every=1")
    assert run_in_process(["-t", *args, "--set", "train.max_steps=1"]).returncode == 0
    before = list_checkpoints(run)[-1].read_bytes()
    _disk_full(monkeypatch)
    line = one_error(run_in_process(["-t", *args, "--set", "train.max_steps=3"]))
    assert line.startswith(f"error: {run}") and line.endswith("No space left on device")
    assert [p.name for p in list_checkpoints(run)] == ["step_00000001.safetensors"]
    assert list_checkpoints(run)[-1].read_bytes() == before
    assert _temporaries(run) == []


@pytest.mark.parametrize("mode", ["-i", "-e"])
def test_disk_full_while_writing_outputs_is_one_line(trained, tmp_path, monkeypatch, mode):
    _disk_full(monkeypatch)
    out = tmp_path / "out"
    line = one_error(run_in_process([mode, *tiny(trained["images"], trained["run"], "--input", trained["images"],
                                                 "--output", out)]))
    assert line.endswith("No space left on device") and str(out) in line
    assert _temporaries(out) == []


def test_an_interrupted_encode_keeps_the_manifest_of_what_it_finished(trained, tmp_path, monkeypatch):
    import flexvae.inference.encode as inference

    real, batches = inference.save_latent, {"n": 0}

    def failing(tensor, path, fmt, codes=None, sync_dir=True):
        if batches["n"] >= 2:
            raise OSError(errno.EIO, "Input/output error", str(path))
        batches["n"] += 1
        real(tensor, path, fmt, codes, sync_dir)

    monkeypatch.setattr(inference, "save_latent", failing)
    out = tmp_path / "latents"
    args = ["-e", *tiny(trained["images"], trained["run"], "--input", trained["images"], "--output", out,
                         "--set", "encode.batch_size=2")]
    one_error(run_in_process(args))
    manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [e["status"] for e in manifest] == ["ok", "ok"]
    monkeypatch.setattr(inference, "save_latent", real)
    proc = run_in_process(args)
    assert proc.returncode == 0 and "2 already done" in proc.stdout and "encoded 4 images" in proc.stdout


# ------------------------------------------------------------------ 5. odd files and values
@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_special_files_are_skipped_without_being_opened(trained, tmp_path):
    folder = make_images(tmp_path / "images", 3)
    os.mkfifo(folder / "x.png")  # opening it for reading would block forever
    started = time.monotonic()
    for mode, out in (("-i", "recon"), ("-e", "latents")):
        proc = run_in_process([mode, *tiny(folder, trained["run"], "--input", folder, "--output", tmp_path / out)])
        assert proc.returncode == 0, proc.stderr
        assert "x.png" in proc.stderr and "not a regular file (a FIFO)" in proc.stderr
    proc = run_in_process(["-t", *tiny(folder, tmp_path / "run", "--set", "train.max_steps=1")])
    assert proc.returncode == 0 and "x.png" in proc.stderr
    assert time.monotonic() - started < 60
    line = one_error(run_in_process(["-t", "-c", folder / "x.png"]))
    assert "is not a regular file" in line
    line = one_error(run_in_process(["-t", "-c", "/dev/zero"]))
    assert "is not a regular file" in line
    line = one_error(run_in_process(["-i", *tiny(folder, trained["run"], "--ckpt", folder / "x.png", "--input",
                                                 folder, "--output", tmp_path / "o")]))
    assert "not a regular file" in line


def test_decompression_bombs_are_broken_files(trained, tmp_path, monkeypatch):
    import flexvae.data.images as images

    folder = make_images(tmp_path / "images", 2)
    Image.new("RGB", (64, 64)).save(folder / "bomb.png")
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 40 * 40)
    proc = run_in_process(["-i", *tiny(folder, trained["run"], "--input", folder, "--output", tmp_path / "out")])
    assert proc.returncode == 0 and "bomb.png" in proc.stderr and "more than the 1,600" in proc.stderr
    assert "reconstructed 2 images (1 unreadable skipped)" in proc.stdout


def test_a_mode_that_reads_no_input_fails_and_counts(trained, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "a.png").write_text("not an image")
    (folder / "b.png").write_bytes(b"\x89PNG\r\n")
    for mode in ("-i", "-e"):
        line = one_error(run_in_process([mode, *tiny(folder, trained["run"], "--input", folder,
                                                     "--output", tmp_path / mode)]))
        assert "not one of the 2" in line


@pytest.mark.parametrize("structure, words", [
    (["1000000000000*Id"], "repeat count 100000000000... is too large"),
    (["1000*Id"] * 5, "unrolls to 5,000 layers"),
    (["C2d_3_" + "9" * 5000 + "_3_1_1"], "is too large (at most 2147483647"),
])
def test_structures_are_bounded(trained, tmp_path, structure, words):
    path = tmp_path / "enc.json"
    path.write_text(json.dumps(structure))
    line = one_error(run_in_process(["--check", "-c", TINY, "--set", f"model.encoder={path}"]))
    assert words in line and len(line) < 400


@pytest.mark.parametrize("content, words", [
    (b"\xff\xfe[]", "not UTF-8 text"),
    (b"[" * 100000 + b"]" * 100000, "nested too deeply"),
    (b"[" + b"9" * 5000 + b"]", "not a usable JSON value"),
])
def test_unreadable_structure_files_are_one_line(tmp_path, content, words):
    path = tmp_path / "enc.json"
    path.write_bytes(content)
    line = one_error(run_in_process(["--check", "-c", TINY, "--set", f"model.encoder={path}"]))
    assert words in line


@pytest.mark.parametrize("args, words", [
    (["--device", "foo"], "device 'foo' is not one of"),
    (["--set", "train.seed=9223372036854775808"], "'train.seed' must be between"),
    (["--set", "train.out_dir=/proc/no/such/folder"], "error: /proc/no: No such file or directory"),
    (["--set", f"train.out_dir=runs/{'x' * 300}"], "File name too long"),
])
def test_bad_values_are_one_line(trained, args, words):
    line = one_error(run_in_process(["-t", *tiny(trained["images"], trained["run"]), *args]))
    assert words in line


def test_import_weights_config_must_be_an_object(tmp_path):
    source = tmp_path / "vae"
    source.mkdir()
    (source / "config.json").write_text("[1, 2, 3]")
    save_file({"x": torch.zeros(1)}, str(source / "diffusion_pytorch_model.safetensors"))
    line = one_error(run_in_process(["--import-weights", source, "--output", tmp_path / "c.safetensors"]))
    assert "config.json holds a JSON object, found list" in line
    (source / "config.json").write_text('{"block_out_channels": "many", "layers_per_block": 1000000}')
    line = one_error(run_in_process(["--import-weights", source, "--output", tmp_path / "c.safetensors"]))
    assert "block_out_channels must be a list" in line and "layers_per_block must be a whole number" in line


@pytest.mark.parametrize("change, words", [
    (lambda m: m.pop("data_shape"), "'data_shape' must be"),
    (lambda m: m.update(scaling_factor="x"), "'scaling_factor' must be a positive number"),
    (lambda m: m.update(encoder="C2d"), "'encoder' must be a list of token strings"),
    (lambda m: m.update(output=3), "'output' must be"),
    (lambda m: m.update(step=-1), "'step' must be"),
    (lambda m: m.update(format=99), "unsupported checkpoint format 99"),
    (lambda m: m["config"]["train"].update(lr="fast"), "'train.lr' must be a float"),
    (lambda m: m.update(data_shape=[3, 10**9, 10**9]), "'data_shape' must be"),
])
def test_corrupt_metadata_is_a_checkpoint_error(trained, tmp_path, change, words):
    bad = _rewrite(list_checkpoints(trained["run"])[-1], tmp_path / "bad.safetensors", change)
    with pytest.raises(CheckpointError, match=words.replace("(", r"\(").replace("'", "'")):
        load_model(bad)
    line = one_error(run_in_process(["-i", "-c", TINY, "--ckpt", bad, "--input", trained["images"],
                                     "--output", tmp_path / "out"]))
    assert words in line


def test_a_structure_larger_than_its_weights_is_refused_before_allocation(trained, tmp_path, monkeypatch):
    """A small file whose stored structure asks for a 200-million-parameter layer: the meta-device
    check against the stored tensors fails, and no real module is built."""
    from flexvae.build import VAEPlan

    def huge(meta):
        meta["encoder"] = ["C2d_3_100000_3_1_1", "C2d_?_4_3_1_1", "Down_?_4"]
    bad = _rewrite(list_checkpoints(trained["run"])[-1], tmp_path / "huge.safetensors", huge)
    assert bad.stat().st_size < 1_000_000
    built = []
    real_build = VAEPlan.build
    monkeypatch.setattr(VAEPlan, "build", lambda self, device=None, *a, **k: (
        built.append(str(device)), real_build(self, device, *a, **k))[1])
    with pytest.raises(CheckpointError, match="do not match the stored structure"):
        load_model(bad)
    assert built == ["meta"]


# ------------------------------------------------------------------ 7. NaN latents, Ctrl-C
def test_decode_counts_nan_and_inf_latents(trained, tmp_path):
    latents = tmp_path / "latents"
    proc = run_in_process(["-e", *tiny(trained["images"], trained["run"], "--input", trained["images"],
                                       "--output", latents)])
    assert proc.returncode == 0, proc.stderr
    first = sorted(latents.glob("*.safetensors"))[0]
    with safe_open(str(first), "pt") as f:
        latent = f.get_tensor("latent")
    latent.view(-1)[:3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    save_file({"latent": latent}, str(first))
    out = tmp_path / "decoded"
    proc = run_in_process(["-d", *tiny(trained["images"], trained["run"], "--input", latents, "--output", out)])
    assert proc.returncode == 0, proc.stderr
    assert f"{first}: 3 of {latent.numel()} latent values are NaN or infinite" in proc.stderr
    assert "1 held NaN or infinite values" in proc.stdout
    entries = {e["path"]: e for e in map(json.loads, (out / "manifest.jsonl").read_text().splitlines())}
    assert entries[first.name]["non_finite"] == 3
    assert sum(e["non_finite"] for e in entries.values()) == 3


def test_ctrl_c_exits_130_after_saving(trained, tmp_path, monkeypatch):
    from flexvae.train import trainer as trainer_module

    real = trainer_module.train_step

    def interrupt(runtime, batches, optimizer, cfg, step, *args, **kwargs):
        if step == 2:
            raise KeyboardInterrupt
        return real(runtime, batches, optimizer, cfg, step, *args, **kwargs)

    monkeypatch.setattr(trainer_module, "train_step", interrupt)
    run = tmp_path / "run"
    line = one_error(run_in_process(["-t", *tiny(trained["images"], run, "--set", "train.max_steps=4")]), expect=130)
    assert "interrupted at step 2" in line
    assert load_checkpoint(list_checkpoints(run)[-1]).step == 2


def test_non_finite_loss_says_which_checkpoint_is_kept(trained, tmp_path):
    run = tmp_path / "run"
    args = tiny(trained["images"], run, "--set", "train.lr=1e30", "--set", "train.max_steps=20",
                "--set", "train.grad_clip=0", "--set", "train.save_every=1")
    line = one_error(run_in_process(["-t", *args]))
    assert "the loss became" in line
    saved = list_checkpoints(run)
    if saved:
        assert f"the last checkpoint ({saved[-1].name}) is kept" in line
    else:
        assert "no checkpoint had been written yet" in line


@pytest.mark.slow
def test_sigterm_saves_like_ctrl_c_and_exits_143(trained, tmp_path):
    import signal

    run = tmp_path / "run"
    args = [str(a) for a in tiny(trained["images"], run, "--set", "train.max_steps=100000", "--set",
                                 "train.log_every=1", "--set", "train.save_every=100000")]
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), "-t", *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (run / "metrics.csv").is_file() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    line = [l for l in err.splitlines() if l.startswith("error:")][-1]
    assert line.startswith("error: terminated (SIGTERM) at step ") and "checkpoint saved" in line
    step = int(line.split("at step ")[1].split(";")[0])
    assert load_checkpoint(list_checkpoints(run)[-1]).step == step > 0


def test_error_lines_escape_every_line_break_python_knows():
    """NEL (\\x85) and the Unicode line and paragraph separators break lines too."""
    from flexvae.cli import one_line

    message = one_line("key 'a\x85b\u2028c\u2029d\ne\x1c'")
    assert len(message.splitlines()) == 1
    assert message == "key 'a\\x85b\\u2028c\\u2029d\\x0ae\\x1c'"


def test_a_structure_path_with_a_nul_character_is_one_error():
    from flexvae.build import plan_vae
    from flexvae.errors import StructureError

    with pytest.raises(StructureError, match="is not a file name"):
        plan_vae("enc\x00.json", ["C2d_?_3_3_1_1"], (3, 8, 8))


def test_a_full_disk_in_every_writing_mode_is_one_line_and_keeps_the_checkpoint(trained, small_disk):
    run = small_disk / "run"
    args = tiny(trained["images"], run, "--set", "train.save_every=1")
    assert run_in_process(["-t", *args, "--set", "train.max_steps=1"]).returncode == 0
    checkpoint = list_checkpoints(run)[-1]
    before = checkpoint.read_bytes()
    filler = _fill(small_disk, leave=24 * 1024)  # room for the metrics and a sample grid, not a checkpoint
    line = one_error(run_in_process(["-t", *args, "--set", "train.max_steps=3"]))
    assert line.startswith(f"error: {run / 'checkpoints'}") and line.endswith(".safetensors: No space left on device")
    assert list_checkpoints(run) == [checkpoint] and checkpoint.read_bytes() == before
    assert _temporaries(run) == []
    os.truncate(filler, 0)
    _fill(small_disk)
    for mode, extra in (("-e", ["--input", trained["images"]]), ("-i", ["--input", trained["images"]]),
                        ("-e", ["--input", trained["images"], "--set", "encode.format=webdataset"]),
                        ("-eval", ["--input", trained["images"], "--nll-samples", "0"])):
        out = small_disk / f"out{mode}{len(extra)}"
        line = one_error(run_in_process([mode, *args, *extra, "--output", out]))
        assert "No space left on device" in line, (mode, line)
        assert _temporaries(small_disk) == []
    filler.unlink()
    latents = small_disk / "latents"
    assert run_in_process(["-e", *args, "--input", trained["images"], "--output", latents]).returncode == 0
    _fill(small_disk)
    line = one_error(run_in_process(["-d", *args, "--input", latents, "--output", small_disk / "decoded"]))
    assert "No space left on device" in line
    (small_disk / "filler").unlink()
    proc = run_in_process(["-t", *args, "--set", "train.max_steps=3"])  # the run goes on from step 1
    assert proc.returncode == 0, proc.stderr
    assert [p.name for p in list_checkpoints(run)][-1] == "step_00000003.safetensors"


@pytest.mark.parametrize("mode", ["-t", "-e"])
def test_safetensors_own_disk_full_error_is_one_line(trained, tmp_path, monkeypatch, mode):
    """Where no small file system can be mounted: safetensors' SafetensorError as it reads on a full disk."""
    import safetensors.torch
    from safetensors import SafetensorError

    import flexvae.checkpoint.format as checkpoint_format

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(checkpoint_format, "save_file", full)
    monkeypatch.setattr(safetensors.torch, "save_file", full)
    run = tmp_path / "run"
    extra = ["--set", "train.max_steps=1"] if mode == "-t" else ["--ckpt", trained["run"], "--input",
                                                                  trained["images"], "--output", tmp_path / "out"]
    line = one_error(run_in_process([mode, *tiny(trained["images"], run, *extra)]))
    assert line.endswith(".safetensors: No space left on device"), line
    assert _temporaries(tmp_path) == []


# ------------------------------------------------------------------ the fuzzer's last escapes
@pytest.mark.parametrize("override, words", [
    ("model.decoder=" + "x" * 5000, "is neither a structure file name nor a JSON list of tokens"),
    ('model.plugins="../../etc"', "'../../etc' is neither a module name"),
    ("train.lr=" + "[" * 3000, "--set train.lr=[[[[[[[[[[[[[[[[[[[[[[[[...(3,000 characters): it is nested too deeply"),
    ("train.seed=" + "9" * 5000, "a number of that many digits is beyond any config value"),
])
def test_odd_override_values_are_one_short_line(trained, override, words):
    line = one_error(run_in_process(["--check", "-c", TINY, "--set", override]))
    assert words in line and len(line) < 300, line


def test_the_api_raises_the_same_errors_as_the_cli(trained):
    from flexvae.assemble import plan_from_config
    from flexvae.config import load_config
    from flexvae.errors import FlexVAEError

    cfg = load_config(TINY, ["model.decoder=" + "x" * 5000])
    with pytest.raises(FlexVAEError, match="neither a structure file name"):
        plan_from_config(cfg, TINY)


def test_a_plugin_that_exits_is_one_line(tmp_path):
    plugin = tmp_path / "exits.py"
    plugin.write_text("import sys\nsys.exit(3)\n")
    line = one_error(run_in_process(["--check", "-c", TINY, "--set", f'model.plugins=["{plugin}"]']))
    assert line == (f"error: model.plugins: importing {plugin} failed: it called sys.exit(3) while being imported; "
                    "a plugin module only registers tokens")


def test_latent_stats_cover_the_whole_folder_after_a_resumed_encode(trained, tmp_path):
    from safetensors.torch import load_file

    images = make_images(tmp_path / "images", 6)
    (tmp_path / "later").mkdir()
    for name in ("4.png", "5.png"):
        (images / name).rename(tmp_path / "later" / name)
    out = tmp_path / "latents"
    args = ["-e", *tiny(images, trained["run"], "--ckpt", trained["run"], "--input", images, "--output", out)]
    assert run_in_process(args).returncode == 0
    for name in ("4.png", "5.png"):
        (tmp_path / "later" / name).rename(images / name)
    proc = run_in_process(args)
    assert proc.returncode == 0 and "encoded 2 images" in proc.stdout and "4 already done" in proc.stdout
    stats = json.loads((out / "latent_stats.json").read_text())
    values = torch.stack([load_file(str(p))["latent"] for p in sorted(out.glob("*.safetensors"))]).double()
    assert len(values) == 6 and stats["stats_over"] == "all 6 latents of the input's images in this folder"
    assert stats["latent_mean"] == pytest.approx(values.mean().item(), rel=1e-9)
    assert stats["latent_std"] == pytest.approx(values.std(unbiased=False).item(), rel=1e-9)
    per_channel = values.transpose(0, 1).reshape(values.shape[1], -1)
    assert stats["channel_std"] == pytest.approx(per_channel.std(1, unbiased=False).tolist(), rel=1e-9)


def test_ctrl_c_during_encode_says_how_many_latents_are_kept(trained, tmp_path, monkeypatch):
    import flexvae.inference.encode as inference

    real, calls = inference.save_latent, {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 2:
            raise KeyboardInterrupt
        real(*args, **kwargs)

    monkeypatch.setattr(inference, "save_latent", interrupted)
    out = tmp_path / "latents"
    args = ["-e", *tiny(trained["images"], trained["run"], "--input", trained["images"], "--output", out,
                         "--set", "encode.batch_size=2")]
    line = one_error(run_in_process(args), expect=130)
    assert line == (f"error: interrupted: 2 of 6 latents are in {out} (2 encoded by this run, listed in "
                    "manifest.jsonl); the same command encodes the remaining 4")
    monkeypatch.setattr(inference, "save_latent", real)
    proc = run_in_process(args)
    assert proc.returncode == 0 and "encoded 4 images" in proc.stdout and "2 already done" in proc.stdout


@pytest.mark.parametrize("size, words", [(30, "multiples of 4, such as 28 or 32"), (7, "multiples of 4, such as 4 or 8"),
                                         (20, "multiples of 8, such as 16 or 24")])
def test_an_image_size_the_structures_cannot_reproduce_blames_the_size(size, words):
    three_downs = ["--set", 'model.encoder=["C2d_3_8_3_2_1", "C2d_8_8_3_2_1", "C2d_8_4_3_2_1"]', "--set",
                   'model.decoder=["UpS_2", "C2d_2_8_3_1_1", "UpS_2", "C2d_8_8_3_1_1", "UpS_2", "C2d_8_3_3_1_1"]']
    config = ["-c", TINY, *three_downs] if size == 20 else ["-c", REPO / "configs" / "config.toml"]
    line = one_error(run_in_process(["--check", *config, "--set", f"data.image_size={size}"]))
    assert line == f"error: data.image_size = {size} does not fit these structures: they take sizes that are {words}"


def test_paths_no_file_can_have_are_the_librarys_errors_in_the_api_and_one_short_line_in_the_cli(trained, tmp_path):
    import flexvae
    from flexvae.errors import FlexVAEError
    from flexvae.inference import decode_folder, encode_folder, reconstruct_folder

    long = str(tmp_path / ("y" * 5000))
    run = flexvae.load_run(trained["run"])
    calls = [lambda: flexvae.load_run(long), lambda: flexvae.load_model(long), lambda: flexvae.load_config(long),
             lambda: reconstruct_folder(run, long, tmp_path / "o", progress=False),
             lambda: reconstruct_folder(run, trained["images"], long, progress=False),
             lambda: encode_folder(run, long, tmp_path / "o", progress=False),
             lambda: decode_folder(run, long, tmp_path / "o", progress=False)]
    for call in calls:
        with pytest.raises(FlexVAEError) as caught:
            call()
        assert len(str(caught.value)) < 400 and "characters)" in str(caught.value), caught.value
    for args in (["-i", "--ckpt", trained["run"], "--input", long], ["-t", "-c", long],
                 ["-i", "--ckpt", long], ["-e", "--ckpt", trained["run"], "--input", trained["images"],
                                          "--output", long]):
        line = one_error(run_in_process(args))
        assert len(line) < 400 and "characters)" in line, line
