"""The layer registry and the built-in blocks.

Every registered token is built and run forward and backward from a table of examples; a
token registered without an example fails ``test_every_token_runs_forward_and_backward``.
"""

import importlib.util
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from flexvae.build import Stack, trace
from flexvae.dsl import parse_structure, parse_token
from flexvae.errors import FlexVAEError, StructureError
from flexvae.forward_state import ForwardState
from flexvae.layers import group_count
from flexvae.layers.attention import AttentionBlock
from flexvae.layers.conv import Downsample
from flexvae.layers.resnet import ResidualBlock
from flexvae.registry import LAYERS, Arg, Registry

# Token name -> examples of (tokens, per-sample input shape). Add one when registering a layer.
EXAMPLES = {
    "C1d": [(["C1d_4_6_3_1_1"], (4, 8)), (["C1d_?_6_3_padding=1_padding_mode=reflect"], (4, 8))],
    "C2d": [(["C2d_4_6_3_1_1"], (4, 8, 8)), (["C2d_?_6_3_2_1_bias=false_padding_mode=circular"], (4, 8, 8))],
    "C3d": [(["C3d_4_6_3_1_1"], (4, 4, 4, 4))],
    "CT1d": [(["CT1d_4_6_4_2_1"], (4, 8))],
    "CT2d": [(["CT2d_4_6_4_2_1"], (4, 4, 4)), (["CT2d_?_6_3_2_1_output_padding=1"], (4, 4, 4))],
    "CT3d": [(["CT3d_4_6_4_2_1"], (4, 2, 2, 2))],
    "Down": [(["Down_4_6"], (4, 8, 8)), (["Down_?_6_pad=asym"], (4, 8, 8)), (["Down_4_4"], (4, 8)),
             (["Down_4_4_pad=asym"], (4, 4, 4, 4))],
    "VAERB": [(["VAERB_4_8"], (4, 8, 8)), (["VAERB_?_4_2_eps=1e-6_dropout=0.1"], (4, 8)),
              (["VAERB_4_4"], (4, 4, 4, 4))],
    "VAEA": [(["VAEA_4"], (4, 4, 4)), (["VAEA_?_2_eps=1e-6"], (4, 6)), (["VAEA_4"], (4, 2, 2, 2))],
    "GN": [(["GN_2_4"], (4, 8, 8)), (["GN_4_?_eps=1e-6_affine=false"], (4, 8))],
    "BN1d": [(["BN1d_4"], (4, 8))],
    "BN": [(["BN_?_momentum=0.2"], (4, 8, 8))],
    "BN3d": [(["BN3d_4"], (4, 2, 2, 2))],
    "LN": [(["LN_8"], (4, 8)), (["Flat", "LN_?"], (4, 2, 2))],
    "SiLU": [(["SiLU"], (4, 8, 8))],
    "ReLU": [(["ReLU"], (4, 8))],
    "LReLU": [(["LReLU_0.2"], (4, 8, 8))],
    "GELU": [(["GELU"], (4, 8)), (["GELU_approximate=tanh"], (4, 8, 8))],
    "Tanh": [(["Tanh"], (4, 8, 8))],
    "Sigm": [(["Sigm"], (4, 8, 8))],
    "MaxP1d": [(["MaxP1d_2"], (4, 8))],
    "MaxP": [(["MaxP_2"], (4, 8, 8)), (["MaxP_3_2_1"], (4, 8, 8))],
    "MaxP3d": [(["MaxP3d_2"], (4, 4, 4, 4))],
    "AvgP1d": [(["AvgP1d_2"], (4, 8))],
    "AvgP": [(["AvgP_2"], (4, 8, 8))],
    "AvgP3d": [(["AvgP3d_2"], (4, 4, 4, 4))],
    "UpS": [(["UpS_2"], (4, 4, 4)), (["UpS_2_mode=linear"], (4, 4)), (["UpS_2_mode=bilinear"], (4, 4, 4)),
            (["UpS_2_mode=trilinear"], (4, 2, 2, 2))],
    "PixS": [(["PixS_2"], (8, 4, 4))],
    "PixU": [(["PixU_2"], (2, 8, 8))],
    "Lin": [(["Flat", "Lin_?_6"], (2, 2, 2)), (["Lin_8_6_bias=false"], (4, 8))],
    "Flat": [(["Flat"], (4, 4, 4))],
    "Reshape": [(["Reshape_4_16"], (4, 4, 4)), (["Flat", "Reshape_4_2_2_2"], (4, 2, 2, 2))],
    "Drop": [(["Drop"], (4, 8, 8)), (["Drop_0.1"], (4, 8))],
    "Id": [(["Id"], (4, 8, 8))],
    "VQ": [(["VQ_16_?"], (4, 8, 8)), (["VQ_8_4_beta=0.5_decay=0_dead=0"], (4, 6)),
           (["Flat", "VQ_8_?_kmeans=true"], (2, 2, 2)), (["C2d_4_4_1", "VQ_16_?"], (4, 4, 4)),
           (["VQ_8_?_kmeans=true"], (4, 2, 2, 2))],
    "CtxCat": [(["CtxCat_3"], (4, 8, 8)), (["CtxCat_2"], (4, 8)), (["Flat", "CtxCat_5"], (2, 2, 2))],
    "CtxFiLM": [(["CtxFiLM_?"], (4, 8, 8)), (["CtxFiLM_4"], (4, 2, 2, 2))],
    "Const": [(["Const_3_4_4", "C2d_3_4_3_1_1"], (2, 8, 8)), (["Const_5"], (2,))],
    "Keep": [(["Keep_name=a"], (4, 8, 8)), (["Keep_name=a", "C2d_4_4_3_1_1", "Keep_name=b"], (4, 8, 8))],
    "Z": [(["Z_3_enc=s"], (4, 8, 8)), (["Z_2_enc=s_merge=cat_hidden=8", "C2d_6_4_1"], (4, 8, 8)),
          (["Z_3_enc=v"], (6,)), (["Z_2_enc=l_name=other_depth=2_kernel=1"], (4, 8)), (["Z_2_enc=c"], (4, 2, 2, 2))],
    "S2C": [(["S2C_2_8"], (4, 8, 8)), (["S2C_2_16_4"], (4, 8, 8))],
    "C2S": [(["C2S_2_4"], (8, 4, 4)), (["C2S_2_2"], (4, 4, 4))],
    "Patch": [(["Patch_4_8"], (3, 16, 16))],
    "Unpatch": [(["Unpatch_4_3"], (8, 4, 4))],
    "Pos2d": [(["Pos2d"], (8, 4, 4)), (["C2d_3_4_1", "Pos2d_4"], (3, 4, 6))],
    "ViT": [(["ViT_2"], (8, 4, 4)), (["ViT_1_mlp=2_eps=1e-5"], (4, 6)), (["Patch_2_8", "Pos2d", "2*ViT_4"], (3, 8, 8))],
    "RVQ": [(["RVQ_2_8_?"], (4, 4, 4)), (["RVQ_3_4_4_decay=0_dead=0"], (4, 6))],
    "LFQ": [(["LFQ_?"], (6, 4, 4)), (["LFQ_4_commit=0.1_entropy=0_diversity=0.5"], (4, 8))],
    "BSQ": [(["BSQ_?_temperature=0.1"], (6, 4, 4)), (["Flat", "BSQ_?"], (2, 2, 2))],
    "PCA": [(["Flat", "PCA_?_6"], (2, 2, 2)), (["PCA_8_8"], (4, 8))],
    "PCAInv": [(["PCAInv_8_12"], (4, 8)), (["Flat", "PCAInv_?_3"], (2, 2, 2))],
    "Center": [(["Center"], (4, 8, 8)), (["Center"], (4, 8)), (["Center"], (4, 2, 2, 2))],
    "Gain": [(["Gain"], (4, 8, 8)), (["Gain_0.5"], (6,))],
    "FSQ": [(["FSQ_8_5_5"], (3, 4, 4)), (["FSQ_3"], (1, 2, 2, 2)), (["C2d_4_4_1", "FSQ_8_5_5_5"], (4, 4, 4)),
            (["FSQ_3_3"], (2, 6))],
}
IGNORE_THEIR_INPUT = {"Const"}  # tokens whose output does not depend on their input


