"""Reconstruct, encode and decode folders in-process with a model rebuilt from a checkpoint."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flexvae.assemble import model_from_config
from flexvae.checkpoint import (
    LoadedModel,
    checkpoint_metadata,
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
)
from flexvae.config import load_config
from flexvae.data import load_image
from flexvae.errors import DataError
from flexvae.inference import (
    decode_folder,
    encode_folder,
    load_latent,
    output_names,
    reconstruct_folder,
    safe_output_path,
    save_latent,
)
from helpers.hierarchy import h_args
from helpers.inprocess import run_in_process
from helpers.labelled import (
    CLASSES,
    MIXED_COND_ENCODER,
    cond_args,
    labelled_folder,
    mixed_args,
)
from helpers.runs import make_images as random_images
from helpers.runs import tiny

REPO = Path(__file__).resolve().parents[2]
READABLE = ["a.png", "sub/b.png", "sub/deeper/c.jpg", "sub/deeper/d.PNG", "e.jpeg"]
BROKEN = ["broken.png", "sub/truncated.png"]
SCALING = 0.5


def make_images(root: Path) -> Path:
    rng = np.random.default_rng(1)
    for i, rel in enumerate(READABLE):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        h, w = 16 + 2 * i, 24 - 2 * i
        y, x = np.mgrid[0:h, 0:w]
        base = np.stack([x * 255 / w, y * 255 / h, np.full((h, w), 50.0 * i)], -1)
        array = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(array).save(path, format="JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG")
    (root / "broken.png").write_text("plain text, not a PNG")
    data = (root / "a.png").read_bytes()
    (root / "sub/truncated.png").write_bytes(data[: len(data) // 2])
    return root


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return make_images(tmp_path_factory.mktemp("inference") / "images")


@pytest.fixture(scope="module")
def ctx(tmp_path_factory) -> LoadedModel:
    """The tiny model (random weights, scaling factor 0.5) saved and rebuilt from the checkpoint alone."""
    torch.manual_seed(0)
    cfg = load_config(REPO / "configs/tiny_test.toml", [f"model.scaling_factor={SCALING}"])
    cwd = os.getcwd()
    os.chdir(REPO)  # structure paths in the config are relative to the repository
    try:
        model, plan = model_from_config(cfg, REPO / "configs/tiny_test.toml")
    finally:
        os.chdir(cwd)
    path = tmp_path_factory.mktemp("ckpt") / "step_00000000.safetensors"
    save_checkpoint(path, model.state_dict(), checkpoint_metadata(cfg, plan, 0, SCALING))
    rebuilt, stored_cfg, stored_plan = model_from_checkpoint(load_checkpoint(path), device="cpu")
    return LoadedModel(rebuilt, tuple(stored_plan.data_shape), stored_cfg.data.resize_filter, stored_cfg.data.pad_to_square)


def encode(ctx, images, out, **kwargs):
    return encode_folder(ctx, images, out, progress=False, **kwargs)


def latent_files(root: Path, suffix=".safetensors") -> dict[str, torch.Tensor]:
    return {p.relative_to(root).as_posix(): load_latent(p) for p in sorted(root.rglob(f"*{suffix}"))}


def manifest(root: Path) -> dict[str, dict]:
    lines = (root / "manifest.jsonl").read_text().splitlines()
    return {entry["path"]: entry for entry in map(json.loads, lines)}


# ------------------------------------------------------------ output paths
def test_safe_output_path_stays_inside(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    assert safe_output_path(out, "a/b/c.png", ".npy") == out / "a" / "b" / "c.npy"
    assert safe_output_path(out, "x.JPG", ".png") == out / "x.png"
    for bad in ("../x.png", "a/../../x.png", "/etc/passwd", "/tmp/x.png", ".."):
        with pytest.raises(DataError, match="outside"):
            safe_output_path(out, bad, ".png")


def test_safe_output_path_refuses_a_link_out(tmp_path):
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    (out / "link").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(DataError, match="outside"):
        safe_output_path(out, "link/x.png", ".png")


def test_inputs_sharing_a_stem_get_distinct_outputs(ctx, tmp_path):
    assert output_names(["a/x.png", "a/x.jpg", "a/y.png", "b/x.png"], ".npy") == {
        "a/x.png": "a/x.png.npy", "a/x.jpg": "a/x.jpg.npy", "a/y.png": "a/y.npy", "b/x.png": "b/x.npy"}
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (16, 16), (250, 10, 10)).save(images / "x.png")
    Image.new("RGB", (16, 16), (10, 10, 250)).save(images / "x.jpg")
    encode(ctx, images, tmp_path / "latents")
    entries = manifest(tmp_path / "latents")
    assert entries["x.png"]["file"] == "x.png.safetensors" and entries["x.jpg"]["file"] == "x.jpg.safetensors"
    red, blue = (load_latent(tmp_path / "latents" / entries[k]["file"]) for k in ("x.png", "x.jpg"))
    assert not torch.allclose(red, blue)
    assert decode_folder(ctx, tmp_path / "latents", tmp_path / "decoded", progress=False)["decoded"] == 2
    reconstruct_folder(ctx, images, tmp_path / "recon", progress=False)
    for folder in ("decoded", "recon"):
        assert sorted(p.name for p in (tmp_path / folder).glob("*.png")) == ["x.jpg.png", "x.png.png"]


# ------------------------------------------------------------ reconstruct
def test_reconstruct_side_by_side_doubles_the_width(ctx, images, tmp_path):
    plain, pairs = tmp_path / "plain", tmp_path / "pairs"
    summary = reconstruct_folder(ctx, images, plain, batch_size=2, progress=False)
    reconstruct_folder(ctx, images, pairs, batch_size=2, side_by_side=True, progress=False)
    assert summary["images"] == len(READABLE) and summary["skipped"] == len(BROKEN)
    for rel in READABLE:
        target = Path(rel).with_suffix(".png")
        single = np.asarray(Image.open(plain / target), dtype=np.int16)
        pair = np.asarray(Image.open(pairs / target), dtype=np.int16)
        assert single.shape == (16, 16, 3) and pair.shape == (16, 32, 3)
        assert np.array_equal(pair[:, 16:], single)  # right: the reconstruction
        original = (load_image(images / rel, 3, 16) + 1) * 127.5
        assert np.abs(pair[:, :16] - original.permute(1, 2, 0).numpy()).max() <= 1  # left: the input
    with open(plain / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["path"] for r in rows] == sorted(READABLE) + ["MEAN"]
    assert float(rows[-1]["psnr"]) == pytest.approx(summary["psnr"], abs=1e-3)


# ------------------------------------------------------------ encode
def test_encode_stores_the_posterior_mean_deterministically(ctx, images, tmp_path):
    first = encode(ctx, images, tmp_path / "one", batch_size=2)
    encode(ctx, images, tmp_path / "two", batch_size=2)
    one, two = latent_files(tmp_path / "one"), latent_files(tmp_path / "two")
    assert sorted(one) == sorted(str(Path(r).with_suffix(".safetensors").as_posix()) for r in READABLE)
    assert all(torch.equal(one[k], two[k]) for k in one)
    assert first["encoded"] == len(READABLE) and first["failed"] == len(BROKEN)
    # the mean, scaled: what encode(x).mode() * scaling_factor gives for the same preprocessing
    batch = torch.stack([load_image(images / rel, 3, 16) for rel in READABLE])
    with torch.no_grad():
        expected = ctx.vae.encode(batch).mode() * SCALING
    for rel, latent in zip(READABLE, expected):
        assert torch.allclose(one[Path(rel).with_suffix(".safetensors").as_posix()], latent, atol=1e-6)
    # a posterior sample is another thing, and seeded it is repeatable too
    encode(ctx, images, tmp_path / "s1", sample=True, seed=3)
    encode(ctx, images, tmp_path / "s2", sample=True, seed=3)
    s1, s2 = latent_files(tmp_path / "s1"), latent_files(tmp_path / "s2")
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert not any(torch.allclose(s1[k], one[k]) for k in s1)


def test_manifest_accounts_for_every_input(ctx, images, tmp_path):
    out = tmp_path / "latents"
    encode(ctx, images, out)
    entries = manifest(out)
    assert sorted(entries) == sorted(READABLE + BROKEN)
    for rel in BROKEN:
        assert entries[rel]["status"] == "failed" and entries[rel]["reason"]
        assert not (out / Path(rel).with_suffix(".safetensors")).exists()
    assert {entries[rel]["status"] for rel in READABLE} == {"ok"}
    assert {tuple(entries[rel]["shape"]) for rel in READABLE} == {tuple(ctx.vae.latent_shape)}


def test_encode_again_skips_what_is_done(ctx, images, tmp_path):
    out = tmp_path / "latents"
    encode(ctx, images, out)
    some = out / "sub" / "b.safetensors"
    stamp = some.stat().st_mtime_ns
    again = encode(ctx, images, out)
    assert again["encoded"] == 0 and again["already_done"] == len(READABLE) and again["failed"] == len(BROKEN)
    assert some.stat().st_mtime_ns == stamp
    assert sorted(manifest(out)) == sorted(READABLE + BROKEN)
    # a missing latent file is encoded again, and only that one
    (out / "a.safetensors").unlink()
    third = encode(ctx, images, out)
    assert third["encoded"] == 1 and third["already_done"] == len(READABLE) - 1
    assert (out / "a.safetensors").exists() and some.stat().st_mtime_ns == stamp


def test_relative_folders_work(ctx, images, tmp_path, monkeypatch):
    monkeypatch.chdir(images.parent)
    summary = encode(ctx, images.name, Path("rel_latents"))
    assert summary["encoded"] == len(READABLE) and summary["failed"] == len(BROKEN)
    assert sorted(latent_files(images.parent / "rel_latents")) == \
        sorted(Path(rel).with_suffix(".safetensors").as_posix() for rel in READABLE)
    assert reconstruct_folder(ctx, images.name, Path("rel_recon"), progress=False)["images"] == len(READABLE)
    assert decode_folder(ctx, "rel_latents", "rel_decoded", progress=False)["decoded"] == len(READABLE)


def test_latent_stats_suggest_one_over_the_raw_std(ctx, images, tmp_path):
    out = tmp_path / "latents"
    summary = encode(ctx, images, out)
    raw = torch.stack(list(latent_files(out).values())).double() / SCALING
    stats = json.loads((out / "latent_stats.json").read_text())
    assert stats["suggested_scaling_factor"] == pytest.approx(1 / raw.std(unbiased=False).item(), rel=1e-5)
    assert stats["scaling_factor_used"] == SCALING
    assert summary["suggested_scaling_factor"] == stats["suggested_scaling_factor"]
    # per-channel statistics over every latent of the folder, not one batch
    scaled = raw * SCALING
    channels = scaled.transpose(0, 1).flatten(1)
    assert stats["channel_mean"] == pytest.approx(channels.mean(1).tolist(), rel=1e-6, abs=1e-9)
    assert stats["channel_std"] == pytest.approx(channels.std(1, unbiased=False).tolist(), rel=1e-6)


def test_npy_format_and_decode_back(ctx, images, tmp_path):
    encode(ctx, images, tmp_path / "st")
    encode(ctx, images, tmp_path / "np", fmt="npy")
    st, npy = latent_files(tmp_path / "st"), latent_files(tmp_path / "np", ".npy")
    assert not list((tmp_path / "np").rglob("*.safetensors"))
    assert sorted(k.replace(".safetensors", ".npy") for k in st) == sorted(npy)
    assert all(torch.equal(st[k], npy[k.replace(".safetensors", ".npy")]) for k in st)
    assert np.load(tmp_path / "np" / "a.npy", allow_pickle=False).dtype == np.float32

    summary = decode_folder(ctx, tmp_path / "np", tmp_path / "decoded", batch_size=2, progress=False)
    assert summary == {"decoded": len(READABLE), "failed": 0, "non_finite_files": 0}
    reconstruct_folder(ctx, images, tmp_path / "recon", progress=False)
    for rel in READABLE:
        target = Path(rel).with_suffix(".png")
        decoded = np.asarray(Image.open(tmp_path / "decoded" / target), dtype=np.int16)
        recon = np.asarray(Image.open(tmp_path / "recon" / target), dtype=np.int16)
        assert decoded.shape == (16, 16, 3)
        assert np.abs(decoded - recon).max() <= 1  # decode(encode(x)) is the reconstruction


def test_decode_reports_unusable_latents_and_goes_on(ctx, tmp_path, capsys):
    latents = tmp_path / "latents"
    good = torch.randn(ctx.vae.latent_shape)
    save_latent(good, latents / "nested" / "good.safetensors", "safetensors")
    save_latent(torch.randn(3, 5, 5), latents / "wrong_shape.npy", "npy")
    (latents / "garbage.safetensors").write_bytes(b"not a safetensors file")
    summary = decode_folder(ctx, latents, tmp_path / "out", progress=False)
    assert summary == {"decoded": 1, "failed": 2, "non_finite_files": 0}
    assert Image.open(tmp_path / "out" / "nested" / "good.png").size == (16, 16)
    printed = capsys.readouterr().err
    assert "wrong_shape.npy" in printed and "garbage.safetensors" in printed
    with pytest.raises(DataError, match="no latent files"):
        decode_folder(ctx, tmp_path / "out", tmp_path / "again", progress=False)


def test_encode_stores_labels_and_class_probabilities_and_decode_reads_them(tmp_path):
    images = labelled_folder(tmp_path / "img", unlabelled=1)
    assert run_in_process(["-t", *mixed_args(images, tmp_path / "run", "--set", f"model.encoder={MIXED_COND_ENCODER}",
                                             "--set", "train.max_steps=2")]).returncode == 0
    result = run_in_process(["-e", *mixed_args(images, tmp_path / "run", "--set", f"model.encoder={MIXED_COND_ENCODER}"),
                             "--input", images, "--output", tmp_path / "lat", "--labels", "folders"])
    assert result.returncode == 0, result.stderr
    entries = {e["path"]: e for e in map(json.loads, (tmp_path / "lat" / "manifest.jsonl").read_text().splitlines())}
    assert entries["b/1.png"]["label"] == "b" and entries["free0.png"]["label"] is None
    probs = entries["a/0.png"]["class_probs"]
    assert set(probs) == set(CLASSES) and sum(probs.values()) == pytest.approx(1, abs=1e-5)

    cond = tmp_path / "cond"
    assert run_in_process(["-t", *cond_args(images, cond, "--set", "train.max_steps=2")]).returncode == 0
    assert run_in_process(["-e", *cond_args(images, cond), "--input", images, "--output", tmp_path / "lat2",
                           "--labels", "folders"]).returncode == 0
    decoded = run_in_process(["-d", *cond_args(images, cond), "--input", tmp_path / "lat2", "--output", tmp_path / "dec"])
    assert decoded.returncode == 0, decoded.stderr
    assert "12 latent file(s) labelled" in decoded.stderr
    recon = run_in_process(["-i", *cond_args(images, cond), "--input", images, "--output", tmp_path / "rec"])
    assert recon.returncode == 0 and "labels: none (not every image" in recon.stderr  # free0.png is in the root
    tiled = run_in_process(["-i", *cond_args(images, cond), "--input", images, "--output", tmp_path / "t", "--tile", "16"])
    assert tiled.returncode != 0 and "this model is conditional" in tiled.stderr


def test_encode_writes_every_group_and_decode_reads_them_back(tmp_path):
    from safetensors.torch import load_file

    from flexvae.checkpoint import load_run

    images = random_images(tmp_path / "img", 5)
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
    import numpy as np
    from PIL import Image

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


def test_encode_redoes_latents_of_another_checkpoint(tmp_path):
    images = random_images(tmp_path / "images", 4)
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
    images = random_images(tmp_path / "images", 3)
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


def test_reconstruct_and_decode_record_their_checkpoint(tmp_path):
    images = random_images(tmp_path / "images", 2)
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

    images = random_images(tmp_path / "images", 2)  # 20 x 20
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


def test_under_torchrun_no_process_writes_before_every_process_has_checked_the_folder(ctx, images, tmp_path,
                                                                                      monkeypatch):
    """Each process checks every target of the folder (files flexvae did not write are refused
    before anything is written); a process that started writing before another had checked would
    make that one refuse the first's new latents. So the first barrier comes before any write, and
    rank 0 has begun the record by then. Rank 0 of two, the barrier stopping the run there."""
    from flexvae.outputs import HEADER, RECORD
    from flexvae.train import distributed
    from flexvae.train.distributed import DistInfo

    out = tmp_path / "latents"
    seen = []

    class Stop(Exception):
        pass

    def barrier(info):
        seen.append((sorted(p.name for p in out.rglob("*.safetensors")), (out / RECORD).read_text()))
        raise Stop

    monkeypatch.setattr(distributed, "barrier", barrier)
    with pytest.raises(Stop):
        encode(ctx, images, out, dist=DistInfo(rank=0, world_size=2))
    assert seen == [([], json.dumps(HEADER) + "\n")]
