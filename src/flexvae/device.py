"""Choosing the torch device a mode runs on."""

from __future__ import annotations


def resolve_device(name: str) -> str:
    """'auto' becomes cuda, else mps, else cpu (whatever this machine has); other names pass through."""
    if name != "auto":
        return name
    import torch

    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return "mps"
    return "cpu"