# encoder activations the Z examples read: (channels, *positions) matching their inputs'
KEPT = {"s": (5, 8, 8), "v": (5,), "l": (3, 8), "c": (2, 2, 2, 2)}


# ------------------------------------------------------------------ binding errors
def _trace_error(tokens, in_shape=(4, 8, 8)) -> str:
    with pytest.raises(StructureError) as info:
        trace(parse_structure(tokens, source="enc.json"), in_shape)
    message = str(info.value)
    position = len(tokens)
    assert f"enc.json, position {position}, token {tokens[-1]!r}" in message, message
    return message


@pytest.mark.parametrize("name", LAYERS.names())
def test_every_token_runs_forward_and_backward(name):
    assert name in EXAMPLES, f"registered token {name!r} has no example in tests/test_layers.py EXAMPLES"
    for tokens, in_shape in EXAMPLES[name]:
        specs = parse_structure(tokens, source="example")
        assert name in {s.name for s in specs}
        torch.manual_seed(0)
        # context tokens embed one of 3 classes; latent groups read the encoder activations KEPT
        plan = trace(specs, in_shape, classes=3, kept=KEPT)
        stack = plan.build()
        assert isinstance(stack, Stack)
        x = torch.randn(2, *in_shape, requires_grad=True)
        state = ForwardState(kept={name: torch.randn(2, *shape) for name, shape in KEPT.items()})
        out, aux = stack.forward_aux(x, state)
        assert tuple(out.shape) == (2, *plan.out_shape), tokens
        assert torch.isfinite(out).all(), tokens
        kl = sum(group.kl().mean() for group in state.posteriors.values())  # reaches the prior nets
        (out.square().mean() + sum(v for v in aux.values()) + kl).backward()
        if name not in IGNORE_THEIR_INPUT:
            assert x.grad is not None and torch.isfinite(x.grad).all(), tokens
        for param in stack.parameters():
            if param.requires_grad:
                assert param.grad is not None and torch.isfinite(param.grad).all(), tokens
        # The traced parameter count is the built module's.
        assert plan.params == sum(p.numel() for p in stack.parameters())


