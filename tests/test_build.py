"""Specs -> modules: the meta-device trace, its errors, the presets in structures/ and the table."""

import re
from pathlib import Path

import pytest
import torch

from flexvae.build import build_vae, format_table, plan_vae, trace
from flexvae.dsl import load_structure, parse_structure
from flexvae.errors import StructureError
from flexvae.latents import DeterministicLatent

STRUCTURES = Path(__file__).resolve().parents[1] / "structures"
# Preset name -> image side it is traced at. Large presets are only traced on the meta device.
PRESET_SIZES = {"original": 256, "fixed256": 256, "small": 32, "tiny": 16, "sd_vae": 256, "digits_hvae": 16,
                "photos_hvae": 32, "dcae_f32": 64, "vit_ae": 64, "lfq_tokenizer": 64, "pca_ae": 32}
PRESET_CHANNELS = {"digits_hvae": 1}  # grey; the others take RGB
# Presets made for another latent than the Gaussian: (latent type, its [latent] settings)
PRESET_LATENTS = {"dcae_f32": ("deterministic", {}), "lfq_tokenizer": ("lfq", {"bits": 10}),
                  "pca_ae": ("deterministic", {})}
BUILT_FOR_REAL = {"small", "tiny"}
PRESETS = sorted({p.name.rsplit("_", 1)[0] for p in STRUCTURES.glob("*_encoder.json")})


@pytest.mark.parametrize("path", sorted(STRUCTURES.glob("*.json")), ids=lambda p: p.name)
def test_every_structure_file_parses(path):
    specs = load_structure(path)
    assert specs and all(s.source == str(path) for s in specs)
    assert [s.position for s in specs] == list(range(1, len(specs) + 1))


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_traces(preset):
    assert preset in PRESET_SIZES, f"structures/{preset}_*.json: add its image size to PRESET_SIZES"
    from flexvae.latents import LATENTS

    size, channels = PRESET_SIZES[preset], PRESET_CHANNELS.get(preset, 3)
    kind, settings = PRESET_LATENTS.get(preset, ("gaussian", {}))
    latent = LATENTS.get(kind).build(LATENTS.get(kind).params(**settings))
    plan = plan_vae(STRUCTURES / f"{preset}_encoder.json", STRUCTURES / f"{preset}_decoder.json",
                    (channels, size, size), latent)
    assert plan.decoder.out_shape == (channels, size, size)
    assert plan.latent_shape[0] * (2 if kind == "gaussian" else 1) == plan.encoder.out_shape[0]
    assert plan.decoder.in_shape == plan.latent_shape
    assert plan.encoder.params > 0 and plan.decoder.params > 0
    assert "total parameters" in plan.table()


