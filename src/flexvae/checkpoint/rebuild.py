"""Checkpoint metadata (everything needed to rebuild the model from the file alone) and the
rebuild itself, which treats the metadata as untrusted input."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, ConfigError, StructureError
from ..outputs import file_digest
from .format import FORMAT_VERSION, Checkpoint, load_checkpoint
from .runs import resolve_checkpoint
from ..model import OUTPUTS


def checkpoint_metadata(cfg, plan, step: int, scaling_factor: float) -> dict:
    """Everything needed to rebuild the model from the checkpoint file alone."""
    from ..assemble import output_kind
    from ..config import config_to_dict
    from ..dsl.structure import unexpanded, unparse_structure
    from ..version import __version__

    meta = {
        "format": FORMAT_VERSION,
        "flexvae_version": __version__,
        "step": int(step),
        "config": config_to_dict(cfg),
        "encoder": unparse_structure(unexpanded(plan.encoder.specs)),
        "decoder": unparse_structure(unexpanded(plan.decoder.specs)),
        "data_shape": list(plan.data_shape),
        "latent_shape": list(plan.latent_shape),
        "scaling_factor": float(scaling_factor),
        "output": output_kind(cfg),
        "plugins": list(cfg.model.plugins),
    }
    if plan.classes is not None:
        meta["classes"] = list(plan.classes)  # the labels' class names, in index order
    return meta


@dataclass
class LoadedModel:
    """A model with the preprocessing its training used; from ``load_run`` also the config it
    was trained with (its data settings are the defaults of every mode) and where it came from."""

    vae: torch.nn.Module
    data_shape: tuple
    resize_filter: str = "bilinear"
    pad_to_square: bool = False
    cfg: Any = None
    plan: Any = None
    path: Path | None = None
    step: int = 0
    label_spec: str = "auto"  # where the inputs' labels come from (--labels): auto, folders, none or a CSV file
    label_note: str | None = None  # the last "labels: ..." note printed
    prior_note: str | None = None  # which fitted prior load_run attached (or why none)
    sha256: str | None = None  # of the checkpoint file, computed by the first provenance()

    @property
    def config(self):
        """The config the model was trained with (``load_config``'s type); also ``cfg``."""
        return self.cfg

    def load_images(self, paths) -> torch.Tensor:
        """Image files as one batch (B, C, H, W) in [-1, 1], preprocessed as the model's training data."""
        from ..data import load_image

        return torch.stack([load_image(p, self.data_shape[0], self.data_shape[1], self.resize_filter,
                                       self.pad_to_square) for p in paths])

    def provenance(self) -> dict:
        """What produced an output: the checkpoint file (path, step, SHA-256 of its content)
        and the preprocessing; outputs of another checkpoint or other settings are redone."""
        if self.path is not None and self.sha256 is None:
            self.sha256 = file_digest(self.path)  # once per loaded model: large checkpoints take a while
        return {"checkpoint": None if self.path is None else str(self.path), "step": self.step,
                "sha256": self.sha256,
                "data_shape": list(self.data_shape), "resize_filter": self.resize_filter,
                "pad_to_square": self.pad_to_square, "scaling_factor": float(self.vae.scaling_factor),
                **({"classes": list(self.vae.class_names)} if self.vae.class_names else {})}


def _check_metadata(path, meta: dict) -> None:
    """Checkpoint metadata is untrusted input: every field the rebuild uses is checked."""
    def bad(key, wanted):
        return CheckpointError(f"{path}: corrupt checkpoint metadata: {key!r} must be {wanted}, "
                               f"found {str(meta.get(key))[:80]!r}")

    if meta.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: unsupported checkpoint format {meta.get('format')!r} "
                              f"(this flexvae reads format {FORMAT_VERSION})")
    if not isinstance(meta.get("config"), dict):
        raise bad("config", "a table")
    for key in ("encoder", "decoder"):
        value = meta.get(key)
        if not _token_list(value):
            raise bad(key, "a list of token strings and residual spans")
    shape = meta.get("data_shape")
    if (not isinstance(shape, list) or not 2 <= len(shape) <= 4
            or not all(type(n) is int and 1 <= n <= 65536 for n in shape)):
        raise bad("data_shape", "a list of 2 to 4 sizes between 1 and 65536")
    factor = meta.get("scaling_factor")
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 < factor < float("inf"):
        raise bad("scaling_factor", "a positive number")
    if meta.get("output") not in OUTPUTS:
        raise bad("output", "one of " + ", ".join(repr(o) for o in OUTPUTS))
    step = meta.get("step", 0)
    if type(step) is not int or step < 0:
        raise bad("step", "a whole number >= 0")
    classes = meta.get("classes")
    if classes is not None and (not isinstance(classes, list) or not 2 <= len(classes) <= 100_000
                                or not all(isinstance(c, str) and 0 < len(c) < 1000 for c in classes)
                                or len(set(classes)) != len(classes)):
        raise bad("classes", "a list of at least 2 distinct class names")
    plugins = meta.get("plugins", [])
    if not isinstance(plugins, list) or not all(isinstance(p, str) for p in plugins):
        raise bad("plugins", "a list of names")


