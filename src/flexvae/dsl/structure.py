"""Structure files: JSON lists of tokens -> lists of TokenSpec."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from ..errors import StructureError
from .grammar import TokenSpec, parse_token

# Gradient-checkpointing span markers: the tokens between them are recomputed as one segment.
SPAN_BEGIN, SPAN_END = "@begin", "@end"


def parse_structure(tokens, source: str = "<structure>") -> list[TokenSpec]:
    """Parse a list of token strings; every spec remembers ``source`` and its position."""
    if not isinstance(tokens, list):
        raise StructureError(
            f"a structure must be a JSON list of token strings, found {type(tokens).__name__}",
            source=source,
        )
    specs, span, span_start, spans = [], None, None, 0
    for position, text in enumerate(tokens, start=1):
        marker = text.strip() if isinstance(text, str) else None
        if marker == SPAN_BEGIN:
            if span is not None:
                raise StructureError(f"{SPAN_BEGIN} inside the span opened at position {span_start}: "
                                     "spans cannot nest", source=source, position=position, token=text)
            spans += 1
            span, span_start = spans, position
            continue
        if marker == SPAN_END:
            if span is None:
                raise StructureError(f"{SPAN_END} without an opening {SPAN_BEGIN}",
                                     source=source, position=position, token=text)
            span = None
            continue
        spec = parse_token(text, source=source, position=position)
        if span is not None:
            spec = replace(spec, checkpoint=span)
        specs.append(spec)
    if span is not None:
        raise StructureError(f"the span opened by {SPAN_BEGIN} at position {span_start} has no {SPAN_END}",
                             source=source)
    if not specs:
        raise StructureError("the structure is empty: list at least one layer token", source=source)
    return specs


def unparse_structure(specs: list[TokenSpec]) -> list[str]:
    """Specs back to the token list they came from, span markers included."""
    tokens, span = [], None
    for spec in specs:
        here = spec.checkpoint if isinstance(spec.checkpoint, int) else None
        if here != span:
            if span is not None:
                tokens.append(SPAN_END)
            if here is not None:
                tokens.append(SPAN_BEGIN)
            span = here
        tokens.append(spec.text)
    if span is not None:
        tokens.append(SPAN_END)
    return tokens


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
