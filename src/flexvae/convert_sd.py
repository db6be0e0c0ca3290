"""The Stable Diffusion autoencoder as a flexvae structure, and its weights imported.

``sd_structures(config)`` writes the encoder and decoder token lists of a diffusers
``AutoencoderKL`` config (block_out_channels, layers_per_block, latent_channels, ...).
``import_weights(src, output)`` reads a diffusers folder (``config.json`` +
``diffusion_pytorch_model.safetensors``) or an original SD ``.safetensors`` VAE (the
``encoder.down.0.block.0...`` layout, optionally under ``first_stage_model.``) and writes a
flexvae checkpoint. Weights are read with safetensors only: no pickle is ever executed.

The key mapping is built from the structure itself: every generated token carries the
module path it corresponds to in both source layouts, and each parameter of the built
flexvae model is looked up through the token it belongs to.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import CheckpointError, ConfigError
from .layers.norm_act import DEFAULT_GROUPS  # VAERB / VAEA groups: left out of the tokens when equal

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


def sd_config(config: dict | None = None) -> dict:
    """SD defaults updated with ``config`` (a diffusers config.json dict), checked."""
    config = {k: v for k, v in (config or {}).items() if not k.startswith("_")}
    arch = {**SD_CONFIG, **config}
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
        level = levels - 1 - k  # the original numbers decoder levels from the output side
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


# ------------------------------------------------------------------ reading sources
@dataclass
class Source:
    path: Path
    layout: str  # diffusers or original
    tensors: dict
    config: dict  # diffusers config (given, or inferred from the original's shapes)
    notes: list[str] = field(default_factory=list)


def _read_safetensors(path: Path, keep=lambda key: True, keys_only: bool = False):
    """The tensors (or only the keys) of a safetensors file; ``keep`` filters by key."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            if keys_only:
                return list(f.keys())
            return {k: f.get_tensor(k) for k in f.keys() if keep(k)}
    except Exception as exc:  # safetensors reports bad files with several types
        raise CheckpointError(f"{path}: not a readable safetensors file: {exc}") from exc


def _infer_original_config(tensors: dict, path: Path) -> dict:
    """The architecture of an original-layout VAE from its tensor shapes (groups: SD's 32)."""
    def shape(key):
        if key not in tensors:
            raise CheckpointError(f"{path}: cannot infer the architecture: key {key!r} not found")
        return tuple(tensors[key].shape)

    def count(pattern):
        return 1 + max((int(m.group(1)) for k in tensors if (m := re.match(pattern, k))), default=-1)

    levels, blocks = count(r"encoder\.down\.(\d+)\."), count(r"encoder\.down\.0\.block\.(\d+)\.")
    if not levels or not blocks:
        raise CheckpointError(f"{path}: cannot infer the architecture: no encoder.down.N.block.M keys")
    return {
        "in_channels": shape("encoder.conv_in.weight")[1],
        "out_channels": shape("decoder.conv_out.weight")[0],
        "block_out_channels": [shape(f"encoder.down.{i}.block.0.conv1.weight")[0] for i in range(levels)],
        "layers_per_block": blocks,
        "latent_channels": shape("decoder.conv_in.weight")[1],
        "mid_block_add_attention": "encoder.mid.attn_1.q.weight" in tensors,
        "use_quant_conv": "quant_conv.weight" in tensors,
        "use_post_quant_conv": "post_quant_conv.weight" in tensors,
    }


