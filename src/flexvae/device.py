"""Choosing the torch device a mode runs on, and saying clearly when it is not there."""

from __future__ import annotations

import re

from .errors import FlexVAEError

DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d{1,3})?")


class DeviceError(FlexVAEError):
    """The device asked for does not exist here."""


def resolve_device(name: str) -> str:
    """'auto' becomes cuda, else mps, else cpu (whatever this machine has); another name is
    checked against what this PyTorch sees (DeviceError naming what is available)."""
    import torch

    if not isinstance(name, str) or not DEVICE_PATTERN.fullmatch(name):
        raise DeviceError(f"device {name!r} is not one of auto, cpu, cuda, cuda:N or mps")
    mps = getattr(torch.backends, "mps", None)
    mps_available = mps is not None and mps.is_available()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if mps_available else "cpu"
    if name.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise DeviceError(f"device {name!r} was asked for, but this PyTorch sees no CUDA device; "
                              f"use --device cpu (or auto)")
        index = int(name.partition(":")[2] or 0)
        if index >= count:
            raise DeviceError(f"device {name!r} was asked for, but this machine has {count} CUDA device(s): "
                              f"cuda:0 .. cuda:{count - 1}")
    if name == "mps" and not mps_available:
        raise DeviceError("device 'mps' was asked for, but this PyTorch sees no Apple GPU; use --device cpu (or auto)")
    return name
