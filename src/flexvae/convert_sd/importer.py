"""Reading SD autoencoder weights (a diffusers folder or an original .safetensors file) and
writing them as a flexvae checkpoint."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CheckpointError, ConfigError
from ..files import read_small_file
from .layout import (_OLD_DIFFUSERS_ATTENTION, DEFAULT_OUTPUT, DIFFUSERS_WEIGHTS, convert_state, sd_config,
                     sd_structures)

# ------------------------------------------------------------------ reading sources
@dataclass
class Source:
    path: Path
    layout: str  # diffusers or original
    tensors: dict
    config: dict  # diffusers config (given, or inferred from the tensor shapes of the Stable Diffusion checkpoint)
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
            config = json.loads(read_small_file(config_file, 1 << 20, "config.json", CheckpointError).decode("utf-8"))
        except (UnicodeDecodeError, RecursionError, ValueError) as exc:  # JSONDecodeError is a ValueError
            raise CheckpointError(f"{config_file}: not a readable JSON config: {exc}") from None
        if not isinstance(config, dict):
            raise CheckpointError(f"{config_file}: a diffusers config.json holds a JSON object, "
                                  f"found {type(config).__name__}")
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
    from ..config import Config, config_from_dict, config_to_dict

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
    from ..assemble import build_model, objective_state, plan_from_config, prior_state

    source = read_source(src)
    arch = sd_config({**source.config, **(config or {})})
    cfg = flexvae_config(arch, base, image_size)
    plan = plan_from_config(cfg)
    model = build_model(plan, cfg, "meta")
    state = convert_state(source.tensors, arch, source.layout, model, str(source.path))
    # The objective's own parameters (a learned likelihood scale, a learned balance) start fresh.
    state.update(objective_state(cfg, plan.data_shape[0]))
    state.update(prior_state(cfg, plan.latent_shape, plan.data_shape, plan.latent.kind))
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
    from ..checkpoint import checkpoint_metadata, save_checkpoint
    from ..config import apply_overrides

    output = Path(output)
    if output.suffix != ".safetensors":  # a run folder
        output = output / "checkpoints" / "step_00000000.safetensors"
    model, cfg, plan, source = load_sd_vae(src, base, image_size, config)
    run_dir = output.parent.parent if output.parent.name == "checkpoints" else output.parent
    cfg = apply_overrides(cfg, [f"train.out_dir={run_dir.as_posix()}"])
    meta = checkpoint_metadata(cfg, plan, step=0, scaling_factor=cfg.model.scaling_factor)
    meta["imported_from"] = {"layout": source.layout, "file": source.path.name}
    path = save_checkpoint(output, model.state_dict(), meta)
    notes = list(source.notes) + [_write_structures(run_dir, plan)]
    return Imported(path, plan, cfg.model.scaling_factor, notes)


def _write_structures(run_dir: Path, plan) -> str:
    """The imported model's token lists as structure files in its run folder (to read, edit or
    train with); a note saying where they are."""
    import json

    from ..dsl.structure import unexpanded
    from ..files import write_text

    written = []
    for role, stack in (("encoder", plan.encoder), ("decoder", plan.decoder)):
        tokens = [spec.text for spec in unexpanded(stack.specs)]
        path = run_dir / "structures" / f"{role}.json"
        write_text(path, "[\n" + ",\n".join(f"  {json.dumps(t)}" for t in tokens) + "\n]\n")
        written.append(path)
    return (f"structures: {written[0]} and {written[1]} (train on from the imported weights with "
            f"--set model.encoder={written[0]} --set model.decoder={written[1]}, or configs/sd_vae.toml)")