def test_examples_name_only_registered_tokens():
    assert not set(EXAMPLES) - set(LAYERS.names()), "EXAMPLES lists tokens that are not registered"


def test_layer_table_mentions_every_token():
    table = LAYERS.table()
    for layer in LAYERS:
        assert layer.signature() in table
        assert layer.doc in table


def test_unknown_name_suggests_closest():
    message = _trace_error(["VAERBB_4_4"])
    assert "unknown layer 'VAERBB'" in message and "Did you mean 'VAERB'" in message, message
    message = _trace_error(["Silu"])
    assert "'SiLU'" in message, message


def test_too_many_arguments():
    message = _trace_error(["GN_2_4_1e-5_1_7"])
    assert "takes at most 4 arguments, found 5" in message and "usage: GN(" in message, message


def test_missing_argument():
    message = _trace_error(["C2d_4_8"])
    assert "missing argument 'kernel_size'" in message and "usage: C2d(" in message, message


def test_wrong_type_float_for_int():
    message = _trace_error(["C2d_4_8_3.5"])
    assert "'kernel_size' must be a whole number" in message and "3.5" in message, message
    message = _trace_error(["C2d_4_8_3_stride=true"])
    assert "'stride' must be a whole number" in message, message


def test_placeholder_for_non_inferable_argument():
    message = _trace_error(["C2d_4_8_?"])
    assert "'?' cannot stand for 'kernel_size'" in message, message
    message = _trace_error(["Reshape_?"])
    assert "'?' cannot stand for 'shape'" in message, message


