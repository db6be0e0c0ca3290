"""Random number generators of a training run: seeding, and their exact state for resuming."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def torch_rng_state():
    """torch's CPU and CUDA generator states: the RNGs a training step draws from."""
    return torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None


def set_torch_rng_state(state) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)

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
