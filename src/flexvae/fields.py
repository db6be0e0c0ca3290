"""Declared settings: a dataclass field with a one-line doc and optional range checks.

Config sections and each latent's parameters are frozen dataclasses built from these
fields; ``config`` type-checks values from the annotations and range-checks them from
the metadata set here. Pure Python, no torch.
"""

from __future__ import annotations

from dataclasses import field

# Range checks: (text shown in errors, predicate).
POSITIVE = ("> 0", lambda v: v > 0)
NON_NEGATIVE = (">= 0", lambda v: v >= 0)
UNIT_OPEN_CLOSED = ("in (0, 1]", lambda v: 0 < v <= 1)
UNIT_CLOSED = ("in [0, 1]", lambda v: 0 <= v <= 1)
UNIT_OPEN = ("in (0, 1)", lambda v: 0 < v < 1)
UNIT_CLOSED_OPEN = ("in [0, 1)", lambda v: 0 <= v < 1)
AT_LEAST_TWO = (">= 2", lambda v: v >= 2)


def setting(default, doc: str, check=None, length=None):
    """A dataclass field with a one-line doc, an optional range check and, for lists, an
    optional (min, max) length (max None = unbounded)."""
    meta = {"doc": doc, "check": check, "length": length}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)
