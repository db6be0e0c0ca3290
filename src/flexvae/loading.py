"""From a config or a checkpoint to a ready model: structure paths, plugins, latents."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

from .build import VAEPlan, as_specs, plan_vae
from .dsl.structure import unparse_structure
from .errors import CheckpointError, ConfigError, StructureError
from .latents import LATENTS

FORMAT_VERSION = 1


def resolve_path(value: str, config_path: str | Path | None) -> Path:
    """A relative path is taken from the working directory, then from the config's folder."""
    path = Path(value).expanduser()
    if path.is_absolute() or path.exists() or config_path is None:
        return path
    beside_config = Path(config_path).parent / path
    return beside_config if beside_config.exists() else path


def load_plugins(plugins, config_path=None) -> None:
    """Import user modules that register extra tokens (``model.plugins``)."""
    for name in plugins:
        if name.endswith(".py"):
            path = resolve_path(name, config_path)
            if not path.is_file():
                raise ConfigError(f"model.plugins: file not found: {path}")
            module_name = f"flexvae_plugin_{path.stem}"
            if module_name in sys.modules:
                continue
            spec = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[module_name] = module
            try:
                spec.loader.exec_module(module)
            except Exception as exc:
                del sys.modules[module_name]
                raise ConfigError(f"model.plugins: importing {path} failed: {type(exc).__name__}: {exc}") from exc
        else:
            try:
                importlib.import_module(name)
            except ImportError as exc:
                raise ConfigError(f"model.plugins: cannot import module {name!r}: {exc}") from exc


def structure_specs(value, role: str, config_path=None):
    """``model.encoder``/``model.decoder``: a JSON file path or an inline token list."""
    if isinstance(value, str):
        path = resolve_path(value, config_path)
        if not path.is_file():
            raise StructureError(f"model.{role}: structure file not found: {value}")
        return as_specs(path)
    return as_specs(list(value), f"model.{role} in {config_path or 'the config'}")


def make_latent(cfg):
    """The latent module named by ``model.latent``, built from the [latent] section.

    ``cfg`` is a whole Config; a bare [model] section is accepted too ([latent] defaults then).
    """
    from .config import LatentConfig

    model_cfg = getattr(cfg, "model", cfg)
    latent_cfg = getattr(cfg, "latent", None)
    latent_cfg = latent_cfg if isinstance(latent_cfg, LatentConfig) else LatentConfig()
    try:
        latent_class = LATENTS[model_cfg.latent]
    except KeyError:
        raise ConfigError(
            f"model.latent = {model_cfg.latent!r} is not available; choose one of {', '.join(LATENTS)}"
        ) from None
    if not hasattr(latent_class, "from_config"):
        return latent_class()
    try:
        return latent_class.from_config(latent_cfg)
    except ValueError as exc:
        raise ConfigError(f"[latent] settings for model.latent = {model_cfg.latent!r}: {exc}") from None


def data_shape(cfg) -> tuple[int, ...]:
    return (cfg.data.channels, cfg.data.image_size, cfg.data.image_size)


def plan_from_config(cfg, config_path=None) -> VAEPlan:
    load_plugins(cfg.model.plugins, config_path)
    encoder = structure_specs(cfg.model.encoder, "encoder", config_path)
    decoder = structure_specs(cfg.model.decoder, "decoder", config_path)
    return plan_vae(encoder, decoder, data_shape(cfg), make_latent(cfg))


def output_kind(cfg) -> str:
    return "logits" if cfg.loss.recon == "bce" else "value"


def model_from_config(cfg, config_path=None, device=None):
    plan = plan_from_config(cfg, config_path)
    model = plan.build(device, scaling_factor=cfg.model.scaling_factor, output=output_kind(cfg))
    return model, plan


def checkpoint_metadata(cfg, plan: VAEPlan, step: int, scaling_factor: float) -> dict:
    """Everything needed to rebuild the model from the checkpoint file alone."""
    from . import __version__
    from .config import config_to_dict

    return {
        "format": FORMAT_VERSION,
        "flexvae_version": __version__,
        "step": int(step),
        "config": config_to_dict(cfg),
        "encoder": unparse_structure(_unexpanded(plan.encoder.specs)),
        "decoder": unparse_structure(_unexpanded(plan.decoder.specs)),
        "data_shape": list(plan.data_shape),
        "latent_shape": list(plan.latent_shape),
        "scaling_factor": float(scaling_factor),
        "output": output_kind(cfg),
        "plugins": list(cfg.model.plugins),
    }


def _unexpanded(specs):
    """Expanded specs share their TokenSpec object per repeat: keep each once."""
    seen, out = set(), []
    for spec in specs:
        if id(spec) not in seen:
            seen.add(id(spec))
            out.append(spec)
    return out


def model_from_checkpoint(ckpt, device=None, prefer_ema: bool = True, extra_plugins=()):
    """Rebuild the model described by a checkpoint's metadata and load its weights."""
    from .config import config_from_dict

    meta = ckpt.metadata
    if meta.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{ckpt.path}: unsupported checkpoint format {meta.get('format')!r}")
    cfg = config_from_dict(meta["config"], source=f"{ckpt.path} (stored config)")
    load_plugins(extra_plugins)
    try:
        plan = plan_vae(
            as_specs(meta["encoder"], f"{ckpt.path} (encoder)"),
            as_specs(meta["decoder"], f"{ckpt.path} (decoder)"),
            meta["data_shape"], make_latent(cfg),
        )
    except StructureError as exc:
        hint = ""
        if meta.get("plugins"):
            hint = f" This checkpoint was trained with plugins {meta['plugins']}: pass them with --set model.plugins=..."
        raise CheckpointError(f"{ckpt.path}: cannot rebuild the model: {exc}.{hint}") from None
    model = plan.build(device, scaling_factor=meta["scaling_factor"], output=meta["output"])
    state = ckpt.ema_state if prefer_ema and ckpt.ema_state else ckpt.model_state
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{ckpt.path}: weights do not match the stored structure "
            f"(missing: {', '.join(missing[:5]) or 'none'}; unexpected: {', '.join(unexpected[:5]) or 'none'})"
        )
    model.eval()
    return model, cfg, plan
