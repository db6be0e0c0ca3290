"""Checking config values: types from the field annotations, ranges from the field metadata,
unknown names answered with suggestions. ``--set`` overrides go through the same checks."""

import dataclasses
import functools
import math
import types
import typing
from typing import Literal

from ..errors import ConfigError
from ..utils import close_matches
from ..device import DEVICE_PATTERN
from .schema import SECTION_ORDER, SECTIONS

# Common names for keys that string similarity alone would not find.
_ALIASES = {
    "learning_rate": "lr", "steps": "max_steps", "num_steps": "max_steps", "iterations": "max_steps",
    "img_size": "image_size", "resolution": "image_size", "size": "image_size",
    "output_dir": "out_dir", "outdir": "out_dir", "workers": "num_workers", "bs": "batch_size",
}


@functools.cache
def fields_of(cls) -> dict[str, tuple[dataclasses.Field, object]]:
    """key -> (dataclass field, resolved annotation) of a section or latent-parameter dataclass."""
    hints = typing.get_type_hints(cls)
    return {f.name: (f, hints[f.name]) for f in dataclasses.fields(cls)}


def section_fields(section: str) -> dict:
    return fields_of(SECTIONS[section])


# ----------------------------------------------------------------- type checks
def matches(value, tp):
    """(True, value converted to tp) when value fits annotation tp, else (False, None)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else None
    if tp is str:
        return isinstance(value, str), value
    if origin is Literal:
        return any(type(value) is type(c) and value == c for c in args), value
    if origin is list:
        if not isinstance(value, list):
            return False, None
        converted = [matches(v, args[0]) for v in value]
        return all(ok for ok, _ in converted), [v for _, v in converted]
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            ok, converted = matches(value, arg)
            if ok:
                return True, converted
        return False, None
    raise TypeError(f"unsupported annotation {tp!r}")


def _describe(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    names = {bool: "a bool (true or false)", int: "an int", float: "a float", str: "a string"}
    plural = {bool: "bools", int: "ints", float: "floats", str: "strings"}
    if tp in names:
        return names[tp]
    if origin is Literal:
        return "one of " + ", ".join(repr(c) for c in args)
    if origin is list:
        return "a list of " + plural[args[0]]
    return " or ".join(_describe(a) for a in args)


def _finite(value) -> bool:
    if isinstance(value, list):
        return all(_finite(v) for v in value)
    return not isinstance(value, float) or math.isfinite(value)


def validate_value(cls, section: str, key: str, value, source: str):
    """The value converted to the field's type; ConfigError on a type or range mistake."""
    f, tp = fields_of(cls)[key]
    name = f"'{section}.{key}'"
    ok, converted = matches(value, tp)
    if not ok:
        hint = ""
        if typing.get_origin(tp) is Literal and isinstance(value, str):
            hint = did_you_mean(matching(value, [c for c in typing.get_args(tp) if isinstance(c, str)]))
        got = f"got {type(value).__name__} {value!r}"
        raise ConfigError(f"{source}: {name} must be {_describe(tp)}, {got}" + (f".{hint}" if hint else ""))
    if not _finite(converted):
        raise ConfigError(f"{source}: {name} must be finite, got {value!r}")
    length, check = f.metadata["length"], f.metadata["check"]
    if length is not None:
        lo, hi = length
        if len(converted) < lo or (hi is not None and len(converted) > hi):
            want = f"exactly {lo}" if lo == hi else f"at least {lo}"
            raise ConfigError(f"{source}: {name} must have {want} entries, got {len(converted)}: {value!r}")
    if check is not None:
        text, pred = check
        for item in converted if isinstance(converted, list) else [converted]:
            if not pred(item):
                what = f"each entry of {name}" if isinstance(converted, list) else name
                raise ConfigError(f"{source}: {what} must be {text}, got {item!r}")
    if (section, key) == ("train", "device") and not DEVICE_PATTERN.fullmatch(converted):
        raise ConfigError(f"{source}: {name} must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got {value!r}")
    if (section, key) == ("model", "latent"):
        from ..latents import LATENTS

        if converted not in LATENTS:
            names = LATENTS.names()
            raise ConfigError(f"{source}: {name} = {converted!r} is not a latent type."
                              f"{did_you_mean(matching(converted, names))} Choose one of {', '.join(names)}")
    return converted


# ------------------------------------------------------------ unknown names
def matching(name: str, candidates, fuzzy: bool = True) -> list[str]:
    """Candidates that look like ``name``: exact, known alias or initials (lr/learning_rate), then similar."""
    candidates = list(dict.fromkeys(candidates))
    found = [c for c in candidates if c == name or c == _ALIASES.get(name)
             or _initials(name) == c or _initials(c) == name]
    return found + [c for c in close_matches(name, candidates) if fuzzy and c not in found]


def _initials(name: str) -> str:
    parts = name.split("_")
    return "".join(p[0] for p in parts if p) if len(parts) > 1 else ""


def did_you_mean(found: list[str]) -> str:
    quoted = [repr(c) for c in found[:3]]
    if not quoted:
        return ""
    if len(quoted) == 1:
        return f" Did you mean {quoted[0]}?"
    return f" Did you mean {', '.join(quoted[:-1])} or {quoted[-1]}?"


def key_suggestion(section: str | None, key: str) -> str:
    """' Did you mean ...?' for a key: a strong match in its section, then one in another section
    (train.image_size -> data.image_size), then similar names in the section, then anywhere."""
    mine = list(section_fields(section)) if section in SECTIONS else []
    others = [(s, k) for s in SECTIONS if s != section for k in section_fields(s)]
    for fuzzy in (False, True):
        found = matching(key, mine, fuzzy)
        if found:
            return did_you_mean([f"{section}.{k}" for k in found])
        found = matching(key, [k for _, k in others], fuzzy)
        if found:
            return did_you_mean([f"{s}.{k}" for fk in found for s, k in others if k == fk])
    return ""


def unknown_section(name: str, source: str) -> ConfigError:
    valid_names = SECTION_ORDER
    found = close_matches(name, valid_names)
    hint = f" Did you mean [{found[0]}]?" if found else ""
    valid = ", ".join(f"[{s}]" for s in valid_names)
    return ConfigError(f"{source}: unknown section [{name}].{hint} Valid sections: {valid}.")


def unknown_key(section: str, key: str, source: str) -> ConfigError:
    hint = key_suggestion(section, key)
    if not hint:
        hint = f" Valid keys in [{section}]: {', '.join(section_fields(section))}."
    return ConfigError(f"{source}: unknown key '{section}.{key}'.{hint}")


def latent_key_error(latent_type, key: str, source: str) -> ConfigError:
    """A [latent] key the chosen latent type does not take: name the types that do."""
    from ..latents import LATENTS

    owners = LATENTS.owners(key)
    valid = ", ".join(latent_type.keys) or "none"
    if owners:
        return ConfigError(
            f"{source}: 'latent.{key}' is a setting of model.latent = {' or '.join(map(repr, owners))}, but "
            f"model.latent = {latent_type.name!r}; remove it or change model.latent. "
            f"Keys of {latent_type.name!r}: {valid}.")
    every = [k for t in LATENTS for k in t.keys]
    hint = did_you_mean([f"latent.{k}" for k in matching(key, every)])
    return ConfigError(f"{source}: unknown key 'latent.{key}'.{hint} Keys of model.latent = "
                       f"{latent_type.name!r}: {valid}.")
