"""Shipped structures and configs, installed with the package (see assemble.resolve_path)."""

from pathlib import Path

PRESETS = Path(__file__).resolve().parent
