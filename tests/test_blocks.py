"""Residual spans, DC-AE shortcuts, ViT tokens and binary quantizers: values against
independent references, structure round trips and error text; every token's footprint is
checked against tiling (a token that says it is local tiles exactly)."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
import torch.nn.functional as F

from flexvae.build import build_vae, plan_vae, trace
from flexvae.dsl import parse_structure
from flexvae.dsl.structure import load_structure, unparse_structure
from flexvae.errors import StructureError
from flexvae.latents import LATENTS
from flexvae.latents.binary import BinaryQuantizer


# --- residual spans --------------------------------------------------------------------------

def test_a_residual_span_adds_its_body_to_its_shortcut():
    specs = parse_structure([{"residual": ["C2d_?_4_3_1_1", "SiLU", "C2d_?_4_3_1_1"]},
                             {"residual": ["C2d_?_8_3_2_1"], "shortcut": "S2C_2_8", "repeat": 2}], source="s")
    assert [s.repeat for s in specs] == [1, 2]
    plan = trace(specs[:1] + [specs[1]], (4, 8, 8))
    torch.manual_seed(0)
    stack = plan.build().eval()
    x = torch.randn(2, 4, 8, 8)
    first, second, third = stack
    body = first.body
    expected = x + body[2](F.silu(body[0](x)))
    torch.testing.assert_close(first(x), expected)
    h = first(x)
    shortcut = F.pixel_unshuffle(h, 2).view(2, 8, 2, 4, 4).mean(2)
    torch.testing.assert_close(second(h), shortcut + second.body[0](h))
    assert second.body[0].weight.data_ptr() != third.body[0].weight.data_ptr()  # each repeat its own weights
    assert plan.params == sum(p.numel() for p in stack.parameters())


def test_residual_spans_round_trip_through_a_structure_file(tmp_path):
    tokens = ["C2d_3_8_3_1_1", {"residual": ["GN_4_?", "SiLU", {"residual": ["C2d_?_8_3_1_1"]}],
                                "shortcut": "Id", "repeat": 2}, "@begin", "C2d_?_8_3_1_1", "@end"]
    path = tmp_path / "s.json"
    path.write_text(json.dumps(tokens))
    assert unparse_structure(load_structure(path)) == tokens


@pytest.mark.parametrize("element, message", [
    ({"residual": []}, '"residual" must be a non-empty list of tokens'),
    ({"body": ["SiLU"]}, "a residual span is an object with the keys residual, shortcut, repeat"),
    ({"residual": ["SiLU"], "shortcut": ["Id"]}, '"shortcut" must be one token string'),
    ({"residual": ["SiLU"], "repeat": 0}, '"repeat" must be a whole number from 1 to 1024, found 0'),
    ({"residual": ["SiLU", "KLL_3"]}, "unknown layer 'KLL'"),
    ({"residual": ["C2d_?_8_3_2_1"]}, "the residual span's body gives (8, 4, 4), but the identity shortcut keeps "
                                      "(4, 8, 8)"),
    ({"residual": ["C2d_?_8_3_2_1"], "shortcut": "S2C_2_4"}, "its shortcut 'S2C_2_4' gives (4, 4, 4)"),
    ({"residual": ["VQ_8_?"]}, "VQ cannot be inside a residual span"),
])
def test_residual_span_errors_name_the_position_and_what_was_expected(element, message):
    with pytest.raises(StructureError) as info:
        trace(parse_structure(["C2d_4_4_1", element], source="enc.json"), (4, 8, 8))
    text = str(info.value)
    assert text.startswith("enc.json") and "position 2" in text and message in text, text


# --- DC-AE shortcuts ---------------------------------------------------------------------------

def test_space_to_channel_averages_each_pixel_group_of_the_unshuffled_map():
    """Against a loop over positions: output channel k at (i, j) is the mean of the unshuffled
    channels k*g .. k*g+g-1, where unshuffled channel c*4 + a*2 + b is input channel c at (2i+a, 2j+b)."""
    x = torch.randn(1, 3, 4, 6, dtype=torch.float64)
    layer = trace(parse_structure(["S2C_2_4"]), (3, 4, 6)).build()
    out = layer(x)
    unshuffled = torch.zeros(1, 12, 2, 3, dtype=torch.float64)
    for c, a, b, i, j in itertools.product(range(3), range(2), range(2), range(2), range(3)):
        unshuffled[0, c * 4 + a * 2 + b, i, j] = x[0, c, 2 * i + a, 2 * j + b]
    torch.testing.assert_close(out, unshuffled.view(1, 4, 3, 2, 3).mean(2))


def test_channel_to_space_duplicates_channels_then_shuffles():
    x = torch.randn(1, 4, 2, 3, dtype=torch.float64)
    out = trace(parse_structure(["C2S_2_2"]), (4, 2, 3)).build()(x)  # 2 * 4 / 4 = 2 copies of each channel
    for k, a, b, i, j in itertools.product(range(2), range(2), range(2), range(2), range(3)):
        source = (k * 4 + a * 2 + b) // 2  # the duplicated channel that lands at sub-position (a, b)
        assert out[0, k, 2 * i + a, 2 * j + b] == x[0, source, i, j]


def test_shortcut_arguments_are_checked():
    with pytest.raises(StructureError, match="cannot be averaged into 5 channels"):
        trace(parse_structure(["S2C_2_5"]), (3, 4, 4))
    with pytest.raises(StructureError, match="is not a multiple of the 3 input channels"):
        trace(parse_structure(["C2S_2_1"]), (3, 4, 4))


# --- ViT tokens ----------------------------------------------------------------------------------

def test_vit_block_equals_a_hand_written_pre_norm_transformer():
    torch.manual_seed(0)
    block = trace(parse_structure(["ViT_2_mlp=2"]), (8, 3, 2)).build()[0].eval()
    x = torch.randn(2, 8, 3, 2)
    tokens = x.flatten(2).transpose(1, 2)  # (B, 6, 8)
    h = F.layer_norm(tokens, (8,), block.norm1.weight, block.norm1.bias, 1e-6)
    q, k, v = (h @ block.qkv.weight.T + block.qkv.bias).chunk(3, dim=-1)
    heads = lambda t: t.view(2, 6, 2, 4).transpose(1, 2)  # noqa: E731
    weights = torch.softmax(heads(q) @ heads(k).transpose(-1, -2) / math.sqrt(4), dim=-1)
    attended = (weights @ heads(v)).transpose(1, 2).reshape(2, 6, 8)
    tokens = tokens + attended @ block.proj.weight.T + block.proj.bias
    tokens = tokens + block.mlp(F.layer_norm(tokens, (8,), block.norm2.weight, block.norm2.bias, 1e-6))
    torch.testing.assert_close(block(x), tokens.transpose(1, 2).reshape(2, 8, 3, 2), atol=1e-5, rtol=1e-5)


def test_sincos_position_embedding_values():
    from flexvae.layers.transformer import sincos_2d

    emb = sincos_2d(8, 3, 5, dtype=torch.float64)
    omega = [1.0, 0.01]  # 1 / 10000^(i / 2) for a quarter of 2 channels
    for i, j in itertools.product(range(3), range(5)):
        expected = [math.sin(i * omega[0]), math.sin(i * omega[1]), math.cos(i * omega[0]), math.cos(i * omega[1]),
                    math.sin(j * omega[0]), math.sin(j * omega[1]), math.cos(j * omega[0]), math.cos(j * omega[1])]
        torch.testing.assert_close(emb[:, i, j], torch.tensor(expected, dtype=torch.float64))


def test_patch_and_unpatch_invert_a_pixel_rearrangement():
    plan = trace(parse_structure(["Patch_2_12", "Unpatch_2_3"]), (3, 4, 4))
    stack = plan.build()
    with torch.no_grad():  # Patch = identity rearrangement (space to depth), Unpatch = its inverse
        stack[0].weight.zero_(); stack[0].bias.zero_()
        for c, a, b in itertools.product(range(3), range(2), range(2)):
            stack[0].weight[c * 4 + a * 2 + b, c, a, b] = 1
        stack[1].proj.weight.copy_(torch.eye(12)[:, :, None, None]); stack[1].proj.bias.zero_()
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(stack(x), x)


# --- binary quantizers -----------------------------------------------------------------------------

@pytest.mark.parametrize("spherical", [False, True])
def test_binary_entropy_terms_against_enumerating_every_code(spherical):
    """Per-position entropy (exact) and codebook entropy (sum of per-bit marginals, an upper bound
    of the joint) against the softmax over all 2^bits codes of -|x - c|^2 / T."""
    bits, temperature = 4, 0.5
    quantizer = BinaryQuantizer(bits, spherical, commitment=0.0, entropy_weight=1.0, diversity=0.0,
                                entropy_temperature=temperature)
    z = torch.randn(3, bits, 2, 2, dtype=torch.float64)
    x = F.normalize(z, dim=1) if spherical else z
    scale = 1 / math.sqrt(bits) if spherical else 1.0
    codes = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=bits)), dtype=torch.float64) * scale
    vectors = x.permute(0, 2, 3, 1).reshape(-1, bits)
    probs = torch.softmax(-torch.cdist(vectors, codes).square() / temperature, dim=1)  # (N, 16)
    per_position = -(probs * probs.log()).sum(1).mean()
    _, _, losses = quantizer(z)
    kind = "bsq" if spherical else "lfq"
    torch.testing.assert_close(losses[f"{kind}_entropy"].double(), per_position, atol=1e-5, rtol=1e-5)
    joint = probs.mean(0)
    joint_entropy = -(joint * joint.log()).sum()
    diverse = BinaryQuantizer(bits, spherical, commitment=0.0, entropy_weight=1.0, diversity=1.0,
                              entropy_temperature=temperature)
    codebook = per_position - diverse(z)[2][f"{kind}_entropy"].double()
    assert codebook >= joint_entropy - 1e-6  # the factorised codebook entropy bounds the joint one from above
    marginal = (probs[:, None, :] * (codes.T[None] > 0)).sum(2).mean(0)  # P(bit i = 1) over the batch
    torch.testing.assert_close(codebook, -(marginal * marginal.log() + (1 - marginal) * (1 - marginal).log()).sum(),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["lfq", "bsq"])
def test_binary_latents_quantize_to_signs_and_round_trip_codes(kind):
    latent = LATENTS.get(kind).build(LATENTS.get(kind).params(bits=5))
    z = torch.randn(4, 5, 3, 3, requires_grad=True)
    posterior = latent(z)
    value = posterior.mode()
    scale = 1 / math.sqrt(5) if kind == "bsq" else 1.0
    torch.testing.assert_close(value, torch.sign(z.detach()) * scale)
    expected_codes = ((z.detach() > 0).long() * (2 ** torch.arange(5)).view(1, 5, 1, 1)).sum(1)
    assert torch.equal(posterior.codes, expected_codes)
    torch.testing.assert_close(latent.decode_codes(posterior.codes), value)
    value.sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0  # straight through
    if kind == "bsq":
        torch.testing.assert_close(value.norm(dim=1), torch.ones(4, 3, 3))


def test_every_discrete_latent_logs_codebook_usage_and_perplexity():
    for kind, params in (("vq", {}), ("fsq", {}), ("lfq", {"bits": 4}), ("bsq", {"bits": 4})):
        latent = LATENTS.get(kind).build(LATENTS.get(kind).params(**params)).train()
        latent(torch.randn(64, latent.quantizer.dim))  # a training batch of 64 vectors
        metrics = latent.metrics()
        usage = [v for k, v in metrics.items() if k.endswith("usage")]
        perplexity = [v for k, v in metrics.items() if k.endswith("perplexity")]
        assert len(usage) == 1 and 0 < usage[0] <= 1, (kind, metrics)
        assert len(perplexity) == 1 and 1 <= perplexity[0] <= 64, (kind, metrics)
    lfq = LATENTS.get("lfq").build(LATENTS.get("lfq").params(bits=2)).train()
    lfq(torch.tensor([[1.0, 1.0], [-1.0, 1.0], [1.0, -1.0], [-1.0, -1.0]]))
    assert lfq.metrics() == {"lfq_usage": 1.0, "lfq_perplexity": pytest.approx(4.0)}  # 4 codes, evenly


# --- tiling conformance: what a token says about its receptive field is true ----------------------

def test_every_local_2d_token_example_tiles_exactly():
    """For every token example on 2D maps: if the footprint calls it local, tiled = untiled."""
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


# --- the presets built from these tokens ------------------------------------------------------------

@pytest.mark.parametrize("preset", ["dcae_f32", "vit_ae", "lfq_tokenizer"])
def test_new_presets_train_a_step_and_reload_from_their_checkpoint(preset, tmp_path):
    """Each preset (residual spans, S2C/C2S, Patch/Pos2d/ViT/Unpatch, LFQ) trains one step on two
    64 px images, and the checkpoint rebuilds a model that reconstructs exactly as the saved one."""
    import csv

    import numpy as np
    from PIL import Image

    from flexvae.checkpoint import load_run
    from helpers.inprocess import run_in_process
    from helpers.runs import REPO

    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for index in range(2):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(images / f"{index}.png")
    run = tmp_path / "run"
    result = run_in_process(["-t", "-c", str(REPO / "configs" / f"{preset}.toml"), "--set", f"data.path={images}",
                             "--set", f"train.out_dir={run}", "--set", "train.max_steps=1", "--set",
                             "train.batch_size=2", "--set", "data.num_workers=0", "--set", "train.device=cpu",
                             "--set", "train.fit_prior=0", "--set", "train.log_every=1"])
    assert result.returncode == 0, result.stderr
    first, second = load_run(run), load_run(run)
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        a, b = first.vae.reconstruct(x), second.vae.reconstruct(x)
    assert torch.isfinite(a).all() and torch.equal(a, b)
    columns = next(csv.reader(open(run / "metrics.csv")))
    if preset == "lfq_tokenizer":
        assert {"lfq_commit", "lfq_entropy", "lfq_usage", "lfq_perplexity"} <= set(columns), columns


# --- residual VQ ------------------------------------------------------------------------------------

def test_residual_vq_quantizes_residuals_in_turn_and_round_trips_codes():
    """Against a hand-written greedy residual quantizer with the same codebooks."""
    from flexvae.latents.rvq import ResidualQuantizer

    torch.manual_seed(0)
    rvq = ResidualQuantizer(3, 8, 4).eval()
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    z_q, codes, losses = rvq(z)
    vectors = z.detach().movedim(1, -1).reshape(-1, 4)
    residual, total, digits = vectors.clone(), torch.zeros_like(vectors), []
    for quantizer in rvq.quantizers:
        book = quantizer.embedding.detach()
        pick = torch.cdist(residual, book).argmin(1)
        digits.append(pick)
        total += book[pick]
        residual -= book[pick]
    expected_codes = sum(d * 8 ** level for level, d in enumerate(digits)).view(2, 3, 3)
    assert torch.equal(codes, expected_codes)
    torch.testing.assert_close(z_q.detach().movedim(1, -1).reshape(-1, 4), total)
    torch.testing.assert_close(rvq.lookup(codes), z_q.detach())
    z_q.sum().backward()
    torch.testing.assert_close(z.grad, torch.ones_like(z))  # straight through
    assert set(losses) == {"rvq_commit"} and losses["rvq_commit"] > 0


def test_residual_vq_matches_vector_quantize_pytorch_with_the_same_codebooks():
    vqp = pytest.importorskip("vector_quantize_pytorch")
    from flexvae.latents.rvq import ResidualQuantizer

    torch.manual_seed(0)
    ours = ResidualQuantizer(4, 16, 6).eval()
    theirs = vqp.ResidualVQ(dim=6, num_quantizers=4, codebook_size=16, kmeans_init=False).eval()
    with torch.no_grad():
        for layer, quantizer in zip(theirs.layers, ours.quantizers):
            layer._codebook.embed.copy_(quantizer.embedding[None])
    z = torch.randn(3, 6, 5, 5)
    with torch.no_grad():
        z_q, codes, _ = ours(z)
        quantized, indices, _ = theirs(z.movedim(1, -1).reshape(3, 25, 6))
    torch.testing.assert_close(z_q.movedim(1, -1).reshape(3, 25, 6), quantized, atol=1e-5, rtol=1e-5)
    combined = sum(indices[..., level] * 16 ** level for level in range(4))
    assert torch.equal(codes.reshape(3, 25), combined)


@pytest.mark.parametrize("latent, settings, tokens", [
    ("bsq", ["latent.bits=4"], []),
    ("rvq", ["latent.rvq_levels=2", "latent.codebook_size=8", "latent.code_dim=4"], []),
    ("gaussian", [], ["RVQ_2_8_?", "BSQ_?", "LFQ_?"]),
])
def test_new_latents_and_quantizer_tokens_train_a_step_and_reload(latent, settings, tokens, tmp_path):
    """bsq and rvq latents, and the RVQ/BSQ/LFQ tokens inside a decoder, train a step through the
    CLI; the checkpoint rebuilds a model that reconstructs exactly as a second rebuild does, and
    their losses and codebook statistics are logged."""
    import csv

    import numpy as np
    from PIL import Image

    from flexvae.checkpoint import load_run
    from helpers.inprocess import run_in_process
    from helpers.runs import tiny

    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for index in range(4):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(images / f"{index}.png")
    latent_channels = 4 if latent != "gaussian" else 2
    encoder = ["C2d_3_8_3_1_1", "Down_?_8", "C2d_?_4_3_1_1"]
    decoder = [f"C2d_{latent_channels}_8_3_1_1", "C2d_?_4_1_1_0", *tokens, "UpS_2", "C2d_?_3_3_1_1"]
    (tmp_path / "enc.json").write_text(json.dumps(encoder))
    (tmp_path / "dec.json").write_text(json.dumps(decoder))
    run = tmp_path / "run"
    result = run_in_process(["-t", *tiny(images, run, "--set", f"model.latent={latent}", *sum(
        (["--set", s] for s in settings), []), "--set", f"model.encoder={tmp_path / 'enc.json'}", "--set",
        f"model.decoder={tmp_path / 'dec.json'}", "--set", "train.max_steps=1", "--set", "train.log_every=1",
        "--set", "train.fit_prior=0")])
    assert result.returncode == 0, result.stderr
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.equal(load_run(run).vae.reconstruct(x), load_run(run).vae.reconstruct(x))
    columns = set(next(csv.reader(open(run / "metrics.csv"))))
    expected = {"bsq": {"bsq_commit", "bsq_entropy", "bsq_usage"}, "rvq": {"rvq_commit", "rvq_usage"},
                "gaussian": {"dec_rvq_commit_2", "dec_bsq_entropy_3", "dec_lfq_commit_4", "dec_lfq_usage_4"}}[latent]
    assert expected <= columns, columns