def test_choices_violation():
    message = _trace_error(["Down_4_8_pad=middle"])
    assert "'pad' must be one of sym, asym" in message and "middle" in message, message
    message = _trace_error(["C2d_4_8_3_padding_mode=mirror"])
    assert "zeros, reflect, replicate, circular" in message, message


def test_unknown_keyword_suggests_closest():
    message = _trace_error(["C2d_4_8_3_paddin=1"])
    assert "no argument 'paddin'" in message and "Did you mean 'padding'" in message, message


def test_argument_given_by_position_and_by_name():
    message = _trace_error(["C2d_4_8_3_kernel_size=3"])
    assert "'kernel_size' is given both by position and by name" in message, message


def test_user_layer_from_plugin_module(tmp_path, monkeypatch):
    monkeypatch.setattr(LAYERS, "layers", dict(LAYERS.layers))  # registrations vanish after the test
    plugin = tmp_path / "my_layers.py"
    plugin.write_text(
        "import torch.nn as nn\n"
        "from flexvae.registry import register, Arg\n"
        "\n"
        "@register('Scale', Arg('factor', float, 2.0, doc='multiplier'), doc='multiply by a constant')\n"
        "class Scale(nn.Module):\n"
        "    def __init__(self, factor=2.0):\n"
        "        super().__init__()\n"
        "        self.factor = factor\n"
        "\n"
        "    def forward(self, x):\n"
        "        return x * self.factor\n"
    )
    spec = importlib.util.spec_from_file_location("my_layers", plugin)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))  # registers 'Scale'

    assert "Scale" in LAYERS
    assert "Scale(factor=2.0)" in LAYERS.table()
    plan = trace(parse_structure(["C2d_4_4_1", "Scale_factor=3", "Scale"], source="enc.json"), (4, 8, 8))
    stack = plan.build()
    x = torch.randn(1, 4, 8, 8)
    assert torch.allclose(stack(x), stack[0](x) * 6)


def test_reregistering_a_name_with_another_class_fails(monkeypatch):
    monkeypatch.setattr(LAYERS, "layers", dict(LAYERS.layers))
    original = LAYERS.layers["C2d"]

    class OtherConv(nn.Conv2d):
        pass

    with pytest.raises(FlexVAEError, match="'C2d' is already registered"):
        LAYERS.register("C2d", Arg("in_channels"), doc="another conv")(OtherConv)
    assert LAYERS.layers["C2d"] is original
    # The same class again (a module imported twice) is allowed.
    LAYERS.register("C2d", *original.args, doc=original.doc, dims=original.dims)(original.factory)


def test_registry_rejects_bad_declarations():
    registry = Registry()
    with pytest.raises(ValueError, match="letters and digits"):
        registry.register("My_Layer", doc="x")
    with pytest.raises(ValueError, match="declared twice"):
        registry.register("A", Arg("n"), Arg("n"), doc="x")
    with pytest.raises(ValueError, match="variadic"):
        registry.register("A", Arg("n", variadic=True), Arg("m"), doc="x")


def test_bind_fills_defaults_and_infers():
    layer = LAYERS.layers["C2d"]
    kwargs = layer.bind(parse_token("C2d_?_8_3_padding_mode=reflect"), (5, 8, 8))
    assert kwargs == {
        "in_channels": 5, "out_channels": 8, "kernel_size": 3, "stride": 1, "padding": 0,
        "dilation": 1, "groups": 1, "bias": True, "padding_mode": "reflect",
    }


