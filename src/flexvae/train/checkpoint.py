"""Checkpoints: one ``.safetensors`` file each, written atomically, read without pickle.

Layout of a checkpoint file:

* ``model.<name>``: weights of the (unwrapped) model's ``state_dict``;
* ``ema.<name>``: EMA weights, when there are any;
* ``train.<...>``: every tensor of the nested training state (optimizer,
  scheduler, EMA bookkeeping, grad scaler, RNG states);
* header metadata ``"flexvae"``: JSON of the caller's metadata dict, and
  ``"train_state"``: JSON skeleton of the training state, where each tensor is
  replaced by ``{"__tensor__": "<key>"}``.

A run keeps its checkpoints in ``<run_dir>/checkpoints/step_XXXXXXXX.safetensors``.
"""

from __future__ import annotations

import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from flexvae.errors import CheckpointError

CHECKPOINT_DIR = "checkpoints"
FORMAT_VERSION = "1"
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


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable; not every platform can open a directory."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


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
    header = {"format": FORMAT_VERSION, "flexvae": json.dumps(metadata)}
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

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata=header)  # writes, flushes and closes
        with open(tmp, "rb+") as f:  # writable: some platforms only sync those
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
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


# Random number generators


def capture_rng_state() -> dict[str, Any]:
    """States of Python's, NumPy's and torch's (CPU and every CUDA device) RNGs,
    in a form :func:`flatten_state` can store."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": {
            "version": version,
            "internal": torch.tensor(internal, dtype=torch.int64),
            "gauss": gauss,
        },
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Put the RNGs back exactly as :func:`capture_rng_state` found them.

    CUDA states are restored for the devices present (a run resumed on fewer
    GPUs restores the first ones)."""
    if "python" in state:
        py = state["python"]
        internal = tuple(int(x) for x in py["internal"].tolist())
        random.setstate((py["version"], internal, py["gauss"]))
    if "numpy" in state:
        npy = state["numpy"]
        keys = np.asarray(npy["keys"].numpy(), dtype=np.uint32)
        pos, has_gauss, cached = int(npy["pos"]), int(npy["has_gauss"]), npy["cached_gaussian"]
        np.random.set_state((npy["name"], keys, pos, has_gauss, float(cached)))
    if "torch" in state:
        torch.set_rng_state(state["torch"].to("cpu", torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        for i, s in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s.to("cpu", torch.uint8), device=i)
