"""The checkpoint file: nested training state <-> flat tensors + JSON skeleton, written
atomically as one ``.safetensors`` file and read back without pickle."""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import CheckpointError
from ..files import atomic_path

FORMAT_VERSION = 1  # of the file layout and of the metadata; stored as "1" in the header, 1 in the metadata
_TENSOR, _TUPLE, _DICT = "__tensor__", "__tuple__", "__dict__"
_MODEL, _EMA, _TRAIN = "model.", "ema.", "train."


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


def _current_key(name: str) -> str:
    """A weight's name now: before KL had one spelling, the learned balance's KL log-weight was
    ``balance.log_weights.kld``."""
    return name[:-1] if name == "balance.log_weights.kld" else name


def load_checkpoint(path: str | os.PathLike, *, with_train_state: bool = True) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint` (never unpickles).

    With ``with_train_state=False`` the ``train.*`` tensors are not read at all.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint not found")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, expected a .safetensors checkpoint file")
    if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO would block the reader forever
        raise CheckpointError(f"{path}: not a regular file (a FIFO, socket or device?); expected a .safetensors "
                              "checkpoint file")
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

    model_state = {_current_key(k[len(_MODEL):]): v for k, v in tensors.items() if k.startswith(_MODEL)}
    ema = {_current_key(k[len(_EMA):]): v for k, v in tensors.items() if k.startswith(_EMA)}
    train_state = None
    if skeleton is not None:
        try:
            train_state = unflatten_state(skeleton, tensors)
        except KeyError as e:
            raise CheckpointError(f"{path}: corrupt training state: tensor {e} is missing") from e
    return Checkpoint(path, model_state, metadata, train_state, ema or None)
