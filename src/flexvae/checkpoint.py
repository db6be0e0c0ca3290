"""Checkpoints: the file format, the metadata that describes the model, run directories,
and rebuilding a model from a checkpoint alone. Every mode goes through this module.

One ``.safetensors`` file each, written atomically, read without pickle:

* ``model.<name>``: weights of the (unwrapped) model's ``state_dict``;
* ``ema.<name>``: EMA weights, when there are any;
* ``train.<...>``: every tensor of the nested training state (optimizer, scheduler,
  gradient scaler, RNG states, data-stream position);
* header metadata ``"format"``: the format version; ``"flexvae"``: JSON of the metadata
  (``checkpoint_metadata``: token lists, resolved config, data shape, latent scaling, step);
  ``"train_state"``: JSON skeleton of the training state, each tensor replaced by
  ``{"__tensor__": "<key>"}``; ``"order"``: the state_dict order of the weights.

A run directory keeps its checkpoints in ``<run_dir>/checkpoints/step_XXXXXXXX.safetensors``.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import CheckpointError, ConfigError, StructureError
from .files import atomic_path

CHECKPOINT_DIR = "checkpoints"
FORMAT_VERSION = 1  # of the file layout and of the metadata; stored as "1" in the header, 1 in the metadata
_NAME_RE = re.compile(r"step_(\d+)\.safetensors")
_TENSOR, _TUPLE, _DICT = "__tensor__", "__tuple__", "__dict__"
_MODEL, _EMA, _TRAIN = "model.", "ema.", "train."


# Nested state <-> flat tensors + JSON skeleton


def _storable(tensor: torch.Tensor, seen: set[int]) -> torch.Tensor:
    """A detached, contiguous CPU tensor that shares no storage with ``seen``."""
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.to("cpu")
    if not t.is_contiguous():
        t = t.contiguous()
    ptr = t.untyped_storage().data_ptr()
    if ptr != 0 and ptr in seen:
        t = t.clone()
        ptr = t.untyped_storage().data_ptr()
    if ptr != 0:
        seen.add(ptr)
    return t


def flatten_state(obj: Any, prefix: str = "") -> tuple[dict[str, torch.Tensor], Any]:
    """Split a nested state into ``{key: tensor}`` and a JSON-able skeleton.

    Containers may be dicts (any str/int/float/bool/None keys), lists and
    tuples; leaves may be tensors, ``None``, bools, ints, floats and strings.
    Tensor keys are ``<prefix>.<path>``; :func:`unflatten_state` rebuilds ``obj``.
    """
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()

    def key_for(path: list[str]) -> str:
        base = ".".join([prefix, *path] if prefix else path) or "tensor"
        key, n = base, 1
        while key in tensors:  # paths can collide ("a.b" vs "a"/"b", 0 vs "0")
            key, n = f"{base}#{n}", n + 1
        return key

    def walk(o: Any, path: list[str]) -> Any:
        if isinstance(o, torch.Tensor):
            key = key_for(path)
            tensors[key] = _storable(o, seen)
            return {_TENSOR: key}
        if o is None or isinstance(o, (bool, int, float, str)):
            return o
        if isinstance(o, tuple):
            return {_TUPLE: [walk(v, path + [str(i)]) for i, v in enumerate(o)]}
        if isinstance(o, list):
            return [walk(v, path + [str(i)]) for i, v in enumerate(o)]
        if isinstance(o, dict):
            if all(isinstance(k, str) and not k.startswith("__") for k in o):
                return {k: walk(v, path + [k]) for k, v in o.items()}
            items = []
            for k, v in o.items():
                if k is not None and not isinstance(k, (str, int, float)):
                    where = ".".join(path) or "<root>"
                    raise TypeError(f"cannot store dict key {k!r} at {where} in a checkpoint")
                items.append([k, walk(v, path + [str(k)])])
            return {_DICT: items}
        where = ".".join(path) or "<root>"
        raise TypeError(f"cannot store a {type(o).__name__} at {where} in a checkpoint")

    return tensors, walk(obj, [])


def unflatten_state(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`flatten_state`; a missing tensor raises ``KeyError``."""
    if isinstance(skeleton, list):
        return [unflatten_state(v, tensors) for v in skeleton]
    if isinstance(skeleton, dict):
        if _TENSOR in skeleton:
            return tensors[skeleton[_TENSOR]]
        if _TUPLE in skeleton:
            return tuple(unflatten_state(v, tensors) for v in skeleton[_TUPLE])
        if _DICT in skeleton:
            return {k: unflatten_state(v, tensors) for k, v in skeleton[_DICT]}
        return {k: unflatten_state(v, tensors) for k, v in skeleton.items()}
    return skeleton


