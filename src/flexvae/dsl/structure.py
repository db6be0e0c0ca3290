"""Structure files: JSON lists of tokens -> lists of TokenSpec."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from ..errors import StructureError
from ..files import read_small_file
from .grammar import TokenSpec, parse_token

# Gradient-checkpointing span markers: the tokens between them are recomputed as one segment.
SPAN_BEGIN, SPAN_END = "@begin", "@end"
MAX_LAYERS = 4096  # layers of one structure after N*TOKEN is unrolled
MAX_FILE_BYTES = 1 << 20  # a structure file is a short list of tokens


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
    layers = sum(spec.repeat for spec in specs)
    if layers > MAX_LAYERS:
        raise StructureError(f"the structure unrolls to {layers:,} layers; at most {MAX_LAYERS:,} are allowed",
                             source=source)
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
    data = read_small_file(path, MAX_FILE_BYTES, "structure file", StructureError)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise StructureError(f"not UTF-8 text (byte {exc.start}): a structure file is a JSON list of tokens",
                             source=str(path)) from None
    try:
        tokens = json.loads(text)
    except json.JSONDecodeError as exc:
        raise StructureError(
            f"not valid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}", source=str(path)
        ) from None
    except RecursionError:
        raise StructureError("JSON nested too deeply: a structure file is a flat list of tokens",
                             source=str(path)) from None
    except ValueError as exc:  # e.g. an integer of thousands of digits
        raise StructureError(f"not a usable JSON value: {exc}", source=str(path)) from None
    return parse_structure(tokens, source=str(path))



def unexpanded(specs) -> list[TokenSpec]:
    """Expanded specs share their TokenSpec object per repeat: keep each once, in order."""
    seen, out = set(), []
    for spec in specs:
        if id(spec) not in seen:
            seen.add(id(spec))
            out.append(spec)
    return out
