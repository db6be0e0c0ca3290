"""Writing configs as TOML: the resolved config of a run, and ``-mem --write``'s in-place edit."""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import re
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from ..errors import ConfigError
from ..files import write_bytes, write_text
from .schema import SECTION_ORDER, Config, StageConfig
from .validate import fields_of


def config_to_dict(cfg: Config) -> dict:
    """Plain nested dict of TOML-able values, sections in order; ``stage`` (a list of tables)
    only when the config has stages."""
    found = {s: dataclasses.asdict(getattr(cfg, s)) for s in SECTION_ORDER}
    if cfg.stage:
        found["stage"] = [dataclasses.asdict(stage) for stage in cfg.stage]
    return found


def _toml_string(s: str) -> str:
    escapes = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r", "\b": "\\b", "\f": "\\f"}
    out = []
    for ch in s:
        if ch in escapes:
            out.append(escapes[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)  # shortest text that reads back to the same float
    if isinstance(v, str):
        return _toml_string(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} {v!r} as TOML")


def dump_toml(cfg: Config) -> str:
    """The config as TOML text that load_config reads back to an equal Config."""
    lines = []
    for section, table in config_to_dict(cfg).items():
        for one in table if isinstance(table, list) else [table]:
            lines.append(f"[[{section}]]" if isinstance(table, list) else f"[{section}]")
            lines += [f"{key} = {_toml_value(value)}" for key, value in one.items()]
            lines.append("")
    return "\n".join(lines)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the config as TOML atomically."""
    write_text(path, dump_toml(cfg))


def describe_fields() -> list[tuple[str, str, str]]:
    """(section.key, default as TOML text, one-line doc) for every field, in order; [latent]
    lists the settings of every registered latent type."""
    from ..latents import LATENTS

    defaults = config_to_dict(Config())
    rows = []
    for section in SECTION_ORDER:
        if section == "latent":
            seen = set()
            for latent_type in LATENTS:
                values = dataclasses.asdict(latent_type.params())
                for key, (f, _) in fields_of(latent_type.params).items():
                    if key not in seen:
                        seen.add(key)
                        rows.append((f"latent.{key}", _toml_value(values[key]), f.metadata["doc"]))
            continue
        for key, (f, _) in fields_of(type(getattr(Config(), section))).items():
            rows.append((f"{section}.{key}", _toml_value(defaults[section][key]), f.metadata["doc"]))
    for key, (f, _) in fields_of(StageConfig).items():
        rows.append((f"stage.{key}", _toml_value(f.default if f.default is not dataclasses.MISSING
                                                 else f.default_factory()), f.metadata["doc"]))
    return rows


# ------------------------------------------------------------------ -mem --write
_HEADER = re.compile(r"^\s*\[(\[?)([^\[\]]*)\]\]?\s*(#.*)?$")
# (key and "="), (the value: an integer has no "#"), (spaces and comment)
_ASSIGN = r"""\s*(?:batch_size|"batch_size"|'batch_size')\s*=\s*)([^#\r\n]*?)(\s*(?:#.*)?)$"""
_KEY = re.compile(r"^(\s*" + _ASSIGN)
_ROOT_KEY = re.compile(r"^(\s*train\s*\.\s*" + _ASSIGN)  # train.batch_size = ... before any header


def _table_name(line: str) -> str | None:
    """'train' for a ``[train]`` header line; '[x]' style for ``[[x]]``; None for other lines."""
    match = _HEADER.match(line.rstrip("\r\n"))
    if not match:
        return None
    name = ".".join(part.strip().strip("\"'") for part in match.group(2).split("."))
    return f"[{name}]" if match.group(1) else name


def set_batch_size_text(text: str, batch_size: int) -> str:
    """The TOML text with ``[train] batch_size`` set, every other line kept as it was."""
    lines = text.splitlines(keepends=True)
    newline = "\r\n" if lines and lines[0].endswith("\r\n") else "\n"
    tables = [(i, _table_name(line)) for i, line in enumerate(lines)]
    headers = [i for i, name in tables if name is not None]
    root_end = headers[0] if headers else len(lines)
    starts = [i for i, name in tables if name == "train"]
    ranges = [(s + 1, next((h for h in headers if h > s), len(lines))) for s in starts]
    for first, end, pattern in [(0, root_end, _ROOT_KEY)] + [(a, b, _KEY) for a, b in ranges]:
        for i in range(first, end):
            body = lines[i].rstrip("\r\n")
            match = pattern.match(body)
            if match:
                lines[i] = f"{match.group(1)}{batch_size}{match.group(3)}{lines[i][len(body):]}"
                return "".join(lines)
    if ranges:  # [train] without the key: add it after the table's last key line
        first, end = ranges[0]
        keyed = [i for i in range(first, end) if lines[i].strip() and not lines[i].lstrip().startswith("#")]
        at, line = (keyed[-1] + 1 if keyed else first), f"batch_size = {batch_size}{newline}"
    else:
        at, line = len(lines), f"{newline if lines else ''}[train]{newline}batch_size = {batch_size}{newline}"
    if at > 0 and not lines[at - 1].endswith(("\n", "\r")):
        lines[at - 1] += newline
    lines.insert(at, line)
    return "".join(lines)


def write_batch_size(config_path, batch_size: int) -> None:
    """Set ``batch_size`` in the ``[train]`` table of a TOML config in place, keeping comments,
    order and every other value; written atomically and checked by parsing it back."""
    if config_path is None:
        raise ConfigError("--write needs a config file to update: pass it with -c/--config")
    path = Path(os.path.realpath(config_path))
    try:
        text = path.read_bytes().decode("utf-8")
        before = tomllib.loads(text)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {config_path}") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot update {config_path}: {exc}") from None
    if not isinstance(before.get("train", {}), dict):
        raise ConfigError(f"{config_path}: 'train' must be a table ([train] header)")
    new_text = set_batch_size_text(text, int(batch_size))
    expected = copy.deepcopy(before)
    expected.setdefault("train", {})["batch_size"] = int(batch_size)
    try:
        after = tomllib.loads(new_text)
    except tomllib.TOMLDecodeError:
        after = None
    if after != expected:
        raise ConfigError(f"could not update {config_path} safely; set batch_size = {batch_size} "
                           f"under [train] by hand")
    write_bytes(path, new_text.encode("utf-8"))
