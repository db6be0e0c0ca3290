"""Tar shards (data.source = "webdataset"): brace patterns, the index, items equal to the same
images in a folder, errors, and a training run that resumes exactly."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flexvae.config import load_config
from flexvae.data import open_dataset
from flexvae.data.shards import expand_braces
from flexvae.errors import DataError
from flexvae.train.trainer import Trainer

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny_test.toml"


def write_shards(root: Path, count: int = 10, per_shard: int = 4, folder: Path | None = None) -> Path:
    """``count`` PNG samples with labels over shards of ``per_shard``; the same PNG files in ``folder``."""
    rng = np.random.default_rng(1)
    root.mkdir(parents=True, exist_ok=True)
    for shard in range((count + per_shard - 1) // per_shard):
        with tarfile.open(root / f"train-{shard:03d}.tar", "w") as archive:
            for i in range(shard * per_shard, min(count, (shard + 1) * per_shard)):
                buffer = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(buffer, "PNG")
                for name, data in ((f"part/{i:04d}.png", buffer.getvalue()), (f"part/{i:04d}.cls", str(i % 3).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    archive.addfile(info, io.BytesIO(data))
                if folder is not None:
                    (folder / f"{i:04d}.png").parent.mkdir(parents=True, exist_ok=True)
                    (folder / f"{i:04d}.png").write_bytes(buffer.getvalue())
    return root


def _labelled_folder(root: Path, count: int = 11) -> Path:
    rng = np.random.default_rng(2)
    for i in range(count):
        folder = root / ("cat" if i % 3 else "dog")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (18, 22, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    (root / "broken.png").write_bytes(b"not a png")
    return root


def test_brace_patterns():
    assert expand_braces("s-{000..002}.tar") == ["s-000.tar", "s-001.tar", "s-002.tar"]
    assert expand_braces("{a,b}/{1..2}") == ["a/1", "a/2", "b/1", "b/2"]
    assert expand_braces("{3..1}") == ["3", "2", "1"]
    assert expand_braces("plain.tar") == ["plain.tar"]


def test_shard_items_equal_the_same_images_from_a_folder(tmp_path):
    shards = write_shards(tmp_path / "shards", folder=tmp_path / "folder")
    from_shards = open_dataset("webdataset", str(shards / "train-{000..002}.tar"), train=True, channels=3,
                               image_size=16)
    from_folder = open_dataset("folder", tmp_path / "folder", train=True, channels=3, image_size=16)
    assert len(from_shards) == len(from_folder) == 10
    assert from_shards.relpaths[0] == "train-000.tar/part/0000.png"
    for i in range(10):
        a, b = from_shards[i], from_folder[i]
        assert torch.equal(a["image"], b["image"]) and a["label"] == i % 3
    assert len(open_dataset("webdataset", shards, train=True, channels=3, image_size=16)) == 10  # a folder of shards


def test_shard_errors(tmp_path):
    shards = write_shards(tmp_path / "shards")
    with pytest.raises(DataError, match=r"shard not found: .*train-003.tar and 6 more"):
        open_dataset("webdataset", str(shards / "train-{000..009}.tar"), train=True, channels=3, image_size=16)
    with tarfile.open(tmp_path / "packed.tar.gz", "w:gz") as archive:
        archive.add(shards / "train-000.tar", "x.tar")
    with pytest.raises(DataError, match="not an uncompressed tar shard"):
        open_dataset("webdataset", tmp_path / "packed.tar.gz", train=True, channels=3, image_size=16)


def test_training_from_shards_resumes_exactly(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    shards = write_shards(tmp_path / "shards", count=12)
    common = [f"data.path={shards / 'train-{000..002}.tar'}", "data.source=webdataset", "data.num_workers=0",
              "train.device=cpu", "train.schedule=constant", "train.save_every=3"]

    def run(out, steps):
        cfg = load_config(TINY, [f"train.out_dir={out}", f"train.max_steps={steps}", *common])
        trainer = Trainer(cfg, TINY, quiet=True)
        trainer.train()
        return trainer

    straight = run(tmp_path / "A", 6)
    run(tmp_path / "B", 3)
    resumed = run(tmp_path / "B", 6)
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_loader_workers_read_the_shards_like_one_process(tmp_path):
    from flexvae.data import make_loader

    shards = write_shards(tmp_path / "shards", count=12)
    dataset = open_dataset("webdataset", shards, train=True, channels=3, image_size=16)
    dataset[0]  # opens a descriptor in this process, which forked workers inherit
    one = [b.images for b in make_loader(dataset, 4, shuffle=False, num_workers=0)]
    two = [b.images for b in make_loader(dataset, 4, shuffle=False, num_workers=2)]
    assert len(one) == 3 and all(torch.equal(a, b) for a, b in zip(one, two))


def test_encode_into_shards_resumes_and_never_rewrites_a_shard(tmp_path, monkeypatch):
    """-e with encode.format = webdataset: the shards hold every latent under its image's key,
    the manifest names shard and member, a re-run encodes only what is missing into new shards."""
    import json

    from safetensors.torch import load

    from helpers.inprocess import run_in_process
    from helpers.runs import make_images, tiny

    images = make_images(tmp_path / "images", 5)
    run = tmp_path / "run"
    assert run_in_process(["-t", *tiny(images, run, "--set", "train.max_steps=1")]).returncode == 0
    out = tmp_path / "latents"
    args = ["-e", "--ckpt", str(run), "--input", str(images), "--output", str(out),
            "--set", "encode.format=webdataset", "--set", "encode.shard_size=2", "--set", "encode.batch_size=2"]
    assert run_in_process(args).returncode == 0
    shards = sorted(p.name for p in out.glob("*.tar"))
    assert shards == ["latents-r00-000000.tar", "latents-r00-000001.tar", "latents-r00-000002.tar"]
    members = {}
    for name in shards:
        with tarfile.open(out / name) as archive:
            for member in archive:
                members[member.name] = load(archive.extractfile(member).read())["latent"]
    assert sorted(members) == [f"{i}.safetensors" for i in range(5)]
    manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert {(e["file"], e["member"]) for e in manifest} == {
        (f"latents-r00-00000{i // 2}.tar", f"{i}.safetensors") for i in range(5)}
    stamp = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    make_images(tmp_path / "more", 7)
    (tmp_path / "more" / "5.png").rename(images / "5.png")
    again = run_in_process(args)
    assert again.returncode == 0 and "5 already done" in again.stdout and "encoded 1 images" in again.stdout
    assert all(p.stat().st_mtime_ns == stamp[p.name] for p in out.glob("*.tar") if p.name in stamp)
    assert (out / "latents-r00-000003.tar").is_file()


def test_shard_command_round_trips_a_labelled_folder_resumes_and_refuses_other_folders(tmp_path):
    import json

    from helpers.inprocess import run_in_process

    images = _labelled_folder(tmp_path / "images")
    out = tmp_path / "shards"
    args = ["--shard", "--input", str(images), "--output", str(out), "--shard-size", "4", "--workers", "2",
            "--labels", "folders"]
    result = run_in_process(args)
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert [e["file"] for e in manifest["shards"]] == [f"shard-00000{i}.tar" for i in range(3)]
    assert [e["count"] for e in manifest["shards"]] == [3, 4, 4]  # broken.png (sorted first) is left out
    assert manifest["shards"][0]["failed"][0]["path"] == "broken.png"
    assert all(e["bytes"] == (out / e["file"]).stat().st_size for e in manifest["shards"])
    assert manifest["classes"] == ["cat", "dog"] and manifest["images"] == 12
    assert "11 images in 3 shard(s)" in result.stdout and "1 left out (first: broken.png" in result.stdout
    # the shards read back as the folder's images, with their labels
    from_shards = open_dataset("webdataset", out, train=False, channels=3, image_size=16)
    from_folder = open_dataset("folder", images / "cat", train=False, channels=3, image_size=16)
    by_source = {}
    for shard in sorted(out.glob("shard-*.tar")):
        with tarfile.open(shard) as archive:
            for member in archive.getmembers():
                if member.name.endswith(".src"):
                    by_source[archive.extractfile(member).read().decode()] = member.name[:-4]
    assert len(by_source) == 11 and by_source["cat/001.png"] == "000000001"
    for i, rel in enumerate(from_shards.relpaths):
        key = rel.split("/")[-1].split(".")[0]
        source = next(s for s, k in by_source.items() if k == key)
        assert from_shards[i]["label"] == (0 if source.startswith("cat") else 1)
        if source.startswith("cat"):
            j = from_folder.relpaths.index(source.split("/", 1)[1])
            assert torch.equal(from_shards[i]["image"], from_folder[j]["image"])
    # resume: a lost shard is written again, the others are kept as they are
    (out / "shard-000001.tar").unlink()
    kept = (out / "shard-000002.tar").stat().st_mtime_ns
    again = run_in_process(args)
    assert again.returncode == 0, again.stderr
    assert "resuming: 2 shard(s) already written, 1 to write" in again.stdout
    assert (out / "shard-000001.tar").exists() and (out / "shard-000002.tar").stat().st_mtime_ns == kept
    # same command, same bytes (no clock, no order of the workers in the files)
    first = (out / "shard-000001.tar").read_bytes()
    (out / "shard-000001.tar").unlink()
    assert run_in_process(args).returncode == 0 and (out / "shard-000001.tar").read_bytes() == first
    # another shard size into the same folder: refused, nothing written
    other = run_in_process(args[:5] + ["--shard-size", "5", "--labels", "folders"])
    assert other.returncode != 0 and "made with another shard_size (was 4, now 5)" in other.stderr
    # a user's file where a shard would go is never replaced
    user = tmp_path / "mine"
    user.mkdir()
    (user / "shard-000000.tar").write_text("my notes")
    refused = run_in_process(["--shard", "--input", str(images), "--output", str(user)])
    assert refused.returncode != 0 and refused.stderr.startswith("error: ") and "--overwrite" in refused.stderr
    assert (user / "shard-000000.tar").read_text() == "my notes"