# Saving and loading


@dataclass
class Checkpoint:
    path: Path
    model_state: dict[str, torch.Tensor]
    metadata: dict[str, Any]
    train_state: dict[str, Any] | None = None
    ema_state: dict[str, torch.Tensor] | None = None

    @property
    def step(self) -> int:
        return int(self.metadata.get("step", 0))


def save_checkpoint(
    path: str | os.PathLike,
    model_state: dict[str, torch.Tensor],
    metadata: dict[str, Any],
    train_state: dict[str, Any] | None = None,
    ema_state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write one checkpoint file atomically; the file at ``path`` is either the
    previous one or the complete new one, never a partial write."""
    path = Path(path)
    header = {"format": str(FORMAT_VERSION), "flexvae": json.dumps(metadata)}
    seen: set[int] = set()
    tensors = {_MODEL + k: _storable(v, seen) for k, v in model_state.items()}
    if ema_state is not None:
        tensors.update({_EMA + k: _storable(v, seen) for k, v in ema_state.items()})
    if train_state is not None:
        train_tensors, skeleton = flatten_state(train_state, _TRAIN.rstrip("."))
        tensors.update({k: _storable(v, seen) for k, v in train_tensors.items()})
        header["train_state"] = json.dumps(skeleton)
    # safetensors sorts its keys; keep the state_dict order for the reader
    header["order"] = json.dumps([k for k in tensors if not k.startswith(_TRAIN)])

    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=header)
    return path


def _ordered_keys(keys: list[str], header: dict[str, str]) -> list[str]:
    """The file's tensor keys, model and EMA ones in their saved state_dict order."""
    present = set(keys)
    try:
        order = [k for k in json.loads(header.get("order", "[]")) if k in present]
    except (json.JSONDecodeError, TypeError):
        order = []
    listed = set(order)
    return order + [k for k in keys if k not in listed]


def load_checkpoint(path: str | os.PathLike, *, with_train_state: bool = True) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint` (never unpickles).

    With ``with_train_state=False`` the ``train.*`` tensors are not read at all.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint not found")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, expected a .safetensors checkpoint file")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            header = f.metadata() or {}
            if "flexvae" not in header:
                raise CheckpointError(f"{path}: not a flexvae checkpoint: no 'flexvae' metadata")
            keys = _ordered_keys(f.keys(), header)
            wanted = [k for k in keys if with_train_state or not k.startswith(_TRAIN)]
            tensors = {k: f.get_tensor(k) for k in wanted}
    except CheckpointError:
        raise
    except Exception as e:  # safetensors reports bad files with several types
        raise CheckpointError(
            f"{path}: not a readable safetensors checkpoint (truncated or another format?): {e}"
        ) from e

    try:
        metadata = json.loads(header["flexvae"])
        skeleton = None
        if with_train_state and "train_state" in header:
            skeleton = json.loads(header["train_state"])
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: corrupt checkpoint metadata: {e}") from e
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{path}: corrupt checkpoint metadata: 'flexvae' is not an object")

    model_state = {k[len(_MODEL):]: v for k, v in tensors.items() if k.startswith(_MODEL)}
    ema = {k[len(_EMA):]: v for k, v in tensors.items() if k.startswith(_EMA)}
    train_state = None
    if skeleton is not None:
        try:
            train_state = unflatten_state(skeleton, tensors)
        except KeyError as e:
            raise CheckpointError(f"{path}: corrupt training state: tensor {e} is missing") from e
    return Checkpoint(path, model_state, metadata, train_state, ema or None)


# Checkpoints of a run


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}.safetensors"


def run_directory(path: str | os.PathLike) -> Path:
    """The run directory of a checkpoint file, of its ``checkpoints`` folder, or itself."""
    path = Path(path)
    if path.is_file():
        return path.parent.parent if path.parent.name == CHECKPOINT_DIR else path.parent
    return path.parent if path.name == CHECKPOINT_DIR else path


def _checkpoint_dir(run_dir: Path) -> Path:
    """``<run_dir>/checkpoints``, or ``run_dir`` itself when given that folder."""
    sub = run_dir / CHECKPOINT_DIR
    return sub if sub.is_dir() else run_dir


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Checkpoint files of a run, oldest (lowest step) first."""
    folder = _checkpoint_dir(Path(run_dir))
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = _NAME_RE.fullmatch(p.name)
        if m and p.is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint file itself, or the latest checkpoint of a run directory."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint file or run directory")
    if not path.is_dir():
        return path
    found = list_checkpoints(path)
    if not found:
        raise CheckpointError(
            f"no checkpoint found in {path} (looked for {CHECKPOINT_DIR}/step_*.safetensors)"
        )
    return found[-1]


def prune_checkpoints(run_dir: str | os.PathLike, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` checkpoints; returns the deleted files."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be at least 1, got {keep_last}")
    doomed = list_checkpoints(run_dir)[:-keep_last]
    for p in doomed:
        p.unlink(missing_ok=True)
    return doomed




