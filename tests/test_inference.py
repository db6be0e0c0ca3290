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

from flexvae.config import load_config
from flexvae.data import load_image
from flexvae.errors import DataError
from flexvae.checkpoint import LoadedModel
from flexvae.inference import (decode_folder, encode_folder, load_latent, output_names,
                               reconstruct_folder, safe_output_path, save_latent)
from flexvae.assemble import model_from_config
from flexvae.checkpoint import checkpoint_metadata, model_from_checkpoint
from flexvae.checkpoint import load_checkpoint, save_checkpoint

REPO = Path(__file__).resolve().parents[1]
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
