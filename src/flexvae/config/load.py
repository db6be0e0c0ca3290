"""From TOML files, nested dicts and ``--set section.key=value`` overrides to a checked Config."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from ..errors import ConfigError
from ..files import read_small_file
from .schema import RENAMED_KEYS, SECTIONS, Config, ModelConfig, StageConfig
from .validate import (did_you_mean, fields_of, key_suggestion, latent_key_error, matches, matching,
                       section_fields, unknown_key, unknown_section, validate_value)


MAX_CONFIG_BYTES = 1 << 20


def _latent_type(name: str):
    from ..latents import LATENTS

    return LATENTS.get(name)


def latent_params(latent_type, table: dict, source: str, stored: bool = False):
    """The [latent] table checked against the parameters of ``latent_type``.

    ``stored``: a config kept in a checkpoint, which may also hold the keys of other latent
    types (older checkpoints stored every latent's settings); those are ignored.
    """
    from ..latents import LATENTS

    known = fields_of(latent_type.params)
    values = {}
    for key, value in table.items():
        if key not in known:
            if stored and LATENTS.owners(key):
                continue
            raise latent_key_error(latent_type, key, source)
        values[key] = validate_value(latent_type.params, "latent", key, value, source)
    return latent_type.params(**values)


def config_from_dict(raw: dict, source: str = "<config>", *, stored: bool = False) -> Config:
    """Build a checked Config from a nested dict such as tomllib returns."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: a config must be a table of sections, got {type(raw).__name__}")
    sections, latent_table = {}, {}
    for name, table in raw.items():
        if name == "stage":
            sections["stage"] = stage_tables(table, source)
            continue
        if name not in SECTIONS and name != "latent":
            if isinstance(table, dict):
                raise unknown_section(name, source)
            raise ConfigError(f"{source}: '{name}' is not inside a section; every key belongs under a "
                              f"[section] header.{key_suggestion(None, name)}")
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: '{name}' must be a table ([{name}] header), got {type(table).__name__}")
        if name == "latent":
            latent_table = table
            continue
        known = section_fields(name)
        values = {}
        for key, value in table.items():
            key = current_name(name, key, source, quiet=stored, beside=table)
            if key not in known:
                raise unknown_key(name, key, source)
            values[key] = validate_value(SECTIONS[name], name, key, value, source)
        sections[name] = SECTIONS[name](**values)
    model = sections.get("model", ModelConfig())
    sections["latent"] = latent_params(_latent_type(model.latent), latent_table, source, stored)
    return Config(**sections)


def current_name(section: str, key: str, source: str, quiet: bool = False, beside=()) -> str:
    """A renamed key's name now (with a note unless ``quiet``); any other key as it is. An old
    name beside its new one in the same table is an error (which would win?)."""
    new = RENAMED_KEYS.get((section, key))
    if new is None:
        return key
    if new in beside:
        raise ConfigError(f"{source}: [{section}] sets both '{key}' and '{new}', its new name; keep '{new}'")
    if not quiet:
        print(f"note: {source}: {section}.{key} is now called {section}.{new} (the old name still works)",
              file=sys.stderr)
    return new


def stage_tables(tables, source: str) -> tuple:
    """The ``[[stage]]`` tables, each checked like a section; errors name the stage by number."""
    if isinstance(tables, dict):
        raise ConfigError(f"{source}: stages are written [[stage]] (a list of tables, one per stage), not [stage]")
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise ConfigError(f"{source}: 'stage' must be [[stage]] tables, got {type(tables).__name__}")
    stages = []
    for number, table in enumerate(tables, start=1):
        where = f"{source}: [[stage]] {number}"
        known = fields_of(StageConfig)
        values = {}
        for key, value in table.items():
            if key not in known:
                hint = did_you_mean(matching(key, list(known)))
                raise ConfigError(f"{where}: unknown key 'stage.{key}'.{hint} Keys of a stage: {', '.join(known)}.")
            values[key] = validate_value(StageConfig, "stage", key, value, where)
        stages.append(StageConfig(**values))
    return tuple(stages)


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> Config:
    """Defaults (path None) or a TOML file, then ``section.key=value`` overrides."""
    if path is None:
        cfg = Config()
    else:
        path = Path(path)
        data = read_small_file(path, MAX_CONFIG_BYTES, "config file", ConfigError)
        try:
            raw = tomllib.loads(data.decode("utf-8"))
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: invalid TOML: {e}") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not valid UTF-8 text: {e}") from None
        except (RecursionError, ValueError) as e:  # nesting or numbers beyond what a config needs
            raise ConfigError(f"{path}: not a usable config: {type(e).__name__}: {str(e)[:200]}") from None
        cfg = config_from_dict(raw, str(path))
    return apply_overrides(cfg, overrides)


