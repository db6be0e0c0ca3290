"""The SD autoencoder's architecture: its diffusers config checked, its token lists, and the
mapping of its weight names onto the flexvae model built from those tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import CheckpointError
from ..layers.norm_act import DEFAULT_GROUPS  # VAERB / VAEA groups: left out of the tokens when equal

# Every GroupNorm of the SD autoencoder has eps 1e-6: the tokens say "eps=1e-6".
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
DEFAULT_OUTPUT = "runs/sd_vae/checkpoints/step_00000000.safetensors"
DEFAULT_IMPORT_CONFIG = "configs/sd_vae.toml"

# diffusers AutoencoderKL config of the SD 1.x/2.x autoencoder
SD_CONFIG = {
    "in_channels": 3, "out_channels": 3, "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2, "latent_channels": 4, "norm_num_groups": 32, "act_fn": "silu",
    "mid_block_add_attention": True, "use_quant_conv": True, "use_post_quant_conv": True,
    "scaling_factor": 0.18215,
}
# Config keys that do not change the network (or are reported as notes).
_PASSIVE = {"sample_size", "scaling_factor", "shift_factor", "latents_mean", "latents_std", "force_upcast"}


def _whole(value, low: int, high: int) -> bool:
    return type(value) is int and low <= value <= high


def _check_types(arch: dict) -> None:
    """Every value that shapes the network has the type and a size a real VAE has (the config
    is untrusted input: no value may ask for an absurd allocation)."""
    problems = []
    channels = arch["block_out_channels"]
    if not (isinstance(channels, (list, tuple)) and 1 <= len(channels) <= 8 and all(_whole(c, 1, 4096) for c in channels)):
        problems.append(f"block_out_channels must be a list of 1 to 8 channel counts up to 4096, got {channels!r}")
    for key, low, high in (("in_channels", 1, 4), ("out_channels", 1, 4), ("layers_per_block", 1, 16),
                           ("latent_channels", 1, 1024), ("norm_num_groups", 1, 4096)):
        if not _whole(arch[key], low, high):
            problems.append(f"{key} must be a whole number from {low} to {high}, got {arch[key]!r}")
    for key in ("down_block_types", "up_block_types"):
        if key in arch and not (isinstance(arch[key], (list, tuple)) and all(isinstance(t, str) for t in arch[key])):
            problems.append(f"{key} must be a list of block names, got {arch[key]!r}")
    for key in ("mid_block_add_attention", "use_quant_conv", "use_post_quant_conv"):
        if not isinstance(arch[key], bool):
            problems.append(f"{key} must be true or false, got {arch[key]!r}")
    factor = arch["scaling_factor"]
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 < factor < float("inf"):
        problems.append(f"scaling_factor must be a positive number, got {factor!r}")
    size = arch.get("sample_size", 0)
    size = size[0] if isinstance(size, (list, tuple)) and size else size
    if "sample_size" in arch and not _whole(size, 1, 16384):
        problems.append(f"sample_size must be a whole number from 1 to 16384, got {arch['sample_size']!r}")
    if not isinstance(arch["act_fn"], str):
        problems.append(f"act_fn must be a name, got {arch['act_fn']!r}")
    if problems:
        raise CheckpointError("not a supported AutoencoderKL config: " + "; ".join(problems))


def sd_config(config: dict | None = None) -> dict:
    """SD defaults updated with ``config`` (a diffusers config.json dict), checked."""
    if config is not None and not isinstance(config, dict):
        raise CheckpointError(f"not a supported AutoencoderKL config: config.json must hold a JSON object, "
                              f"found {type(config).__name__}")
    config = {k: v for k, v in (config or {}).items() if not k.startswith("_")}
    arch = {**SD_CONFIG, **config}
    _check_types(arch)
    levels = len(arch["block_out_channels"])
    down = arch.pop("down_block_types", ["DownEncoderBlock2D"] * levels)
    up = arch.pop("up_block_types", ["UpDecoderBlock2D"] * levels)
    problems = []
    if set(down) != {"DownEncoderBlock2D"} or len(down) != levels:
        problems.append(f"down_block_types must be {levels} x DownEncoderBlock2D, got {down}")
    if set(up) != {"UpDecoderBlock2D"} or len(up) != levels:
        problems.append(f"up_block_types must be {levels} x UpDecoderBlock2D, got {up}")
    if arch["act_fn"] != "silu":
        problems.append(f"act_fn must be 'silu', got {arch['act_fn']!r}")
    unknown = sorted(set(arch) - set(SD_CONFIG) - _PASSIVE)
    if unknown:
        problems.append(f"unknown config keys {unknown}")
    groups = arch["norm_num_groups"]
    bad = [c for c in arch["block_out_channels"] if c % groups]
    if bad:
        problems.append(f"norm_num_groups = {groups} does not divide the channel counts {bad}")
    if problems:
        raise CheckpointError("not a supported AutoencoderKL config: " + "; ".join(problems))
    arch["block_out_channels"] = [int(c) for c in arch["block_out_channels"]]
    if isinstance(arch.get("sample_size"), (list, tuple)):
        arch["sample_size"] = arch["sample_size"][0]
    return arch


@dataclass
class Layer:
    """One token of the structure and the module it is in each source layout."""

    token: str
    kind: str  # conv, norm, resnet, attention, down, none
    diffusers: str | None = None
    original: str | None = None


def _resnet(cin, cout, groups):
    g = "" if groups == DEFAULT_GROUPS else f"_groups={groups}"
    return f"VAERB_{cin}_{cout}{g}_eps=1e-6"


def _attention(channels, groups):
    g = "" if groups == DEFAULT_GROUPS else f"_groups={groups}"
    return f"VAEA_{channels}{g}_eps=1e-6"


def _mid(side, ch, groups, attention):
    layers = [Layer(_resnet(ch, ch, groups), "resnet", f"{side}.mid_block.resnets.0", f"{side}.mid.block_1")]
    if attention:
        layers.append(Layer(_attention(ch, groups), "attention", f"{side}.mid_block.attentions.0",
                            f"{side}.mid.attn_1"))
    layers.append(Layer(_resnet(ch, ch, groups), "resnet", f"{side}.mid_block.resnets.1", f"{side}.mid.block_2"))
    return layers


def sd_layout(arch: dict) -> tuple[list[Layer], list[Layer]]:
    """Encoder and decoder layers, one per token (repeats unrolled), in forward order."""
    chans, n, groups = arch["block_out_channels"], arch["layers_per_block"], arch["norm_num_groups"]
    latent, levels, attn = arch["latent_channels"], len(chans), arch["mid_block_add_attention"]
    enc = [Layer(f"C2d_{arch['in_channels']}_{chans[0]}_3_1_1", "conv", "encoder.conv_in", "encoder.conv_in")]
    prev = chans[0]
    for i, ch in enumerate(chans):
        for j in range(n):
            enc.append(Layer(_resnet(prev, ch, groups), "resnet", f"encoder.down_blocks.{i}.resnets.{j}",
                             f"encoder.down.{i}.block.{j}"))
            prev = ch
        if i < levels - 1:
            enc.append(Layer(f"Down_{ch}_{ch}_pad=asym", "down", f"encoder.down_blocks.{i}.downsamplers.0",
                             f"encoder.down.{i}.downsample"))
    enc += _mid("encoder", prev, groups, attn)
    enc += [Layer(f"GN_{groups}_{prev}_eps=1e-6", "norm", "encoder.conv_norm_out", "encoder.norm_out"),
            Layer("SiLU", "none"),
            Layer(f"C2d_{prev}_{2 * latent}_3_1_1", "conv", "encoder.conv_out", "encoder.conv_out")]
    if arch["use_quant_conv"]:
        enc.append(Layer(f"C2d_{2 * latent}_{2 * latent}_1_1_0", "conv", "quant_conv", "quant_conv"))

    dec = []
    if arch["use_post_quant_conv"]:
        dec.append(Layer(f"C2d_{latent}_{latent}_1_1_0", "conv", "post_quant_conv", "post_quant_conv"))
    prev = chans[-1]
    dec.append(Layer(f"C2d_{latent}_{prev}_3_1_1", "conv", "decoder.conv_in", "decoder.conv_in"))
    dec += _mid("decoder", prev, groups, attn)
    for k, ch in enumerate(reversed(chans)):
        level = levels - 1 - k  # Stable Diffusion's checkpoints number decoder levels from the output side
        for j in range(n + 1):
            dec.append(Layer(_resnet(prev, ch, groups), "resnet", f"decoder.up_blocks.{k}.resnets.{j}",
                             f"decoder.up.{level}.block.{j}"))
            prev = ch
        if k < levels - 1:
            dec += [Layer("UpS_2", "none"),
                    Layer(f"C2d_{ch}_{ch}_3_1_1", "conv", f"decoder.up_blocks.{k}.upsamplers.0.conv",
                          f"decoder.up.{level}.upsample.conv")]
    dec += [Layer(f"GN_{groups}_{prev}_eps=1e-6", "norm", "decoder.conv_norm_out", "decoder.norm_out"),
            Layer("SiLU", "none"),
            Layer(f"C2d_{prev}_{arch['out_channels']}_3_1_1", "conv", "decoder.conv_out", "decoder.conv_out")]
    return enc, dec


def _grouped(layers: list[Layer]) -> list[str]:
    """Consecutive equal tokens written once as ``N*TOKEN``."""
    out: list[list] = []
    for layer in layers:
        if out and out[-1][1] == layer.token:
            out[-1][0] += 1
        else:
            out.append([1, layer.token])
    return [token if count == 1 else f"{count}*{token}" for count, token in out]


def sd_structures(config: dict | None = None) -> tuple[list[str], list[str]]:
    """(encoder tokens, decoder tokens) of the AutoencoderKL described by ``config``."""
    enc, dec = sd_layout(sd_config(config))
    return _grouped(enc), _grouped(dec)


# Parameter names inside one token's module -> inside the source module.
_ATTENTION_NAMES = {
    "diffusers": {"group_norm": "group_norm", "to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"},
    "original": {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"},
}
# Attention names of diffusers files written before its attention rewrite.
_OLD_DIFFUSERS_ATTENTION = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}


def _source_name(layer: Layer, local: str, layout: str) -> str:
    base = getattr(layer, layout)
    module, _, param = local.rpartition(".")
    if layer.kind == "attention":
        module = _ATTENTION_NAMES[layout][module]
    elif layer.kind == "resnet" and layout == "original" and module == "conv_shortcut":
        module = "nin_shortcut"
    return ".".join(p for p in (base, module, param) if p)


def weight_mapping(model, arch: dict, layout: str) -> dict[str, str]:
    """flexvae state_dict key -> source key, for ``layout`` 'diffusers' or 'original'."""
    stacks = dict(zip(("encoder", "decoder"), sd_layout(arch)))
    mapping = {}
    for key in model.state_dict():
        if not key.startswith(("encoder.", "decoder.")):
            continue  # the objective's own parameters (likelihood scale, balance) are not in the source
        side, index, local = key.split(".", 2)
        mapping[key] = _source_name(stacks[side][int(index)], local, layout)
    return mapping


def _listing(one: str, many: str, items: list[str]) -> str:
    shown = ", ".join(items[:10]) + (f", ... and {len(items) - 10} more" if len(items) > 10 else "")
    return f"{len(items)} {one if len(items) == 1 else many}: {shown}"


def convert_state(tensors: dict, arch: dict, layout: str, model, source="the weights") -> dict:
    """Source tensors -> the model's state_dict; CheckpointError listing every mismatch."""
    mapping = weight_mapping(model, arch, layout)
    expected = model.state_dict()
    wanted = set(mapping.values())
    unexpected = sorted(k for k in tensors if k not in wanted)
    missing = sorted(src for src in wanted if src not in tensors)
    wrong, state = [], {}
    for key, src in mapping.items():
        if src not in tensors:
            continue
        value = tensors[src]
        if value.dim() == 4 and expected[key].dim() == 2:
            value = value[:, :, 0, 0] if value.shape[2:] == (1, 1) else value  # 1x1 conv -> linear
        if tuple(value.shape) != tuple(expected[key].shape):
            wrong.append(f"{src} {tuple(tensors[src].shape)} (expected {tuple(expected[key].shape)})")
            continue
        # A fresh, aligned copy: safetensors tensors can be unaligned views of the file's buffer.
        state[key] = value.to(expected[key].dtype, copy=True, memory_format=torch.contiguous_format)
    if unexpected or missing or wrong:
        parts = [_listing(*words, items) for words, items in (
            (("unexpected key", "unexpected keys"), unexpected), (("missing key", "missing keys"), missing),
            (("key with the wrong shape", "keys with the wrong shape"), wrong)) if items]
        raise CheckpointError(f"{source} does not match the {describe(arch)} ({layout} layout): " + "; ".join(parts))
    return state


def describe(arch: dict) -> str:
    return (f"AutoencoderKL (channels {tuple(arch['block_out_channels'])}, {arch['layers_per_block']} blocks per "
            f"level, {arch['latent_channels']} latent channels, {arch['norm_num_groups']} groups)")
