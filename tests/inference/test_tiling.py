"""Tiled encoding and decoding: the tiles cover the image, blending is a partition of unity,
exact tiling equals the untiled model on random conv/GroupNorm/residual structures (2D and
3D; -i, -e, -d), a model with attention is tiled approximately and says by how much, and -e/-d
round trip."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from flexvae.build import build_vae, trace
from flexvae.dsl import parse_structure
from flexvae.inference.tiling import (
    decode_tiled,
    encode_tiled,
    reconstruct_tiled,
    tile_starts,
    tiled_apply,
)
from helpers.inprocess import run_in_process
from helpers.runs import tiny


def local_vae():
    """Every latent position depends on its own 2x2 pixel block only: tiling cannot change anything."""
    torch.manual_seed(0)
    return build_vae(["PixU_2", "C2d_12_4_1_1_0"], ["C2d_2_12_1_1_0", "PixS_2"], (3, 16, 16)).eval()


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


def _random_structures(seed: int, dims: int):
    """A random encoder/decoder pair of convolutions, GroupNorms, residual blocks and resampling
    (no layer that sees every position); returns (encoder, decoder, factor)."""
    rng = np.random.default_rng(seed)
    conv, convt = f"C{dims}d", f"CT{dims}d"
    pool = {2: "AvgP", 3: "AvgP3d"}[dims]
    downs = int(rng.integers(1, 3)) if dims == 2 else 1
    width = int(rng.choice([8, 16])) if dims == 2 else 4
    latent = 2

    def body(resample):
        tokens = []
        for step in range(downs):
            tokens += [str(rng.choice([f"VAERB_?_{width}", "GN_4_?", "SiLU", f"{conv}_?_{width}_3_1_1",
                                       *([f"{conv}_?_{width}_5_1_2", f"{conv}_?_{width}_3_1_2_dilation=2", "ReLU"] if dims == 2 else [])]))
                       for _ in range(int(rng.integers(1, 3)))]
            tokens.append(str(rng.choice(resample)))
        return tokens

    down = [f"Down_?_{width}", f"Down_?_{width}_pad=asym", f"{pool}_2", f"{conv}_?_{width}_4_2_1"]
    up = ["UpS_2", f"{convt}_?_{width}_4_2_1", f"{convt}_?_{width}_2_2_0"]
    if dims == 2:
        down.append("MaxP_3_2_1")
        up.append("UpS_2_mode=bilinear")
    encoder = [f"{conv}_{1 if dims == 3 else 3}_{width}_3_1_1", *body(down), "GN_4_?", f"{conv}_?_{2 * latent}_3_1_1"]
    decoder = [f"{conv}_{latent}_{width}_1_1_0", *body(up), f"VAERB_?_{width}", f"{conv}_?_{1 if dims == 3 else 3}_3_1_1"]
    return encoder, decoder, 2 ** downs


LOCAL_ENCODER = ["C2d_3_8_3_1_1", "VAERB_8_8", "Down_?_8", "GN_4_?", "SiLU", "C2d_?_4_3_1_1"]
LOCAL_DECODER = ["C2d_2_8_3_1_1", "VAERB_8_8", "UpS_2", "C2d_?_8_3_1_1", "GN_4_8", "SiLU", "C2d_8_3_3_1_1"]


@pytest.fixture(scope="module")
def local_run(trained, tmp_path_factory):
    import json

    root = tmp_path_factory.mktemp("local")
    (root / "enc.json").write_text(json.dumps(LOCAL_ENCODER))
    (root / "dec.json").write_text(json.dumps(LOCAL_DECODER))
    run = root / "run"
    result = run_in_process(["-t", *tiny(trained["images"], run, "--set", "train.max_steps=1", "--set",
                                         f"model.encoder={root / 'enc.json'}", "--set",
                                         f"model.decoder={root / 'dec.json'}")])
    assert result.returncode == 0, result.stderr
    return run


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


def test_a_local_model_tiled_equals_untiled():
    vae = local_vae()
    x = torch.rand(1, 3, 44, 60) * 2 - 1
    whole_latent = vae.encode(x).mode()
    torch.testing.assert_close(encode_tiled(vae, x, 16, 4, 2), whole_latent, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(decode_tiled(vae, whole_latent, 16, 4, 2), vae.reconstruct(x), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(reconstruct_tiled(vae, x, 16, 4, 2), vae.reconstruct(x), atol=1e-6, rtol=1e-5)


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


def test_cross_faded_tiles_equal_untiled_away_from_tile_borders():
    """Cross-faded (approximate) tiling: 3x3 convolutions see a few pixels around each position:
    farther than 16 px from every inner tile edge, the tiled reconstruction equals the untiled
    one (stated tolerance 1e-5); near the seams it does not. Exact tiling has no seams."""
    torch.manual_seed(0)
    vae = build_vae(["C2d_3_8_3_1_1", "SiLU", "Down_8_8", "C2d_8_4_3_1_1"],
                    ["C2d_2_8_3_1_1", "SiLU", "UpS_2", "C2d_8_3_3_1_1"], (3, 16, 16)).eval()
    x = torch.rand(1, 3, 128, 128) * 2 - 1
    tiled, whole = reconstruct_tiled(vae, x, 64, 16, 2, exact=False), vae.reconstruct(x)
    edges = [48, 64, 112]  # tiles start at 0, 48, 64 and end at 64, 112, 128 (the border)
    far = torch.tensor([all(abs(i - e) > 16 for e in edges) for i in range(128)])
    assert far.sum() == 47  # [0, 32) and (80, 96)
    mask = far[:, None] & far[None, :]
    torch.testing.assert_close(tiled[..., mask], whole[..., mask], atol=1e-5, rtol=1e-5)
    assert (tiled - whole).abs().max() > 1e-3  # near the seams the tiles do see less context
    torch.testing.assert_close(reconstruct_tiled(vae, x, 64, 16, 2), whole, atol=1e-5, rtol=1e-5)  # exact


@pytest.mark.parametrize("dims, seed", [(2, s) for s in range(8)] + [(3, s) for s in range(3)])
def test_exact_tiling_equals_the_untiled_model_on_random_local_structures(dims, seed):
    from flexvae.inference.tiling import model_footprint

    encoder, decoder, factor = _random_structures(seed, dims)
    channels = 1 if dims == 3 else 3
    torch.manual_seed(seed)
    vae = build_vae(encoder, decoder, (channels, *(8 * factor,) * dims)).eval()
    need = max(model_footprint(vae, "encode", 4 * factor, channels, dims).needed_overlap(),
               model_footprint(vae, "decode", 4, 2, dims).needed_overlap() * factor)
    overlap = -(-need // factor) * factor
    tile = overlap + (2 if dims == 2 else 1) * factor * 2
    sizes = [tile + factor * int(k) for k in np.random.default_rng(seed).integers(3, 12 if dims == 2 else 5, dims)]
    x = torch.rand(2 if dims == 2 else 1, channels, *sizes) * 2 - 1
    assert tuple(model_footprint(vae, "encode", tile, channels, dims).global_layers) == ()
    with torch.no_grad():
        latent, image = vae.encode(x).mode(), vae.reconstruct(x)
        tiled_latent = encode_tiled(vae, x, tile, overlap, factor)
        torch.testing.assert_close(tiled_latent, latent, atol=1e-5, rtol=0)
        torch.testing.assert_close(decode_tiled(vae, latent, tile, overlap, factor), image, atol=1e-5, rtol=0)
        torch.testing.assert_close(reconstruct_tiled(vae, x, tile, overlap, factor), image, atol=1e-5, rtol=0)
        blended = reconstruct_tiled(vae, x, tile, overlap // 2 // factor * factor, factor, exact=False)
    assert (blended - image).abs().max() > 1e-4  # too little overlap, cross-faded: not exact


def test_the_footprint_adds_margins_at_each_layers_scale():
    """Hand-counted: conv3 (1 px) + Down (1 at its input, 1 px) + conv5 after it (2 at half
    resolution = 4 px) = 6 px; the decoder: conv3 (1) + nearest UpS (0: it reads the unit it lies
    in) + conv3 at twice the resolution (1/2) = 1.5 latent units, rounded up to 2 on each side;
    GroupNorms are listed with the scale of their input."""
    from flexvae.inference.tiling import model_footprint

    vae = build_vae(["C2d_3_8_3_1_1", "Down_8_8", "GN_4_8", "C2d_8_4_5_1_2"],
                    ["C2d_2_8_3_1_1", "UpS_2", "C2d_8_3_3_1_1"], (3, 16, 16)).eval()
    enc = model_footprint(vae, "encode", 16, 3, 2)
    assert enc.margin == (6, 6) and enc.scale == (0.5, 0.5) and enc.align == (2, 2) and enc.needed_overlap() == 12
    assert [r for _, r in enc.norms] == [(2, 2)]
    dec = model_footprint(vae, "decode", 8, 2, 2)
    assert dec.margin == (1.5, 1.5) and dec.scale == (2, 2) and dec.needed_overlap() == 4


def test_a_model_with_attention_is_tiled_approximately_and_says_so():
    from flexvae.inference.tiling import resolve_tiling

    torch.manual_seed(0)
    vae = build_vae(["C2d_3_8_3_1_1", "Down_8_8", "VAEA_8", "C2d_8_4_3_1_1"],
                    ["C2d_2_8_3_1_1", "UpS_2", "C2d_8_3_3_1_1"], (3, 16, 16)).eval()
    tiling = resolve_tiling(vae, (3, 16, 16), 16, None)
    assert tiling.exact == {"encode": False, "decode": True}
    assert tiling.note.startswith("note: tiling is approximate for this model (layers that see every position: "
                                  "encoder layer 3 (AttentionBlock")
    assert "\n" not in tiling.note
    exact_decoder = resolve_tiling(vae, (3, 16, 16), 32, None, parts=("decode",))
    assert exact_decoder.note is None and exact_decoder.exact == {"decode": True} and exact_decoder.overlap == 8
    short = resolve_tiling(vae, (3, 16, 16), 32, 4, parts=("decode",))
    assert short.exact == {"decode": False} and "--overlap 4 is less than the 8 px" in short.note
    with pytest.raises(Exception, match="exact tiling of this model needs tiles overlapping by 8 px"):
        resolve_tiling(vae, (3, 16, 16), 8, None, parts=("decode",))


def test_cli_exact_tiles_equal_the_whole_image(trained, local_run, tmp_path):
    """-i --tile (overlap chosen from the receptive field) writes the image -i --native-size
    writes; -e --tile writes the untiled latents; -d --tile decodes them to the untiled image."""
    from flexvae.checkpoint import load_run

    images, run = trained["images"], local_run
    tiled = run_in_process(["-i", "--ckpt", str(run), "--input", str(images), "--output", str(tmp_path / "t"),
                            "--tile", "24"])
    assert tiled.returncode == 0 and "note:" not in tiled.stderr, tiled.stderr
    whole = run_in_process(["-i", "--ckpt", str(run), "--input", str(images), "--output", str(tmp_path / "w"),
                            "--native-size"])
    assert whole.returncode == 0, whole.stderr
    for name in ("wide.png", "square.png"):
        a = np.asarray(Image.open(tmp_path / "t" / name), dtype=int)
        b = np.asarray(Image.open(tmp_path / "w" / name), dtype=int)
        assert a.shape == b.shape and np.abs(a - b).max() <= 1  # equal up to 8-bit rounding of 1e-6 differences
    encoded = run_in_process(["-e", "--ckpt", str(run), "--input", str(images), "--output", str(tmp_path / "lat"),
                              "--tile", "24"])
    assert encoded.returncode == 0 and "note:" not in encoded.stderr, encoded.stderr
    ctx = load_run(run, "cpu")
    from flexvae.data import load_native

    x = load_native(images / "wide.png", 3)[None]
    stored = load_file(str(tmp_path / "lat" / "wide.safetensors"))["latent"]
    with torch.no_grad():
        expected = ctx.vae.encode(x[..., :36, :52]).mode()[0] * ctx.vae.scaling_factor
    torch.testing.assert_close(stored, expected, atol=1e-5, rtol=0)
    decoded = run_in_process(["-d", "--ckpt", str(run), "--input", str(tmp_path / "lat"), "--output",
                              str(tmp_path / "dec"), "--tile", "24"])
    assert decoded.returncode == 0 and "note:" not in decoded.stderr, decoded.stderr
    with torch.no_grad():
        image = ctx.vae.to_image(ctx.vae.decode(expected[None] / ctx.vae.scaling_factor))[0]
    got = torch.from_numpy(np.asarray(Image.open(tmp_path / "dec" / "wide.png"), dtype=np.float32)).permute(2, 0, 1)
    assert (got - ((image + 1) * 127.5).clamp(0, 255)).abs().max() <= 1.0


def test_cli_attention_model_says_tiling_is_approximate_and_by_how_much(trained, tmp_path):
    result = run_in_process(["-i", "--ckpt", str(trained["run"]), "--input", str(trained["images"]),
                             "--output", str(tmp_path / "out"), "--tile", "16"])
    assert result.returncode == 0, result.stderr
    notes = [line for line in result.stderr.splitlines() if line.startswith("note:")]
    assert notes[0].startswith("note: tiling is approximate for this model (layers that see every position: "
                               "encoder layer 4 (AttentionBlock")
    assert notes[1].startswith("note: on the first image the tiled reconstructions (in [-1, 1]) differ from the "
                               "untiled ones by ")


def test_check_prints_the_receptive_field_and_the_overlap_exact_tiling_takes():
    from flexvae.build import plan_vae
    from flexvae.inference.receptive import summary
    from flexvae.inference.tiling import resolve_tiling

    plan = plan_vae(LOCAL_ENCODER, LOCAL_DECODER, (3, 16, 16))
    line = summary(plan)
    torch.manual_seed(0)
    overlap = resolve_tiling(plan.build().eval(), (3, 16, 16), 64, None).overlap
    assert line.startswith("receptive field: the encoder reads ") and line.endswith(
        f"--tile is exact with tiles overlapping by {overlap} px")
    attention = plan_vae(["C2d_3_8_3_1_1", "Down_8_8", "VAEA_8", "C2d_8_4_3_1_1"], LOCAL_DECODER, (3, 16, 16))
    assert summary(attention) == ("receptive field: every position (layers that see all of them: encoder layer 3 "
                                  "(AttentionBlock)); --tile is approximate")


def test_every_local_2d_token_example_tiles_exactly(monkeypatch):
    """For every token example on 2D maps: if the footprint calls it local, tiled = untiled."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "layers"))  # also when run alone
    from test_layers import EXAMPLES

    from flexvae.inference.exact_tiles import exact_tiled_apply
    from flexvae.inference.receptive import footprint

    checked = 0
    for name, examples in EXAMPLES.items():
        for tokens, shape in examples:
            if len(shape) != 3 or name in ("Keep", "Z", "CtxCat", "CtxFiLM", "Const"):
                continue
            torch.manual_seed(0)
            stack = trace(parse_structure(tokens), shape).build().eval()
            big = torch.randn(1, shape[0], 8 * shape[1], 8 * shape[2])
            with torch.no_grad():
                try:
                    fp = footprint(lambda t: stack(t), [stack], big[..., :4 * shape[1], :4 * shape[2]])
                except (RuntimeError, ValueError):
                    continue  # a token that only takes the size it was built for (Reshape, Lin)
                if not fp.exact:
                    continue
                tile = max(4 * shape[1], fp.needed_overlap() + 2 * max(fp.align)) // max(fp.align) * max(fp.align)
                tile += max(fp.align) * (fp.needed_overlap() >= tile)
                whole = stack(big)
                tiled = exact_tiled_apply(lambda t: stack(t), big, tile, fp.needed_overlap(), fp)
            torch.testing.assert_close(tiled, whole, atol=1e-5, rtol=1e-5, msg=lambda m: f"{tokens}: {m}")
            checked += 1
    assert checked >= 30


def test_a_model_whose_latent_is_one_vector_cannot_be_tiled_and_says_so():
    from flexvae.errors import DataError
    from flexvae.inference.tiling import downsampling_factor
    from flexvae.latents import DeterministicLatent

    vae = build_vae(["Flat", "Lin_48_8"], ["Lin_8_48", "Reshape_3_4_4"], (3, 4, 4), DeterministicLatent())
    with pytest.raises(DataError, match=r"^--tile: the model's latent is one vector of 8 values for the whole 4 x 4 px "
                                        r"image, not a map of positions: it cannot be tiled; leave --tile out"):
        downsampling_factor(vae, (3, 4, 4))
