"""Run configuration: one frozen dataclass per TOML section, loaded and checked.

Every field has a default, so an empty file (or no file) is a valid config.
Values are type-checked from the field annotations and range-checked from the
field metadata; ``--set section.key=value`` overrides go through the same checks.
"""

import contextlib
import dataclasses
import functools
import math
import os
import re
import tempfile
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from .errors import ConfigError
from .utils import close_matches

# Range checks: (text shown in errors, predicate).
POSITIVE = ("> 0", lambda v: v > 0)
NON_NEGATIVE = (">= 0", lambda v: v >= 0)
UNIT_OPEN_CLOSED = ("in (0, 1]", lambda v: 0 < v <= 1)
UNIT_CLOSED = ("in [0, 1]", lambda v: 0 <= v <= 1)
UNIT_OPEN = ("in (0, 1)", lambda v: 0 < v < 1)
UNIT_CLOSED_OPEN = ("in [0, 1)", lambda v: 0 <= v < 1)
AT_LEAST_TWO = (">= 2", lambda v: v >= 2)
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def _f(default, doc, check=None, length=None):
    """A dataclass field with a one-line doc and optional range/length checks."""
    meta = {"doc": doc, "check": check, "length": length}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class DataConfig:
    source: str = _f(
        "folder", "'folder' or a torchvision dataset: mnist, fashion-mnist, kmnist, cifar10, cifar100, svhn")
    path: str = _f("assets/photos", "image folder (source = folder) or dataset root (downloads go there)")
    val_path: str = _f("", "optional separate validation image folder; empty = none")
    image_size: int = _f(32, "side length in pixels that images are resized to", POSITIVE)
    channels: Literal[1, 3, 4] = _f(3, "image channels: 1 (grey), 3 (RGB) or 4 (RGBA)")
    resize_filter: Literal["nearest", "bilinear", "bicubic", "lanczos", "box", "hamming"] = _f(
        "bilinear", "resampling filter: nearest, bilinear, bicubic, lanczos, box or hamming")
    pad_to_square: bool = _f(False, "pad images to a square before resizing instead of cropping")
    flip: bool = _f(True, "random horizontal flip (training only)")
    num_workers: int = _f(2, "data loader worker processes", NON_NEGATIVE)


@dataclass(frozen=True)
class ModelConfig:
    encoder: str | list[str] = _f(
        "structures/small_encoder.json", "encoder: JSON token-list file or inline list of tokens")
    decoder: str | list[str] = _f(
        "structures/small_decoder.json", "decoder: JSON token-list file or inline list of tokens")
    latent: Literal["gaussian", "deterministic", "vq", "fsq", "categorical"] = _f(
        "gaussian", "latent bottleneck: gaussian, deterministic, vq, fsq or categorical")
    scaling_factor: float = _f(
        1.0, "latents are multiplied by this when encoded, divided by it before decoding", POSITIVE)
    plugins: list[str] = _f([], "Python modules or .py files that register extra layer tokens")


@dataclass(frozen=True)
class LatentConfig:
    """Parameters of the latent types that model.latent selects; each doc names its type."""

    codebook_size: int = _f(512, "vq: codebook entries (log2 of it = bits per latent position)", POSITIVE)
    code_dim: int = _f(4, "vq: code dimension; the encoder's last layer outputs this many channels", POSITIVE)
    commitment: float = _f(0.25, "vq: commitment loss weight beta in beta * |z_e - sg(z_q)|^2", NON_NEGATIVE)
    ema_decay: float = _f(
        0.99, "vq: EMA decay of the codebook updates; 0 = learn the codebook by gradient (adds a codebook loss)",
        UNIT_CLOSED_OPEN)
    dead_threshold: float = _f(
        0.1, "vq: restart codes whose average use falls below this fraction of an even share "
             "(batch vectors / codebook size) from random encoder outputs; 0 = never", NON_NEGATIVE)
    kmeans_init: bool = _f(False, "vq: initialise the codebook by k-means on the first training batch")
    fsq_levels: list[int] = _f(
        [8, 5, 5, 5], "fsq: levels per channel; the encoder's last layer outputs len(levels) channels",
        AT_LEAST_TWO, (1, None))
    categories: int = _f(16, "categorical: values of each categorical variable", AT_LEAST_TWO)
    groups: int = _f(
        4, "categorical: variables per latent position; the encoder outputs groups x categories logits", POSITIVE)
    tau_start: float = _f(1.0, "categorical: Gumbel-softmax temperature at step 0", POSITIVE)
    tau_min: float = _f(0.5, "categorical: lowest temperature, also used outside training", POSITIVE)
    tau_rate: float = _f(
        1e-3, "categorical: temperature decay, tau = max(tau_min, tau_start * exp(-tau_rate * step))", NON_NEGATIVE)
    hard: bool = _f(True, "categorical: one-hot samples with straight-through gradients; false = soft samples")