_BOOL_WORDS = {"true": True, "yes": True, "1": True, "on": True,
               "false": False, "no": False, "0": False, "off": False}


def parse_override_value(text: str, tp):
    """An override's value: a TOML value when it parses as one, else the bare string."""
    try:
        parsed = tomllib.loads("v = " + text)
        value = parsed["v"] if list(parsed) == ["v"] else text.strip()
    except tomllib.TOMLDecodeError:
        value = text.strip()
    except RecursionError:
        raise ValueError("it is nested too deeply for a config value") from None
    except ValueError:  # an integer of thousands of digits
        raise ValueError("a number of that many digits is beyond any config value") from None
    if tp is bool:
        if isinstance(value, str) and value.strip().lower() in _BOOL_WORDS:
            return _BOOL_WORDS[value.strip().lower()]
        if type(value) is int and value in (0, 1):
            return bool(value)
        return value
    if tp is float and isinstance(value, str):
        try:
            return float(value)  # forms TOML lacks, such as .5 or 1E3
        except ValueError:
            return value
    if tp == list[str] and isinstance(value, str):
        return [value] if value else []
    if not matches(value, tp)[0] and matches(text.strip(), tp)[0]:
        return text.strip()  # e.g. a date-like or numeric folder name for a string field
    return value


def _override_value(section: str, key: str, text: str, tp):
    try:
        return parse_override_value(text, tp)
    except ValueError as exc:
        shown = text if len(text) <= 40 else f"{text[:24]}...({len(text):,} characters)"
        raise ConfigError(f"--set {section}.{key}={shown}: {exc}") from None


def _split_override(item: str) -> tuple[str, str, str]:
    target, sep, text = item.partition("=")
    section, dot, key = target.strip().partition(".")
    if not sep or not dot or not section or not key:
        raise ConfigError(f"--set: malformed override {item!r}; expected section.key=value, "
                          f"e.g. train.lr=3e-4 or data.path=my/images")
    return section, key, text


def apply_overrides(cfg: Config, overrides: Sequence[str]) -> Config:
    """A new Config with each ``section.key=value`` applied in order.

    ``latent.*`` overrides are checked against the latent type in effect after every
    ``model.latent`` override, whatever their order; when ``model.latent`` changes, the
    previous type's settings do not carry over.
    """
    if isinstance(overrides, str):
        overrides = [overrides]
    latent_items = []
    for item in overrides:
        section, key, text = _split_override(item)
        if section == "latent":
            latent_items.append((key, text))
            continue
        if section == "stage":
            raise ConfigError(f"--set {section}.{key}: stages are [[stage]] tables of a config file and cannot be "
                              "set from the command line")
        if section not in SECTIONS:
            raise unknown_section(section, "--set")
        key = current_name(section, key, "--set")
        fields = section_fields(section)
        if key not in fields:
            raise unknown_key(section, key, "--set")
        value = validate_value(SECTIONS[section], section, key, _override_value(section, key, text, fields[key][1]),
                               "--set")
        new_section = dataclasses.replace(getattr(cfg, section), **{key: value})
        cfg = dataclasses.replace(cfg, **{section: new_section})
    latent_type = _latent_type(cfg.model.latent)
    latent = cfg.latent if isinstance(cfg.latent, latent_type.params) else latent_type.params()
    fields = fields_of(latent_type.params)
    for key, text in latent_items:
        if key not in fields:
            raise latent_key_error(latent_type, key, "--set")
        value = validate_value(latent_type.params, "latent", key, _override_value("latent", key, text, fields[key][1]),
                               "--set")
        latent = dataclasses.replace(latent, **{key: value})
    return dataclasses.replace(cfg, latent=latent)
