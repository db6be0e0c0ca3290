"""Export an SD-structured flexvae model as a diffusers AutoencoderKL folder.

The reverse of the importer: the model's token lists must be exactly those that an
AutoencoderKL config produces (``sd_structures``); the architecture is read back from the
tokens, checked by rebuilding the token lists from it, and every weight is written under its
diffusers name. The folder holds ``config.json`` and ``diffusion_pytorch_model.safetensors``,
which ``AutoencoderKL.from_pretrained(folder)`` loads.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..dsl.structure import parse_structure, unexpanded
from ..errors import CheckpointError
from .layout import DIFFUSERS_WEIGHTS, sd_config, sd_layout, weight_mapping

EXPORT_FORMATS = ("diffusers",)


def _expanded(tokens) -> list[tuple]:
    """(name, args, kwargs) per layer, repeats unrolled: token text written differently compares equal."""
    specs = parse_structure(list(tokens), source="the model")
    out = []
    for spec in specs:
        out += [(spec.name, tuple(spec.args), tuple(sorted(spec.kwargs.items())))] * spec.repeat
    return out


def infer_arch(encoder_tokens, decoder_tokens, data_shape, latent_shape, scaling_factor) -> dict:
    """The AutoencoderKL config whose structures are these token lists; CheckpointError if none is."""
    enc, dec = _expanded(encoder_tokens), _expanded(decoder_tokens)
    not_sd = CheckpointError(
        "export --format diffusers needs a model with the Stable Diffusion autoencoder's structure (the token "
        "lists that --import-weights writes, as in configs/sd_vae.toml); this model's structures differ")
    try:
        norms = [layer for layer in enc if layer[0] == "GN"]
        groups, last_channels = int(norms[-1][1][0]), int(norms[-1][1][1])
        first_down = next(i for i, layer in enumerate(enc) if layer[0] == "Down") if any(
            layer[0] == "Down" for layer in enc) else None
        blocks_before = enc[1:first_down] if first_down is not None else []
        channels = [int(layer[1][1]) for i, layer in enumerate(enc[:-1]) if layer[0] == "VAERB"
                    and enc[i + 1][0] == "Down"] + [last_channels]
        layers_per_block = len(blocks_before) if first_down is not None else sum(
            1 for layer in enc if layer[0] == "VAERB") - 2
        arch = {
            "in_channels": int(data_shape[0]), "out_channels": int(dec[-1][1][1]),
            "block_out_channels": channels, "layers_per_block": layers_per_block,
            "latent_channels": int(latent_shape[0]), "norm_num_groups": groups,
            "mid_block_add_attention": any(layer[0] == "VAEA" for layer in enc),
            "use_quant_conv": enc[-1][0] == "C2d" and int(enc[-1][1][2]) == 1,
            "use_post_quant_conv": dec[0][0] == "C2d" and int(dec[0][1][2]) == 1,
            "scaling_factor": float(scaling_factor), "sample_size": int(data_shape[-1]),
        }
        arch = sd_config(arch)
        rebuilt_enc, rebuilt_dec = sd_layout(arch)
    except (CheckpointError, IndexError, StopIteration, TypeError, ValueError):
        raise not_sd from None
    if _expanded([layer.token for layer in rebuilt_enc]) != enc or _expanded(
            [layer.token for layer in rebuilt_dec]) != dec:
        raise not_sd
    return arch


def diffusers_config(arch: dict) -> dict:
    levels = len(arch["block_out_channels"])
    return {
        "_class_name": "AutoencoderKL",
        "in_channels": arch["in_channels"], "out_channels": arch["out_channels"],
        "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": arch["block_out_channels"], "layers_per_block": arch["layers_per_block"],
        "act_fn": "silu", "latent_channels": arch["latent_channels"], "norm_num_groups": arch["norm_num_groups"],
        "sample_size": arch["sample_size"], "scaling_factor": arch["scaling_factor"],
        "mid_block_add_attention": arch["mid_block_add_attention"],
        "use_quant_conv": arch["use_quant_conv"], "use_post_quant_conv": arch["use_post_quant_conv"],
    }


def export_diffusers(loaded, output) -> Path:
    """Write ``loaded`` (a LoadedModel) as a diffusers folder at ``output`` (new or empty)."""
    from safetensors.torch import save_file

    from ..files import atomic_path, write_text

    vae = loaded.vae
    if vae.latent.kind != "gaussian":
        raise CheckpointError(f"export --format diffusers needs a gaussian latent; this model's is {vae.latent.kind}")
    if vae.output != "value":
        raise CheckpointError(f"export --format diffusers needs a decoder that outputs images; this one outputs "
                              f"{vae.output} (its likelihood is not part of diffusers' AutoencoderKL)")
    meta_tokens = (loaded.plan.encoder.specs, loaded.plan.decoder.specs)
    arch = infer_arch([s.text for s in unexpanded(meta_tokens[0])], [s.text for s in unexpanded(meta_tokens[1])],
                      loaded.data_shape, vae.latent_shape, vae.scaling_factor)
    output = Path(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise CheckpointError(f"--output {output} exists and is not an empty folder; choose a new folder")
    stacks = torch.nn.Module()
    stacks.encoder, stacks.decoder = vae.encoder, vae.decoder
    mapping = weight_mapping(stacks, arch, "diffusers")
    state = {mapping[key]: value.detach().to("cpu").contiguous() for key, value in stacks.state_dict().items()}
    output.mkdir(parents=True, exist_ok=True)
    with atomic_path(output / DIFFUSERS_WEIGHTS) as temporary:
        save_file(state, str(temporary), metadata={"format": "pt"})
    write_text(output / "config.json", json.dumps(diffusers_config(arch), indent=2) + "\n")
    return output