# Metadata and rebuilding


def checkpoint_metadata(cfg, plan, step: int, scaling_factor: float) -> dict:
    """Everything needed to rebuild the model from the checkpoint file alone."""
    from .assemble import output_kind
    from .config import config_to_dict
    from .dsl.structure import unparse_structure
    from .version import __version__

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


_REQUIRED = {"config": dict, "encoder": list, "decoder": list, "data_shape": list, "scaling_factor": (int, float),
             "output": str}


def _check_metadata(path, meta: dict) -> None:
    if meta.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: unsupported checkpoint format {meta.get('format')!r} "
                              f"(this flexvae reads format {FORMAT_VERSION})")
    for key, kind in _REQUIRED.items():
        if not isinstance(meta.get(key), kind) or isinstance(meta.get(key), bool):
            raise CheckpointError(f"{path}: corrupt checkpoint metadata: {key!r} is missing or of the wrong type")


def model_from_checkpoint(ckpt: Checkpoint, device=None, prefer_ema: bool = True, extra_plugins=()):
    """(model, stored config, plan) rebuilt from a checkpoint's metadata, weights loaded."""
    from .assemble import load_plugins, make_latent
    from .build import as_specs, plan_vae
    from .config import config_from_dict

    meta = ckpt.metadata
    _check_metadata(ckpt.path, meta)
    try:
        cfg = config_from_dict(meta["config"], source=f"{ckpt.path} (stored config)", stored=True)
    except ConfigError as exc:
        raise CheckpointError(f"{ckpt.path}: corrupt stored config: {exc}") from None
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


def load_run(path, device="cpu", prefer_ema: bool = True, plugins=()) -> LoadedModel:
    """A checkpoint file, or a run directory (its latest checkpoint), rebuilt and ready."""
    file = resolve_checkpoint(path)
    ckpt = load_checkpoint(file, with_train_state=False)
    vae, cfg, plan = model_from_checkpoint(ckpt, device=device, prefer_ema=prefer_ema, extra_plugins=plugins)
    return LoadedModel(vae, tuple(plan.data_shape), cfg.data.resize_filter, cfg.data.pad_to_square,
                       cfg, plan, file, ckpt.step)


def load_model(path, device="cpu", prefer_ema: bool = True, plugins=()):
    """The VAE of a checkpoint file or run directory, in eval mode:
    ``vae = flexvae.load_model("runs/default")``."""
    return load_run(path, device, prefer_ema, plugins).vae