@dataclass(frozen=True)
class LossConfig:
    recon: Literal["mse", "l1", "bce"] = _f("mse", "reconstruction loss: mse, l1 or bce")
    alpha: float = _f(1.0, "reconstruction loss weight", NON_NEGATIVE)
    kld_weight: float = _f(1e-4, "KL divergence weight (its final value under a schedule)", NON_NEGATIVE)
    kld_reduction: Literal["mean", "sum"] = _f(
        "mean", "KL reduction: mean (per element) or sum (per sample, averaged over the batch)")
    kld_schedule: Literal["constant", "linear", "cyclical"] = _f(
        "constant", "KL weight schedule: constant, linear (warmup) or cyclical")
    kld_warmup_steps: int = _f(0, "linear schedule: steps to ramp the KL weight from 0", NON_NEGATIVE)
    kld_cycle_steps: int = _f(1000, "cyclical schedule: period length in steps", POSITIVE)
    kld_cycle_ratio: float = _f(0.5, "cyclical schedule: fraction of a period spent ramping", UNIT_OPEN_CLOSED)
    ssim: bool = _f(False, "add beta * (1 - SSIM) to the loss")
    beta: float = _f(1.0, "SSIM loss weight", NON_NEGATIVE)
    ssim_kind: Literal["auto", "ssim", "ms-ssim"] = _f(
        "auto", "SSIM variant: auto (chosen from the image size), ssim or ms-ssim")
    sparse: bool = _f(False, "add gamma * L1 of the posterior mean to the loss")
    gamma: float = _f(1e-3, "sparsity loss weight", NON_NEGATIVE)


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = _f(16, "images per optimizer micro-batch", POSITIVE)
    max_steps: int = _f(600, "optimizer steps to train for", POSITIVE)
    lr: float = _f(1e-3, "peak learning rate (AdamW)", POSITIVE)
    weight_decay: float = _f(0.01, "AdamW weight decay", NON_NEGATIVE)
    betas: list[float] = _f([0.9, 0.999], "AdamW betas [beta1, beta2]", UNIT_CLOSED_OPEN, (2, 2))
    warmup_steps: int = _f(0, "linear learning-rate warmup steps", NON_NEGATIVE)
    schedule: Literal["constant", "cosine"] = _f("cosine", "learning-rate schedule after warmup: constant or cosine")
    min_lr_ratio: float = _f(0.1, "cosine schedule: final learning rate as a fraction of lr", UNIT_CLOSED)
    grad_accum: int = _f(1, "micro-batches accumulated per optimizer step", POSITIVE)
    grad_clip: float = _f(1.0, "gradient norm clipping; 0 = off", NON_NEGATIVE)
    ema: bool = _f(False, "keep an exponential moving average of the weights")
    ema_decay: float = _f(0.999, "EMA decay per step", UNIT_OPEN)
    seed: int = _f(0, "random seed")
    device: str = _f("auto", "'auto' (cuda, else mps, else cpu), 'cpu', 'cuda', 'cuda:N' or 'mps'")
    out_dir: str = _f("runs/default", "folder for checkpoints, samples and logs")
    save_every: int = _f(200, "save a checkpoint every N steps", POSITIVE)
    keep_last: int = _f(3, "number of recent checkpoints kept", POSITIVE)
    sample_every: int = _f(200, "write reconstruction samples every N steps", POSITIVE)
    log_every: int = _f(10, "log losses every N steps", POSITIVE)
    val_every: int = _f(0, "validate on data.val_path every N steps (and at the end); 0 = off", NON_NEGATIVE)
    precision: Literal["fp32", "bf16", "fp16"] = _f(
        "fp32", "fp32, or bf16/fp16 autocast (fp16 adds a gradient scaler); norms and the loss stay fp32")
    channels_last: bool = _f(False, "channels-last memory layout for 2D/3D data (faster convolutions on GPU)")
    compile: bool = _f(False, "torch.compile the model; falls back to eager with a message where it fails")
    grad_checkpointing: Literal["off", "marked", "blocks"] = _f(
        "off", "recompute activations in backward: off, marked ('@' tokens and spans), blocks (every VAERB/VAEA too)")