@pytest.mark.parametrize("preset", sorted(BUILT_FOR_REAL))
def test_small_presets_build_and_train_a_step(preset):
    size = PRESET_SIZES[preset]
    torch.manual_seed(0)
    plan = plan_vae(STRUCTURES / f"{preset}_encoder.json", STRUCTURES / f"{preset}_decoder.json", (3, size, size))
    model = plan.build()
    x = torch.rand(2, 3, size, size) * 2 - 1
    out = model(x)
    assert out.recon.shape == x.shape
    assert out.z.shape == (2, *plan.latent_shape)
    (out.recon - x).square().mean().add(out.posterior.kl().mean()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == plan.encoder.params + plan.decoder.params


def test_original_encoder_with_kernel_3_stride_4_still_loads():
    # Existing users' files must keep loading, including the original's k3/s4 downsampling.
    plan = plan_vae(STRUCTURES / "original_encoder.json", STRUCTURES / "original_decoder.json", (3, 256, 256))
    tokens = [row.token for row in plan.encoder.rows]
    assert "C2d_128_128_3_4_0" in tokens
    assert plan.latent_shape == (4, 16, 16)
    assert plan.decoder.out_shape == (3, 256, 256)


def test_original_presets_at_the_original_size_are_checked_without_memory():
    # Tracing works on meta tensors: nothing real is allocated, so a 256 px preset is cheap.
    plan = plan_vae(STRUCTURES / "fixed256_encoder.json", STRUCTURES / "fixed256_decoder.json", (3, 256, 256))
    assert plan.latent_shape == (4, 16, 16)
    assert plan.encoder.params + plan.decoder.params > 10_000_000


# -------------------------------------------------------------------- errors
ENCODER = ["C2d_3_8_3_1_1", "Down_8_8", "C2d_8_4_3_1_1"]  # (3, 16, 16) -> (4, 8, 8): latent (2, 8, 8)
DECODER = ["C2d_2_8_3_1_1", "UpS_2", "C2d_8_3_3_1_1"]  # (2, 8, 8) -> (3, 16, 16)
DATA = (3, 16, 16)


def _plan_error(encoder=ENCODER, decoder=DECODER, data_shape=DATA, **kwargs) -> str:
    with pytest.raises(StructureError) as info:
        plan_vae(parse_structure(encoder, "enc.json"), parse_structure(decoder, "dec.json"), data_shape, **kwargs)
    return str(info.value)


def test_plan_of_the_test_structures_is_valid():
    plan = plan_vae(ENCODER, DECODER, DATA)
    assert plan.latent_shape == (2, 8, 8)


def test_error_unknown_name_with_suggestions():
    message = _plan_error(encoder=["C2d_3_8_3_1_1", "VAERBB_8_8"] + ENCODER[1:])
    assert "enc.json, position 2, token 'VAERBB_8_8'" in message, message
    assert "unknown layer 'VAERBB'" in message and "'VAERB'" in message, message


def test_error_wrong_argument_count_and_type():
    message = _plan_error(encoder=["C2d_3_8"] + ENCODER[1:])
    assert "position 1" in message and "missing argument 'kernel_size'" in message, message
    message = _plan_error(encoder=ENCODER[:1] + ["Down_8_8_sym_1"] + ENCODER[2:])
    assert "position 2" in message and "'Down_8_8_sym_1'" in message, message
    message = _plan_error(encoder=ENCODER[:1] + ["Down_8_8_1_2"] + ENCODER[2:])
    assert "position 2" in message and "takes at most 3 arguments, found 4" in message, message
    message = _plan_error(encoder=["C2d_3_8.0_3_1_1"] + ENCODER[1:])
    assert "position 1" in message and "'out_channels' must be a whole number, found '8.0'" in message, message


def test_error_channel_mismatch_between_consecutive_layers():
    message = _plan_error(encoder=["C2d_3_8_3_1_1", "Down_16_8", "C2d_8_4_3_1_1"])
    assert "enc.json, position 2, token 'Down_16_8'" in message, message
    assert "in_channels=16" in message and "previous layer's output has 8 channels" in message, message


def test_error_first_layer_does_not_fit_the_data():
    message = _plan_error(data_shape=(1, 16, 16))
    assert "position 1" in message and "in_channels=3" in message and "input data has 1 channels" in message


def test_error_encoder_output_odd_channels():
    message = _plan_error(encoder=["C2d_3_8_3_1_1", "Down_8_8", "C2d_8_5_3_1_1"])
    assert "enc.json, position 3, token 'C2d_8_5_3_1_1'" in message, message
    assert "5 channels" in message and "even" in message, message


def test_error_decoder_input_channels_differ_from_latent():
    message = _plan_error(decoder=["C2d_4_8_3_1_1", "UpS_2", "C2d_8_3_3_1_1"])
    assert "dec.json, position 1, token 'C2d_4_8_3_1_1'" in message, message
    assert "in_channels=4" in message and "gaussian latent" in message and "has 2 channels" in message, message


def test_error_decoder_output_shape_differs_from_input():
    message = _plan_error(decoder=["C2d_2_8_3_1_1", "C2d_8_3_3_1_1"])
    assert "dec.json, position 2" in message, message
    assert "(3, 8, 8)" in message and "(3, 16, 16)" in message, message
    message = _plan_error(decoder=["C2d_2_8_3_1_1", "UpS_2", "C2d_8_1_3_1_1"])
    assert "(1, 16, 16)" in message and "(3, 16, 16)" in message, message


def test_error_layer_of_the_wrong_dimensionality():
    message = _plan_error(encoder=["C1d_3_8_3_1_1"] + ENCODER[1:])
    assert "enc.json, position 1, token 'C1d_3_8_3_1_1'" in message, message
    assert "C1d works on (C, L) data" in message and "(3, 16, 16)" in message, message
    message = _plan_error(encoder=ENCODER[:2] + ["MaxP3d_2"])
    assert "position 3" in message and "(C, D, H, W)" in message, message


def test_error_layer_cannot_take_its_input():
    message = _plan_error(encoder=ENCODER[:2] + ["C2d_8_4_9"])
    assert "enc.json, position 3, token 'C2d_8_4_9'" in message, message
    assert "cannot be applied to the previous layer's output of shape (8, 8, 8)" in message, message
    message = _plan_error(encoder=ENCODER[:2] + ["MaxP_16"])
    assert "position 3" in message and "(8, 8, 8)" in message, message


def test_error_invalid_constructor_arguments():
    message = _plan_error(encoder=ENCODER[:2] + ["GN_3_?"])
    assert "position 3" in message and "cannot split 8 channels into 3 groups" in message, message


def test_error_from_a_file_names_the_file(tmp_path):
    path = tmp_path / "my_encoder.json"
    path.write_text('["C2d_3_8_3_1_1", "C2d_16_8_3_1_1"]')
    with pytest.raises(StructureError) as info:
        trace(load_structure(path), (3, 8, 8))
    assert f"{path}, position 2, token 'C2d_16_8_3_1_1'" in str(info.value)


# ------------------------------------------------------------- inference, repeats
def test_placeholder_infers_channels_and_features():
    plan = trace(parse_structure(["C2d_?_8_3_1_1", "GN_4_?", "VAERB_?_6", "Flat", "Lin_?_5", "LN_?"]), (3, 4, 4))
    kwargs = [k for _, k in plan.layers]
    assert kwargs[0]["in_channels"] == 3
    assert kwargs[1]["num_channels"] == 8
    assert kwargs[2]["in_channels"] == 8
    assert kwargs[4]["in_features"] == 6 * 4 * 4
    assert kwargs[5]["normalized_shape"] == 5
    assert plan.out_shape == (5,)


def test_repeated_tokens_expand_in_order():
    plan = trace(parse_structure(["C2d_3_8_1", "3*VAERB_8_8", "2*SiLU"], source="enc.json"), (3, 4, 4))
    assert [layer.name for layer, _ in plan.layers] == ["C2d", "VAERB", "VAERB", "VAERB", "SiLU", "SiLU"]
    assert [row.position for row in plan.rows] == [1, 2, 2, 2, 3, 3]
    stack = plan.build()
    assert len(stack) == 6
    assert stack[1] is not stack[2]
    assert not torch.equal(stack[1].conv1.weight, stack[2].conv1.weight)  # independent weights


def test_format_table_lists_positions_tokens_shapes_and_true_parameter_total():
    plan = plan_vae(STRUCTURES / "tiny_encoder.json", STRUCTURES / "tiny_decoder.json", (3, 16, 16))
    model = plan.build()
    table = format_table(plan.encoder, "encoder")
    lines = table.splitlines()
    assert lines[0] == "encoder"
    for row in plan.encoder.rows:
        line = next(line for line in lines if re.match(rf"\s*{row.position}\s+{re.escape(row.token)}\s", line))
        assert f"({', '.join(map(str, row.out_shape))})" in line
        assert f"{row.params:,}" in line
    assert "(3, 16, 16)" in table  # the input row
    encoder_params = sum(p.numel() for p in model.encoder.parameters())
    assert lines[-1] == f"total parameters: {encoder_params:,}"
    full = plan.table()
    totals = [int(t.replace(",", "")) for t in re.findall(r"total parameters: ([\d,]+)", full)]
    assert sum(totals) == sum(p.numel() for p in model.parameters())
    assert "latent: gaussian, shape (2, 8, 8)" in full


def test_build_vae_with_deterministic_latent():
    """The code is the encoder's output itself, the reconstruction the decoder's output of it,
    and the KL is zero."""
    torch.manual_seed(0)
    model = build_vae(ENCODER[:2] + ["C2d_8_2_3_1_1"], DECODER, DATA, DeterministicLatent())
    x = torch.randn(2, *DATA)
    out = model(x)
    code = model.encoder(x)
    assert torch.equal(out.z, code) and torch.equal(out.posterior.mode(), code)
    assert torch.equal(out.recon, model.decoder(code))
    assert torch.equal(out.posterior.kl(), torch.zeros(2))


@pytest.mark.parametrize("token", ["VAERB_?_4", "Down_?_4", "C2d_?_4_1", "MaxP_2"])
def test_error_spatial_layer_after_flatten(token):
    with pytest.raises(StructureError) as info:
        trace(parse_structure(["Flat", token], source="enc.json"), (3, 4, 4))
    message = str(info.value)
    assert f"enc.json, position 2, token {token!r}" in message, message
    assert "data, but the previous layer's output has shape (48)" in message, message


def test_checking_a_structure_leaves_the_random_stream_alone():
    """Small layers are traced on real CPU tensors (their construction and dropout draw random
    numbers): the seeded stream a run draws from next must be unchanged."""
    from flexvae.build import plan_vae

    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    plan_vae(["C2d_3_8_3_1_1", "Drop_0.5", "C2d_8_4_3_1_1"], ["C2d_2_8_3_1_1", "Drop_0.5", "C2d_8_3_3_1_1"],
             (3, 8, 8))
    assert torch.equal(torch.rand(4), expected)
