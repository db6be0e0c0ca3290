"""Residual spans, DC-AE shortcuts, patch and position embeddings and ViT blocks: values against
hand-written references."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
import torch.nn.functional as F

from flexvae.build import trace
from flexvae.dsl import parse_structure
from flexvae.dsl.structure import load_structure, unparse_structure
from flexvae.errors import StructureError


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