# ------------------------------------------------------------------ residual block
def test_residual_block_projects_only_when_channels_differ():
    same = ResidualBlock(8, 8)
    assert same.conv_shortcut is None
    assert not any(isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) for m in same.modules())
    changed = ResidualBlock(8, 16)
    assert isinstance(changed.conv_shortcut, nn.Conv2d) and changed.conv_shortcut.kernel_size == (1, 1)

    x = torch.randn(2, 8, 8, 8)
    assert changed(x).shape == (2, 16, 8, 8)
    # With the second convolution silenced, what is left is the shortcut: the input, or its projection.
    for block in (same, changed):
        nn.init.zeros_(block.conv2.weight)
        nn.init.zeros_(block.conv2.bias)
    with torch.no_grad():
        assert torch.equal(same(x), x)
        assert torch.allclose(changed(x), changed.conv_shortcut(x))


def test_residual_block_matches_reference():
    torch.manual_seed(0)
    block = ResidualBlock(4, 6, groups=2).eval()
    x = torch.randn(2, 4, 8, 8)
    h = F.conv2d(F.silu(F.group_norm(x, 2, block.norm1.weight, block.norm1.bias)), block.conv1.weight,
                 block.conv1.bias, padding=1)
    h = F.conv2d(F.silu(F.group_norm(h, 2, block.norm2.weight, block.norm2.bias)), block.conv2.weight,
                 block.conv2.bias, padding=1)
    expected = F.conv2d(x, block.conv_shortcut.weight, block.conv_shortcut.bias) + h
    assert torch.allclose(block(x), expected, atol=1e-5)


@pytest.mark.parametrize("dims, shape", [(1, (2, 4, 8)), (3, (2, 4, 4, 4, 4))], ids=["1d", "3d"])
def test_residual_block_other_dims(dims, shape):
    """The same block in 1D and 3D: torch's functional convolutions of those dims."""
    torch.manual_seed(0)
    block = ResidualBlock(4, 6, groups=2, dims=dims).eval()
    conv = F.conv1d if dims == 1 else F.conv3d
    x = torch.randn(*shape)
    h = conv(F.silu(F.group_norm(x, 2, block.norm1.weight, block.norm1.bias)), block.conv1.weight,
             block.conv1.bias, padding=1)
    h = conv(F.silu(F.group_norm(h, 2, block.norm2.weight, block.norm2.bias)), block.conv2.weight,
             block.conv2.bias, padding=1)
    expected = conv(x, block.conv_shortcut.weight, block.conv_shortcut.bias) + h
    assert torch.allclose(block(x), expected, atol=1e-5)


# ------------------------------------------------------------------ attention block
def test_attention_every_output_position_sees_every_input_position():
    torch.manual_seed(0)
    block = AttentionBlock(4, groups=2)
    x = torch.randn(1, 4, 4, 4)
    jacobian = torch.autograd.functional.jacobian(block, x)  # (1, C, H, W, 1, C, H, W)
    strength = jacobian[0, :, :, :, 0].abs().sum(dim=(0, 3))  # (H_out, W_out, H_in, W_in)
    assert strength.shape == (4, 4, 4, 4)
    assert (strength > 0).all(), "some output position ignores some input position"
    # The original's causal mask let the first pixel see only itself.
    assert strength[0, 0, 3, 3] > 0


def test_attention_matches_reference():
    torch.manual_seed(0)
    block = AttentionBlock(8, groups=4, eps=1e-6)
    x = torch.randn(2, 8, 3, 5)
    h = F.group_norm(x, 4, block.group_norm.weight, block.group_norm.bias, eps=1e-6)
    h = h.flatten(2).transpose(1, 2)  # (B, N, C)
    q, k, v = block.to_q(h), block.to_k(h), block.to_v(h)
    weights = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(8), dim=-1)  # no mask
    expected = x + block.to_out(weights @ v).transpose(1, 2).reshape(x.shape)
    assert torch.allclose(block(x), expected, atol=1e-5)


