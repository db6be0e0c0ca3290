"""Token syntax: ``[N*]NAME[_ARG...]``.

    "C2d_3_128_3_1_1"        Conv2d(in=3, out=128, kernel=3, stride=1, padding=1)
    "2*VAERB_256_256"        two residual blocks
    "GN_32_?_eps=1e-6"       GroupNorm, channels inferred, keyword argument
    "UpS_2_mode=nearest"     string values only as keyword values
    "@2*VAERB_256_256"       '@' marks a token for gradient checkpointing

Arguments are separated by ``_``. A positional argument is an integer, a float or
``?`` (take the value from the previous layer's output, e.g. in-channels). A keyword
argument is ``name=value``; since ``_`` separates arguments, a keyword whose name has
underscores (``padding_mode=reflect``) is put back together: bare words directly in
front of a ``name=value`` piece belong to its name. Keywords come after positionals.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..errors import StructureError


class _Infer:
    """The ``?`` placeholder: filled in by the builder from the traced input shape."""

    _instance = None

    def __new__(cls):
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "?"

    def __reduce__(self):
        return (_Infer, ())


INFER = _Infer()

_REPEAT = re.compile(r"^(\d+)\*")
# Limits that keep a structure file from exhausting memory or time before it is checked.
MAX_REPEAT = 1024  # N in N*TOKEN
MAX_INTEGER = 2**31 - 1  # largest absolute value of an integer argument
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9]*$")
_INT = re.compile(r"^[+-]?\d+$")
_FLOAT = re.compile(r"^[+-]?(\d+\.\d*|\.\d+|\d+)([eE][+-]?\d+)?$")
_WORD = re.compile(r"^[A-Za-z][A-Za-z0-9]*$")
_KEY = re.compile(r"^[A-Za-z][A-Za-z0-9]*$")
_STRING = re.compile(r"^[A-Za-z][A-Za-z0-9.\-]*$")


@dataclass(frozen=True)
class TokenSpec:
    """One parsed token, before any module exists.

    ``position`` is the 1-based index of the token in its list (the way a person counts
    lines); repeated tokens share it.
    """

    name: str
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    repeat: int = 1
    text: str = ""
    source: str | None = None
    position: int | None = None
    # Gradient checkpointing: None, "token" (an '@' token: each repeat on its own), or the
    # number of the "@begin" ... "@end" span the token belongs to (one segment per span).
    checkpoint: str | int | None = None
    # A residual span ({"residual": [...], "shortcut": "...", "repeat": N} in a structure file):
    # the body's specs, the shortcut's spec (None: the identity) and the JSON object itself.
    body: tuple = ()
    shortcut: "TokenSpec | None" = None
    raw: object = None

    @property
    def is_residual(self) -> bool:
        return bool(self.body)

    def error(self, message: str) -> StructureError:
        return StructureError(message, source=self.source, position=self.position, token=self.text)


def parse_value(piece: str, *, keyword: bool = False):
    """'3' -> 3, '1e-6' -> 1e-06, '?' -> INFER; keyword values may also be bools or words."""
    if piece == "?":
        return INFER
    if _INT.match(piece):
        digits = piece.lstrip("+-")
        if len(digits) > 12 or abs(int(piece)) > MAX_INTEGER:
            raise ValueError(f"integer {piece[:20]}{'...' if len(piece) > 20 else ''} is too large "
                             f"(at most {MAX_INTEGER} in absolute value)")
        return int(piece)
    if _FLOAT.match(piece):
        value = float(piece)
        if value in (float("inf"), float("-inf")):
            raise ValueError(f"number {piece[:20]}{'...' if len(piece) > 20 else ''} is too large for a float")
        return value
    if keyword:
        lowered = piece.lower()
        if lowered in ("true", "false"):
            return lowered == "true"
        if _STRING.match(piece):
            return piece
    return None


def _word_message(name: str, word: str) -> str:
    return (
        f"argument {word!r} is not a number; text values are written as keywords, "
        f"e.g. \"{name}_..._mode={word}\""
    )


def parse_token(text: str, source: str | None = None, position: int | None = None, what: str = "layer") -> TokenSpec:
    """Parse one token; raise StructureError naming the file, position and token. ``what``: what
    the token names, for the messages ('layer', or 'term' for loss terms)."""

    def fail(message: str) -> StructureError:
        return StructureError(message, source=source, position=position, token=text)

    if not isinstance(text, str):
        example = "C2d_3_64_3_1_1" if what == "layer" else "KL_weight=1e-4"
        also = " or a residual span {\"residual\": [...]}" if what == "layer" else ""
        raise fail(f"expected a token string such as \"{example}\"{also}, found {type(text).__name__}")
    body = text.strip()
    checkpoint = None
    if body.startswith("@"):
        checkpoint, body = "token", body[1:]
    if not body:
        raise fail("empty token")

    repeat = 1
    match = _REPEAT.match(body)
    if match:
        count = match.group(1)
        if len(count) > 6 or int(count) > MAX_REPEAT:
            raise fail(f"repeat count {count[:12]}{'...' if len(count) > 12 else ''} is too large: "
                       f"N*TOKEN takes N from 1 to {MAX_REPEAT}")
        repeat = int(count)
        if repeat < 1:
            raise fail(f"repeat count must be at least 1, found {repeat}")
        body = body[match.end():]
    elif "*" in body:
        raise fail("a repeat is written N*TOKEN with N a whole number, e.g. \"2*VAERB_256_256\"")

    name, *pieces = body.split("_")
    if not _NAME.match(name):
        raise fail(f"{what} name {name!r} must start with a letter and hold only letters and digits")

    args: list = []
    kwargs: dict = {}
    pending_words: list[str] = []
    for index, piece in enumerate(pieces, start=1):
        if piece == "":
            raise fail(f"argument {index} is empty (two '_' in a row, or a trailing '_')")
        if "=" in piece:
            key_tail, _, raw = piece.partition("=")
            key = "_".join(pending_words + [key_tail])
            pending_words = []
            if not _KEY.match(key_tail) or not raw:
                raise fail(f"keyword argument {piece!r} must look like name=value")
            if key in kwargs:
                raise fail(f"keyword argument {key!r} is given twice")
            try:
                value = parse_value(raw, keyword=True)
            except ValueError as exc:
                raise fail(f"value of {key!r}: {exc}") from None
            if value is None:
                raise fail(f"value {raw!r} of {key!r} is not a number, '?', true/false or a word")
            kwargs[key] = value
            continue
        if _WORD.match(piece) and piece != "?":
            pending_words.append(piece)  # start of a keyword name with underscores
            continue
        if pending_words:
            raise fail(_word_message(name, pending_words[0]))
        try:
            value = parse_value(piece)
        except ValueError as exc:
            raise fail(f"argument {index}: {exc}") from None
        if value is None:
            raise fail(f"argument {index} {piece!r} is not a number or '?'")
        if kwargs:
            raise fail(f"positional argument {piece!r} comes after a keyword argument")
        args.append(value)
    if pending_words:
        raise fail(_word_message(name, pending_words[0]))
    return TokenSpec(
        name=name, args=tuple(args), kwargs=kwargs, repeat=repeat,
        text=text, source=source, position=position, checkpoint=checkpoint,
    )