def _check_shapes(path, plan_meta, state: dict, cfg, scaling_factor) -> None:
    """The stored structure, built on the meta device (no memory), must have exactly the
    checkpoint's tensors: a structure asking for more than its weights hold fails here,
    before any real module is allocated."""
    from ..assemble import build_model

    expected = {k: tuple(v.shape) for k, v in build_model(plan_meta, cfg, "meta", scaling_factor).state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: weights do not match the stored structure "
            f"(missing: {', '.join(missing[:5]) or 'none'}; unexpected: {', '.join(unexpected[:5]) or 'none'})")
    wrong = [k for k in expected if expected[k] != found[k]]
    if wrong:
        k = wrong[0]
        raise CheckpointError(f"{path}: weights do not match the stored structure: {k} has shape {found[k]}, "
                              f"the structure needs {expected[k]} ({len(wrong)} tensor(s) differ)")


def model_from_checkpoint(ckpt: Checkpoint, device=None, prefer_ema: bool = True, extra_plugins=()):
    """(model, stored config, plan) rebuilt from a checkpoint's metadata, weights loaded."""
    from ..assemble import build_model, load_plugins, output_kind, plan_specs
    from ..build import as_specs
    from ..config import config_from_dict

    meta = ckpt.metadata
    _check_metadata(ckpt.path, meta)
    try:
        cfg = config_from_dict(meta["config"], source=f"{ckpt.path} (stored config)", stored=True)
    except ConfigError as exc:
        raise CheckpointError(f"{ckpt.path}: corrupt stored config: {exc}") from None
    load_plugins(extra_plugins)

    def plan():
        return plan_specs(as_specs(meta["encoder"], f"{ckpt.path} (encoder)"),
                          as_specs(meta["decoder"], f"{ckpt.path} (decoder)"), tuple(meta["data_shape"]), cfg,
                          meta.get("classes"))

    try:
        plan_meta, plan_real = plan(), plan()  # each build takes the latent module of its plan
    except (StructureError, ConfigError) as exc:
        hint = ""
        if meta.get("plugins"):
            hint = f" This checkpoint was trained with plugins {meta['plugins']}: pass them with --set model.plugins=..."
        raise CheckpointError(f"{ckpt.path}: cannot rebuild the model: {exc}.{hint}") from None
    state = ckpt.ema_state if prefer_ema and ckpt.ema_state else ckpt.model_state
    if output_kind(cfg) != meta["output"]:
        raise CheckpointError(f"{ckpt.path}: corrupt checkpoint metadata: 'output' is {meta['output']!r}, "
                              f"but its stored loss settings make {output_kind(cfg)!r}")
    _check_shapes(ckpt.path, plan_meta, state, cfg, meta["scaling_factor"])
    model = build_model(plan_real, cfg, device, meta["scaling_factor"])
    model.load_state_dict(state)
    model.eval()
    plan = plan_real
    return model, cfg, plan


def _token_list(value, depth: int = 0) -> bool:
    """A structure as stored: token strings, and residual span objects whose parts are the same."""
    from ..dsl.structure import MAX_NESTING, RESIDUAL_KEYS

    if not isinstance(value, list) or not value or len(value) > 4096 or depth > MAX_NESTING:
        return False
    for item in value:
        if isinstance(item, dict):
            if (set(item) - set(RESIDUAL_KEYS) or not _token_list(item.get("residual"), depth + 1)
                    or not isinstance(item.get("shortcut", ""), str) or len(item.get("shortcut", "")) >= 1000
                    or type(item.get("repeat", 1)) is not int):
                return False
        elif not (isinstance(item, str) and len(item) < 1000):
            return False
    return True


def load_run(path, device="cpu", prefer_ema: bool = True, plugins=()) -> LoadedModel:
    """A checkpoint file, or a run directory (its latest checkpoint), rebuilt and ready."""
    file = resolve_checkpoint(path)
    ckpt = load_checkpoint(file, with_train_state=False)
    vae, cfg, plan = model_from_checkpoint(ckpt, device=device, prefer_ema=prefer_ema, extra_plugins=plugins)
    loaded = LoadedModel(vae, tuple(plan.data_shape), cfg.data.resize_filter, cfg.data.pad_to_square,
                         cfg, plan, file, ckpt.step)
    from ..fitted_prior import attach_saved_prior

    loaded.prior_note = attach_saved_prior(loaded)  # the run's fitted prior, when it has one
    return loaded


def load_model(path, device="cpu", prefer_ema: bool = True, plugins=()):
    """The VAE of a checkpoint file or run directory, in eval mode:
    ``vae = flexvae.load_model("runs/default")``."""
    return load_run(path, device, prefer_ema, plugins).vae