def test_attention_applies_its_group_norm():
    torch.manual_seed(0)
    block = AttentionBlock(4)
    x = torch.randn(2, 4, 4, 4)
    with torch.no_grad():
        before = block(x)
        block.group_norm.weight.mul_(3.0)
        block.group_norm.bias.add_(0.5)
        after = block(x)
    assert not torch.allclose(before, after)


@pytest.mark.parametrize("shape", [(2, 4, 6), (2, 4, 2, 3, 2)])
def test_attention_on_1d_and_3d(shape):
    torch.manual_seed(0)
    block = AttentionBlock(4)
    x = torch.randn(*shape, requires_grad=True)
    out = block(x)
    assert out.shape == x.shape
    out.sum().backward()
    assert torch.isfinite(x.grad).all()
    # Non-causal in 1D and 3D too: the first position depends on the last.
    flat = torch.autograd.functional.jacobian(block, x.detach()[:1]).reshape(4, -1, 4, x[0, 0].numel())
    assert flat[:, 0, :, -1].abs().sum() > 0


# ------------------------------------------------------------------ group norms
@pytest.mark.parametrize("channels, groups", [(256, 32), (48, 24), (16, 16), (3, 3), (512, 32), (7, 7), (1, 1)])
def test_group_count_rule(channels, groups):
    assert group_count(channels) == groups
    assert channels % group_count(channels) == 0


def test_group_count_inside_blocks():
    assert ResidualBlock(48, 48).norm1.num_groups == 24
    assert AttentionBlock(3).group_norm.num_groups == 3
    assert AttentionBlock(256).group_norm.num_groups == 32


def test_gn_token_rejects_groups_that_do_not_divide():
    message = _trace_error(["GN_32_?"], (48, 4, 4))
    assert "cannot split 48 channels into 32 groups" in message, message
    assert "1, 2, 3, 4, 6, 8, 12, 16, 24, 48" in message, message


# ------------------------------------------------------------------ downsampling
def test_down_asym_equals_pad_then_strided_conv():
    torch.manual_seed(0)
    down = Downsample(4, 6, pad="asym")
    x = torch.randn(2, 4, 8, 8)
    expected = F.conv2d(F.pad(x, (0, 1, 0, 1)), down.conv.weight, down.conv.bias, stride=2, padding=0)
    assert down.conv.padding == (0, 0)
    out = down(x)
    assert out.shape == (2, 6, 4, 4)
    assert torch.allclose(out, expected, atol=1e-6)


def test_down_sym_halves_sizes():
    down = Downsample(4, 6)
    assert down.conv.padding == (1, 1) and down.conv.stride == (2, 2)
    assert down(torch.randn(2, 4, 8, 8)).shape == (2, 6, 4, 4)
    assert down(torch.randn(2, 4, 7, 9)).shape == (2, 6, 4, 5)


@pytest.mark.parametrize("pad", ["sym", "asym"])
def test_down_1d_and_3d(pad):
    assert Downsample(4, 6, pad=pad, dims=1)(torch.randn(2, 4, 16)).shape == (2, 6, 8)
    assert Downsample(4, 6, pad=pad, dims=3)(torch.randn(2, 4, 8, 4, 6)).shape == (2, 6, 4, 2, 3)
    torch.manual_seed(0)
    down = Downsample(4, 6, pad="asym", dims=3)
    x = torch.randn(1, 4, 4, 4, 4)
    expected = F.conv3d(F.pad(x, (0, 1) * 3), down.conv.weight, down.conv.bias, stride=2)
    assert torch.allclose(down(x), expected, atol=1e-6)


def test_maxpool_keeps_original_argument_order():
    plan = trace(parse_structure(["MaxP_3_2"], source="enc.json"), (4, 9, 9))
    pool = plan.build()[0]
    assert pool.kernel_size == 3 and pool.stride == 2
    assert plan.out_shape == (4, 4, 4)
    assert trace(parse_structure(["MaxP_2"]), (4, 8, 8)).build()[0].stride == 2
