"""Structure files: JSON lists of tokens -> lists of TokenSpec.

Besides token strings and the "@begin"/"@end" checkpointing markers, a list may hold a
*residual span*: an object whose output is its body's output plus its shortcut's

    {"residual": ["GN_32_?", "SiLU", "C2d_?_64_3_1_1"]}                 x + body(x)
    {"residual": ["C2d_?_128_3_2_1", "SiLU", "C2d_?_128_3_1_1"],
     "shortcut": "S2C_2_128", "repeat": 2}                              S2C(x) + body(x), twice

``shortcut`` is one token (default: the identity); ``repeat`` repeats the span (each with its
own weights). Spans nest up to a few levels.
"""

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
MAX_NESTING = 4  # residual spans inside residual spans
RESIDUAL_KEYS = ("residual", "shortcut", "repeat")


def _residual(obj, source: str, position: int, depth: int) -> TokenSpec:
    """A residual span object -> one spec whose ``body`` holds the span's specs."""
    import json

    from .grammar import MAX_REPEAT

    text = json.dumps(obj, separators=(",", ":"))

    def fail(message):
        return StructureError(message, source=source, position=position, token=text[:80])

    unknown = [key for key in obj if key not in RESIDUAL_KEYS]
    if unknown or "residual" not in obj:
        raise fail(f"a residual span is an object with the keys {', '.join(RESIDUAL_KEYS)} (residual required), "
                   f"found {', '.join(map(repr, obj)) or 'no keys'}")
    if depth >= MAX_NESTING:
        raise fail(f"residual spans nest at most {MAX_NESTING} deep")
    body = obj["residual"]
    if not isinstance(body, list) or not body:
        raise fail("\"residual\" must be a non-empty list of tokens")
    body_specs = _parse_list(body, f"{source}, residual span at position {position}", depth + 1)
    if any(isinstance(spec.checkpoint, int) for spec in body_specs):
        raise fail("a residual span cannot hold @begin/@end markers; mark the whole span's tokens with '@'")
    shortcut = obj.get("shortcut")
    if shortcut is not None:
        if not isinstance(shortcut, str):
            raise fail(f"\"shortcut\" must be one token string (or left out for the identity), "
                       f"found {type(shortcut).__name__}")
        shortcut = parse_token(shortcut, source=f"{source}, shortcut of the residual span", position=position)
        if shortcut.repeat != 1:
            raise fail("a shortcut is one token, without N*")
    repeat = obj.get("repeat", 1)
    if isinstance(repeat, bool) or not isinstance(repeat, int) or not 1 <= repeat <= MAX_REPEAT:
        raise fail(f"\"repeat\" must be a whole number from 1 to {MAX_REPEAT}, found {repeat!r}")
    return TokenSpec(name="Res", repeat=repeat, text=text, source=source, position=position,
                     body=tuple(body_specs), shortcut=shortcut, raw=obj)


def parse_structure(tokens, source: str = "<structure>") -> list[TokenSpec]:
    """Parse a list of token strings; every spec remembers ``source`` and its position."""
    specs = _parse_list(tokens, source, 0)
    layers = sum(_count(spec) for spec in specs)
    if layers > MAX_LAYERS:
        raise StructureError(f"the structure unrolls to {layers:,} layers; at most {MAX_LAYERS:,} are allowed",
                             source=source)
    return specs


def _count(spec: TokenSpec) -> int:
    inner = sum(_count(s) for s in spec.body) + (1 if spec.shortcut is not None else 0) if spec.body else 1
    return spec.repeat * inner


def _parse_list(tokens, source: str, depth: int) -> list[TokenSpec]:
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
        if isinstance(text, dict):
            spec = _residual(text, source, position, depth)
        else:
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
        tokens.append(spec.raw if spec.is_residual else spec.text)
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
        raise StructureError("JSON nested too deeply: a structure file is a list of tokens and residual spans",
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