@dataclass(frozen=True)
class EncodeConfig:
    format: Literal["safetensors", "npy"] = _f("safetensors", "file format for encoded latents: safetensors or npy")
    sample: bool = _f(False, "store a posterior sample instead of the mean")
    batch_size: int = _f(32, "images per encoding batch", POSITIVE)


@dataclass(frozen=True)
class MemConfig:
    margin: float = _f(0.9, "fraction of free device memory that may be used", UNIT_OPEN_CLOSED)
    probe_sizes: list[int] = _f([1, 2, 4], "batch sizes measured to fit memory use (at least 2)", POSITIVE, (2, None))
    max_batch: int = _f(4096, "largest batch size ever suggested", POSITIVE)


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    latent: LatentConfig = field(default_factory=LatentConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    encode: EncodeConfig = field(default_factory=EncodeConfig)
    mem: MemConfig = field(default_factory=MemConfig)


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}
# Common names for keys that string similarity alone would not find.
_ALIASES = {
    "learning_rate": "lr", "steps": "max_steps", "num_steps": "max_steps", "iterations": "max_steps",
    "img_size": "image_size", "resolution": "image_size", "size": "image_size",
    "output_dir": "out_dir", "outdir": "out_dir", "workers": "num_workers", "bs": "batch_size",
}


@functools.cache
def _fields(section: str) -> dict[str, tuple[dataclasses.Field, object]]:
    """key -> (dataclass field, resolved annotation) for one section."""
    cls = SECTIONS[section]
    hints = typing.get_type_hints(cls)
    return {f.name: (f, hints[f.name]) for f in dataclasses.fields(cls)}


# ----------------------------------------------------------------- type checks
def _matches(value, tp):
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
        converted = [_matches(v, args[0]) for v in value]
        return all(ok for ok, _ in converted), [v for _, v in converted]
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            ok, converted = _matches(value, arg)
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


def _type_error(section, key, tp, value, source):
    got = f"got {type(value).__name__} {value!r}"
    hint = ""
    if typing.get_origin(tp) is Literal and isinstance(value, str):
        hint = _did_you_mean(_matching(value, [c for c in typing.get_args(tp) if isinstance(c, str)]))
    return ConfigError(f"{source}: '{section}.{key}' must be {_describe(tp)}, {got}" + (f".{hint}" if hint else ""))


def _validate(section: str, key: str, value, source: str):
    """The value converted to the field's type; ConfigError on a type or range mistake."""
    f, tp = _fields(section)[key]
    name = f"'{section}.{key}'"
    ok, converted = _matches(value, tp)
    if not ok:
        raise _type_error(section, key, tp, value, source)
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
    return converted


# ------------------------------------------------------------ unknown names
def _matching(name: str, candidates, fuzzy: bool = True) -> list[str]:
    """Candidates that look like ``name``: exact, known alias or initials (lr/learning_rate), then similar."""
    candidates = list(dict.fromkeys(candidates))
    found = [c for c in candidates if c == name or c == _ALIASES.get(name)
             or _initials(name) == c or _initials(c) == name]
    return found + [c for c in close_matches(name, candidates) if fuzzy and c not in found]


def _initials(name: str) -> str:
    parts = name.split("_")
    return "".join(p[0] for p in parts if p) if len(parts) > 1 else ""


def _did_you_mean(found: list[str]) -> str:
    quoted = [repr(c) for c in found[:3]]
    if not quoted:
        return ""
    if len(quoted) == 1:
        return f" Did you mean {quoted[0]}?"
    return f" Did you mean {', '.join(quoted[:-1])} or {quoted[-1]}?"


def _key_suggestion(section: str | None, key: str) -> str:
    """' Did you mean ...?' for a key: a strong match in its section, then one in another section
    (train.image_size -> data.image_size), then similar names in the section, then anywhere."""
    mine = list(_fields(section)) if section is not None else []
    others = [(s, k) for s in SECTIONS if s != section for k in _fields(s)]
    for fuzzy in (False, True):
        found = _matching(key, mine, fuzzy)
        if found:
            return _did_you_mean([f"{section}.{k}" for k in found])
        found = _matching(key, [k for _, k in others], fuzzy)
        if found:
            return _did_you_mean([f"{s}.{k}" for fk in found for s, k in others if k == fk])
    return ""


