"""Tiled encoding and decoding: the tiles cover the image, blending is a partition of unity,
a model with local receptive fields gives the untiled result, and -e/-d round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from flexvae.build import build_vae
from flexvae.inference.tiling import decode_tiled, encode_tiled, reconstruct_tiled, tile_starts, tiled_apply
from helpers.inprocess import run_in_process
from helpers.runs import tiny


@pytest.mark.parametrize("length, tile, overlap", [(70, 32, 8), (64, 32, 0), (32, 32, 8), (20, 32, 8), (97, 40, 16)])
def test_tiles_cover_the_side_and_end_at_the_border(length, tile, overlap):
    starts = tile_starts(length, tile, overlap)
    assert starts[0] == 0 and (starts[-1] + tile >= length)
    covered = np.zeros(length, bool)
    for s in starts:
        covered[s:s + tile] = True
    assert covered.all()
    assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:]))  # neighbours overlap enough


def test_blending_is_a_partition_of_unity():
    x = torch.rand(2, 3, 53, 41, dtype=torch.float64)
    torch.testing.assert_close(tiled_apply(lambda t: t, x, 16, 6), x)
    # an output at twice the resolution (a decoder's view)
    doubled = tiled_apply(lambda t: t.repeat_interleave(2, -1).repeat_interleave(2, -2), x[..., :40, :40], 16, 6, 2, 1)
    torch.testing.assert_close(doubled, x[..., :40, :40].repeat_interleave(2, -1).repeat_interleave(2, -2))


def local_vae():
    """Every latent position depends on its own 2x2 pixel block only: tiling cannot change anything."""
    torch.manual_seed(0)
    return build_vae(["PixU_2", "C2d_12_4_1_1_0"], ["C2d_2_12_1_1_0", "PixS_2"], (3, 16, 16)).eval()


def test_a_local_model_tiled_equals_untiled():
    vae = local_vae()
    x = torch.rand(1, 3, 44, 60) * 2 - 1
    whole_latent = vae.encode(x).mode()
    torch.testing.assert_close(encode_tiled(vae, x, 16, 4, 2), whole_latent, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(decode_tiled(vae, whole_latent, 16, 4, 2), vae.reconstruct(x), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(reconstruct_tiled(vae, x, 16, 4, 2), vae.reconstruct(x), atol=1e-6, rtol=1e-5)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiling")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for name, size in (("wide", (36, 52)), ("square", (40, 40))):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(images / f"{name}.png")
    run = root / "run"
    assert run_in_process(["-t", *tiny(images, run, "--set", "train.max_steps=1")]).returncode == 0
    return {"images": images, "run": run}


def test_tiled_encode_then_tiled_decode_gives_the_full_image(trained, tmp_path):
    images, run = trained["images"], trained["run"]
    encoded = run_in_process(["-e", "--ckpt", str(run), "--input", str(images), "--output", str(tmp_path / "lat"),
                              "--tile", "16", "--overlap", "4"])
    assert encoded.returncode == 0, encoded.stderr
    latent = load_file(str(tmp_path / "lat" / "wide.safetensors"))["latent"]
    assert latent.shape == (2, 18, 26)  # 36 x 52 px, downsampling 2
    decoded = run_in_process(["-d", "--ckpt", str(run), "--input", str(tmp_path / "lat"), "--output",
                              str(tmp_path / "dec"), "--tile", "16", "--overlap", "4"])
    assert decoded.returncode == 0, decoded.stderr
    assert Image.open(tmp_path / "dec" / "wide.png").size == (52, 36)
    recon = run_in_process(["-i", "--ckpt", str(run), "--input", str(images), "--output", str(tmp_path / "rec"),
                            "--tile", "16"])
    assert recon.returncode == 0, recon.stderr
    assert Image.open(tmp_path / "rec" / "square.png").size == (40, 40)
    untiled = run_in_process(["-d", "--ckpt", str(run), "--input", str(tmp_path / "lat"), "--output",
                              str(tmp_path / "dec2")])
    assert untiled.returncode != 0 and "latent shape (2, 18, 26), the model expects (2, 8, 8)" in untiled.stderr


@pytest.mark.parametrize("args, message", [
    (["--overlap", "4"], "--overlap does nothing without --tile SIZE"),
    (["--tile", "15"], "--tile must be a positive multiple of the model's downsampling factor 2, got 15"),
    (["--tile", "16", "--overlap", "16"], "--overlap must be a multiple of 2 from 0 to less than --tile (16), got 16"),
    (["--tile", "16", "--native-size"], "--tile already works at each image's own size"),
])
def test_tiling_errors(trained, tmp_path, args, message):
    result = run_in_process(["-i", "--ckpt", str(trained["run"]), "--input", str(trained["images"]),
                             "--output", str(tmp_path / "out"), *args])
    assert result.returncode != 0 and result.stderr.startswith("error: ") and message in result.stderr


def test_reconstruction_falls_back_to_tiles_when_the_device_runs_out_of_memory():
    from flexvae.checkpoint import LoadedModel
    from flexvae.inference.tiling import FallBackToTiles

    vae = local_vae()
    ctx = LoadedModel(vae, (3, 16, 16))
    calls = []

    def whole(images):
        calls.append(images.shape)
        raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")

    notes = []
    run = FallBackToTiles(ctx, whole, "a batch", log=notes.append)
    x = torch.rand(2, 3, 40, 40) * 2 - 1
    torch.testing.assert_close(run(x), vae.reconstruct(x), atol=1e-6, rtol=1e-5)  # a local model: tiling is exact
    assert len(notes) == 1 and "did not fit in the device's memory" in notes[0] and "--tile 16" in notes[0]
    run(x)
    assert len(calls) == 1  # once out of memory, later batches go to tiles directly

    def broken(images):
        raise RuntimeError("some other failure")

    with pytest.raises(RuntimeError, match="some other failure"):
        FallBackToTiles(ctx, broken, "a batch", log=notes.append)(x)


def test_a_convolutional_model_tiled_equals_untiled_away_from_tile_borders():
    """3x3 convolutions see a few pixels around each position: farther than 16 px from every
    inner tile edge, the tiled reconstruction equals the untiled one (stated tolerance 1e-5)."""
    torch.manual_seed(0)
    vae = build_vae(["C2d_3_8_3_1_1", "SiLU", "Down_8_8", "C2d_8_4_3_1_1"],
                    ["C2d_2_8_3_1_1", "SiLU", "UpS_2", "C2d_8_3_3_1_1"], (3, 16, 16)).eval()
    x = torch.rand(1, 3, 128, 128) * 2 - 1
    tiled, whole = reconstruct_tiled(vae, x, 64, 16, 2), vae.reconstruct(x)
    edges = [48, 64, 112]  # tiles start at 0, 48, 64 and end at 64, 112, 128 (the border)
    far = torch.tensor([all(abs(i - e) > 16 for e in edges) for i in range(128)])
    assert far.sum() == 47  # [0, 32) and (80, 96)
    mask = far[:, None] & far[None, :]
    torch.testing.assert_close(tiled[..., mask], whole[..., mask], atol=1e-5, rtol=1e-5)
    assert (tiled - whole).abs().max() > 1e-3  # near the seams the tiles do see less context
