"""Structure files: JSON lists of tokens -> lists of TokenSpec."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import StructureError
from .grammar import TokenSpec, parse_token


def parse_structure(tokens, source: str = "<structure>") -> list[TokenSpec]:
    """Parse a list of token strings; every spec remembers ``source`` and its position."""
    if not isinstance(tokens, list):
        raise StructureError(
            f"a structure must be a JSON list of token strings, found {type(tokens).__name__}",
            source=source,
        )
    if not tokens:
        raise StructureError("the structure is empty: list at least one layer token", source=source)
    return [parse_token(text, source=source, position=i) for i, text in enumerate(tokens, start=1)]


def load_structure(path) -> list[TokenSpec]:
    """Read a JSON structure file; JSON errors name the file, line and column."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise StructureError(f"structure file not found: {path}") from None
    except OSError as exc:
        raise StructureError(f"cannot read structure file {path}: {exc.strerror}") from None
    try:
        tokens = json.loads(text)
    except json.JSONDecodeError as exc:
        raise StructureError(
            f"not valid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}", source=str(path)
        ) from None
    return parse_structure(tokens, source=str(path))