def _unknown_section(name: str, source: str) -> ConfigError:
    found = close_matches(name, SECTIONS)
    hint = f" Did you mean [{found[0]}]?" if found else ""
    valid = ", ".join(f"[{s}]" for s in SECTIONS)
    return ConfigError(f"{source}: unknown section [{name}].{hint} Valid sections: {valid}.")


def _unknown_key(section: str, key: str, source: str) -> ConfigError:
    hint = _key_suggestion(section, key)
    if not hint:
        hint = f" Valid keys in [{section}]: {', '.join(_fields(section))}."
    return ConfigError(f"{source}: unknown key '{section}.{key}'.{hint}")


# ------------------------------------------------------------------ loading
def config_from_dict(raw: dict, source: str = "<config>") -> Config:
    """Build a checked Config from a nested dict such as tomllib returns."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: a config must be a table of sections, got {type(raw).__name__}")
    sections = {}
    for name, table in raw.items():
        if name not in SECTIONS:
            if isinstance(table, dict):
                raise _unknown_section(name, source)
            raise ConfigError(f"{source}: '{name}' is not inside a section; every key belongs under a "
                              f"[section] header.{_key_suggestion(None, name)}")
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: '{name}' must be a table ([{name}] header), got {type(table).__name__}")
        known = _fields(name)
        values = {}
        for key, value in table.items():
            if key not in known:
                raise _unknown_key(name, key, source)
            values[key] = _validate(name, key, value, source)
        sections[name] = SECTIONS[name](**values)
    return Config(**sections)


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> Config:
    """Defaults (path None) or a TOML file, then ``section.key=value`` overrides."""
    if path is None:
        cfg = Config()
    else:
        path = Path(path)
        try:
            with open(path, "rb") as fh:
                raw = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except IsADirectoryError:
            raise ConfigError(f"config path is a directory, not a file: {path}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: invalid TOML: {e}") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not valid UTF-8 text: {e}") from None
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None
        cfg = config_from_dict(raw, str(path))
    return apply_overrides(cfg, overrides)


_BOOL_WORDS = {"true": True, "yes": True, "1": True, "on": True,
               "false": False, "no": False, "0": False, "off": False}


def _parse_override_value(text: str, tp):
    """An override's value: a TOML value when it parses as one, else the bare string."""
    try:
        parsed = tomllib.loads("v = " + text)
        value = parsed["v"] if list(parsed) == ["v"] else text.strip()
    except tomllib.TOMLDecodeError:
        value = text.strip()
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
    if not _matches(value, tp)[0] and _matches(text.strip(), tp)[0]:
        return text.strip()  # e.g. a date-like or numeric folder name for a string field
    return value


def apply_overrides(cfg: Config, overrides: Sequence[str]) -> Config:
    """A new Config with each ``section.key=value`` applied in order."""
    if isinstance(overrides, str):
        overrides = [overrides]
    for item in overrides:
        target, sep, text = item.partition("=")
        section, dot, key = target.strip().partition(".")
        if not sep or not dot or not section or not key:
            raise ConfigError(f"--set: malformed override {item!r}; expected section.key=value, "
                              f"e.g. train.lr=3e-4 or data.path=my/images")
        if section not in SECTIONS:
            raise _unknown_section(section, "--set")
        fields = _fields(section)
        if key not in fields:
            raise _unknown_key(section, key, "--set")
        value = _validate(section, key, _parse_override_value(text, fields[key][1]), "--set")
        new_section = dataclasses.replace(getattr(cfg, section), **{key: value})
        cfg = dataclasses.replace(cfg, **{section: new_section})
    return cfg


# ------------------------------------------------------------------ writing
def config_to_dict(cfg: Config) -> dict:
    """Plain nested dict of TOML-able values, sections in order."""
    return {s: dataclasses.asdict(getattr(cfg, s)) for s in SECTIONS}


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
        lines.append(f"[{section}]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in table.items()]
        lines.append("")
    return "\n".join(lines)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the config as TOML atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as fh:
            fh.write(dump_toml(cfg))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def describe_fields() -> list[tuple[str, str, str]]:
    """(section.key, default as TOML text, one-line doc) for every field, in order."""
    defaults = config_to_dict(Config())
    return [(f"{s}.{k}", _toml_value(defaults[s][k]), f.metadata["doc"])
            for s in SECTIONS for k, (f, _) in _fields(s).items()]


def resolve_device(name: str) -> str:
    """'auto' becomes cuda, else mps, else cpu (whatever this machine has); other names pass through."""
    if name != "auto":
        return name
    import torch

    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return "mps"
    return "cpu"