def read_source(src) -> Source:
    """A diffusers VAE folder (or a pipeline folder with vae/) or an original SD .safetensors."""
    path = Path(src)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.is_dir() and (path / "vae" / "config.json").is_file():
        path = path / "vae"
    weights = None
    if path.is_file() and path.name.startswith("diffusion_pytorch_model") and (path.parent / "config.json").is_file():
        path, weights = path.parent, path
    if path.is_dir():
        variants = sorted(path.glob("diffusion_pytorch_model*.safetensors"))  # e.g. the .fp16 variant
        weights = weights or (path / DIFFUSERS_WEIGHTS if (path / DIFFUSERS_WEIGHTS).is_file()
                              else variants[0] if variants else path / DIFFUSERS_WEIGHTS)
        config_file = path / "config.json"
        if not weights.is_file() or not config_file.is_file():
            raise CheckpointError(f"{path}: a diffusers VAE folder needs config.json and {DIFFUSERS_WEIGHTS} "
                                  "(pickled .bin weights are not read)")
        try:
            config = json.loads(config_file.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{config_file}: not a readable JSON config: {exc}") from exc
        if config.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
            raise CheckpointError(f"{config_file}: a {config['_class_name']}, only AutoencoderKL is supported")
        tensors = _read_safetensors(weights)
        for old, new in _OLD_DIFFUSERS_ATTENTION.items():
            tensors = {k.replace(old, new) if ".attentions." in k else k: v for k, v in tensors.items()}
        source = Source(weights, "diffusers", tensors, config)
        for key in ("shift_factor", "latents_mean", "latents_std"):
            if config.get(key) is not None:
                source.notes.append(f"config.json sets {key}; flexvae keeps only scaling_factor (raw latents "
                                    "and reconstructions are unaffected)")
        return source
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: expected a .safetensors file or a diffusers folder "
                              "(pickle formats such as .ckpt, .pt and .bin are not read)")
    keys = _read_safetensors(path, keys_only=True)
    prefix = "first_stage_model." if any(k.startswith("first_stage_model.") for k in keys) else ""
    if not prefix and not any(k.startswith("encoder.down.") for k in keys):
        hint = (" (diffusers-layout weights: give the folder with its config.json)"
                if any(k.startswith("encoder.down_blocks.") for k in keys) else "")
        raise CheckpointError(f"{path}: not a Stable Diffusion VAE: no encoder.down.* or "
                              f"first_stage_model.* keys{hint}")
    tensors = _read_safetensors(path, lambda k: k.startswith(prefix))
    tensors = {k[len(prefix):]: v for k, v in tensors.items()}
    source = Source(path, "original", tensors, {})
    dropped = [k for k in tensors if k.startswith("loss.")]
    if dropped:  # the discriminator and perceptual loss of an original training checkpoint
        source.notes.append(f"ignored {len(dropped)} training-loss tensors (loss.*)")
        source.tensors = {k: v for k, v in tensors.items() if not k.startswith("loss.")}
    source.config = _infer_original_config(source.tensors, path)
    return source


# ------------------------------------------------------------------ the model and the checkpoint
def flexvae_config(arch: dict, base=None, image_size: int | None = None):
    """A flexvae Config (from ``base``) holding the inline structures of ``arch``.

    The image size is ``image_size``, else the diffusers sample_size, else ``base``'s, else 512.
    """
    from .config import Config, config_from_dict, config_to_dict

    raw = config_to_dict(base or Config())
    encoder, decoder = sd_structures(arch)
    size = image_size or arch.get("sample_size") or (base.data.image_size if base is not None else 512)
    raw["model"].update(encoder=encoder, decoder=decoder, latent="gaussian",
                        scaling_factor=float(arch["scaling_factor"]), plugins=[])
    raw["data"].update(channels=arch["in_channels"], image_size=int(size))
    if raw["loss"]["recon"] == "bce":
        raise ConfigError("loss.recon = 'bce' does not fit the SD autoencoder, whose decoder outputs values")
    return config_from_dict(raw, "the imported Stable Diffusion VAE config")


def load_sd_vae(src, base=None, image_size: int | None = None, config: dict | None = None):
    """(flexvae VAE holding the weights of ``src``, its Config, its plan, the Source).

    ``config`` overrides architecture values (e.g. norm_num_groups of an original file).
    """
    from .assemble import plan_from_config

    source = read_source(src)
    arch = sd_config({**source.config, **(config or {})})
    cfg = flexvae_config(arch, base, image_size)
    plan = plan_from_config(cfg)
    model = plan.build("meta", scaling_factor=cfg.model.scaling_factor)
    state = convert_state(source.tensors, arch, source.layout, model, str(source.path))
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval(), cfg, plan, source


@dataclass
class Imported:
    path: Path
    plan: object
    scaling_factor: float
    notes: list[str]

    def summary(self, src) -> str:
        return (f"imported {src} into {self.path}: data shape {self.plan.data_shape}, latent "
                f"{self.plan.latent_shape}, scaling factor {self.scaling_factor}")


def import_weights(src, output=DEFAULT_OUTPUT, base=None, image_size: int | None = None,
                   config: dict | None = None) -> Imported:
    """Convert ``src`` into a flexvae checkpoint at ``output`` (step 0, no training state);
    an ``output`` not ending in .safetensors is a run folder: <output>/checkpoints/step_00000000.

    The stored config's train.out_dir is the run folder of ``output``, so ``--ckpt`` on it
    and ``-t`` with the same structures and image size continue from the imported weights.
    """
    from .checkpoint import checkpoint_metadata, save_checkpoint
    from .config import apply_overrides

    output = Path(output)
    if output.suffix != ".safetensors":  # a run folder
        output = output / "checkpoints" / "step_00000000.safetensors"
    model, cfg, plan, source = load_sd_vae(src, base, image_size, config)
    run_dir = output.parent.parent if output.parent.name == "checkpoints" else output.parent
    cfg = apply_overrides(cfg, [f"train.out_dir={run_dir.as_posix()}"])
    meta = checkpoint_metadata(cfg, plan, step=0, scaling_factor=cfg.model.scaling_factor)
    meta["imported_from"] = {"layout": source.layout, "file": source.path.name}
    path = save_checkpoint(output, model.state_dict(), meta)
    return Imported(path, plan, cfg.model.scaling_factor, source.notes)
