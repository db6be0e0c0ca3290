"""Experiment matrix: train every combination of config overrides, then tabulate the results.

A matrix file (TOML)::

    base = "configs/tiny_test.toml"     # the config every run starts from
    out_dir = "runs/matrix"             # one run directory per combination under it
    nll_samples = 0                     # optional: importance samples for the NLL column (0 = off)

    [matrix]                            # every combination of these lists is one run
    "data.resize_filter" = ["nearest", "bilinear"]
    "train.lr" = [1e-3, 3e-4]

    [fixed]                             # optional overrides applied to every run
    "train.max_steps" = 200

Keys are ``section.key`` config names (quoted, or as TOML sub-tables). A relative ``base``
is looked up from the working directory, then beside the matrix file; ``out_dir``
defaults to ``runs/<matrix file name>``. Runs go one after another. A run whose latest
checkpoint reached ``train.max_steps`` is skipped, a shorter one resumes, and one whose
stored config differs (other than in max_steps, out_dir or device) is retrained with its old
files moved aside; the status column says which. Each run is then evaluated on ``data.val_path`` when set,
else on its training data (the evaluation is cached in ``<run>/matrix_evaluation.json``), and
``results.md`` and ``results.csv`` get one row per combination: the override values, the
final logged loss terms and the evaluation's MSE, PSNR, SSIM and active units.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import math
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from ..errors import ConfigError, DataError, FlexVAEError
from ..files import atomic_open, write_text
from ..metrics import METRICS_FILE, read_metrics
from .common import markdown_table, write_json

TOP_KEYS = ("base", "out_dir", "matrix", "fixed", "nll_samples")
METRIC_COLUMNS = ("eval_mse", "eval_psnr", "eval_ssim", "active_units", "eval_nll_bits_per_dim")


@dataclass
class Matrix:
    source: Path
    base: Path
    out_dir: Path
    axes: dict  # "section.key" -> list of values
    fixed: dict  # "section.key" -> value
    nll_samples: int = 0

    def combinations(self) -> list[dict]:
        keys = list(self.axes)
        return [dict(zip(keys, values)) for values in itertools.product(*(self.axes[k] for k in keys))]


def _dotted(table: dict, prefix: str = "") -> dict:
    """{"train": {"lr": [..]}} and {"train.lr": [..]} both become {"train.lr": [..]}."""
    out = {}
    for key, value in table.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_dotted(value, name + "."))
        else:
            out[name] = value
    return out


def load_matrix(path) -> Matrix:
    from ..assemble import resolve_path

    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"matrix file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    unknown = [k for k in raw if k not in TOP_KEYS]
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(unknown)}; a matrix file holds {', '.join(TOP_KEYS)}")
    if "base" not in raw or not isinstance(raw["base"], str):
        raise ConfigError(f'{path}: needs base = "path/to/config.toml"')
    base = resolve_path(raw["base"], path)
    if not base.is_file():
        raise ConfigError(f"{path}: base config not found: {raw['base']}")
    axes = _dotted(raw.get("matrix", {}))
    if not axes:
        raise ConfigError(f'{path}: [matrix] is empty; list values per key, e.g. "train.lr" = [1e-3, 3e-4]')
    for key, values in axes.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{path}: [matrix] {key} must be a non-empty list of values, got {values!r}")
    fixed = _dotted(raw.get("fixed", {}))
    matrix = Matrix(path, base, Path(raw.get("out_dir", f"runs/{path.stem}")), axes, fixed,
                    int(raw.get("nll_samples", 0)))
    for combo in matrix.combinations():  # every override must be a valid config value
        run_config(matrix, combo, matrix.out_dir / "check")
    return matrix


def _override(key: str, value) -> str:
    return f"{key}={json.dumps(value)}"


def run_config(matrix: Matrix, combo: dict, run_dir: Path, extra=()):
    from ..config import load_config

    overrides = [_override(k, v) for k, v in {**matrix.fixed, **combo}.items()]
    overrides += list(extra) + [_override("train.out_dir", run_dir.as_posix())]
    try:
        return load_config(matrix.base, overrides)
    except ConfigError as exc:
        raise ConfigError(f"{matrix.source}: {exc}") from None


def _value_text(value) -> str:
    text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", text).strip("-") or "x"


def run_names(matrix: Matrix) -> list[str]:
    """A folder name per combination, e.g. ``resize_filter-nearest_lr-0.001``."""
    keys = list(matrix.axes)
    short = {k: k.split(".")[-1] for k in keys}
    if len(set(short.values())) < len(keys):
        short = {k: k.replace(".", "-") for k in keys}
    names = []
    for combo in matrix.combinations():
        name = "_".join(f"{short[k]}-{_value_text(v)}" for k, v in combo.items())
        if len(name) > 96:
            name = name[:80] + "-" + hashlib.sha1(name.encode()).hexdigest()[:8]
        while name in names:
            name += "+"
        names.append(name)
    return names


IGNORED_CHANGES = {"train.max_steps", "train.out_dir", "train.device"}  # a changed value here keeps the run


def run_state(run_dir: Path, cfg) -> tuple[int | None, list[str]]:
    """(step of the run's latest checkpoint or None, the settings that differ from ``cfg``):
    a run whose stored config differs (other than in max_steps, out_dir or device) is retrained."""
    from ..checkpoint import list_checkpoints, load_checkpoint
    from ..config import config_from_dict, config_to_dict

    found = list_checkpoints(run_dir)
    if not found:
        return None, []
    ckpt = load_checkpoint(found[-1], with_train_state=False)
    try:
        stored = config_to_dict(config_from_dict(ckpt.metadata.get("config", {}), str(found[-1]), stored=True))
    except ConfigError:
        return ckpt.step, ["the stored config is unreadable"]
    now = config_to_dict(cfg)
    changed = [f"{section}.{key}" for section in now for key in sorted(set(now[section]) | set(stored.get(section, {})))
               if now[section].get(key) != stored.get(section, {}).get(key)
               and f"{section}.{key}" not in IGNORED_CHANGES]
    return ckpt.step, changed


def final_losses(run_dir: Path) -> dict:
    """The last logged loss terms of a run (metrics.csv), by column name."""
    try:
        columns = read_metrics(run_dir / METRICS_FILE)
    except DataError:
        return {}
    skip = {"step", "kl_weight", "lr", "grad_norm", "images_per_s"}
    return {f"final_{key}": values[-1] for key, values in columns.items()
            if key not in skip and not math.isnan(values[-1])}

def _data_name(cfg) -> str:
    return cfg.data.val_path or f"{cfg.data.path} ({cfg.data.source}, no val_path)"


def evaluate_run(run_dir: Path, cfg, device: str, nll_samples: int = 0) -> dict:
    """Evaluate the run's final checkpoint; cached in evaluation.json for that step."""
    from ..checkpoint import load_run
    from .common import image_dataset, image_loader
    from .evaluate import evaluate_model

    cache = run_dir / "matrix_evaluation.json"
    model = load_run(run_dir, device=device)
    if cache.is_file():
        stored = json.loads(cache.read_text())
        if stored.get("step") == model.step and stored.get("nll_samples") == nll_samples \
                and stored.get("data") == _data_name(cfg):
            return stored
    dataset = image_dataset(model, cfg=cfg)
    result = evaluate_model(model.vae, image_loader(dataset, cfg.encode.batch_size, device), nll_samples=nll_samples,
                            device=device, seed=cfg.train.seed)
    result.update(step=model.step, nll_samples=nll_samples, data=_data_name(cfg))
    write_json(result, cache)
    return result


def run_matrix(path, device: str | None = None, extra_overrides=(), quiet: bool = True, log=print,
               overwrite: bool = False) -> dict:
    """Train (or skip) every combination, evaluate each, write results.md and results.csv.

    ``quiet`` hides each run's own log (model summary, progress bar); ``log`` gets one line per run.
    A results.md or results.csv in ``out_dir`` that flexvae did not write is never replaced (checked
    before any training), unless ``overwrite``.
    """
    from ..outputs import writing_into
    from ..device import resolve_device
    from ..train.trainer import train

    matrix = load_matrix(path)
    names = run_names(matrix)
    combos = matrix.combinations()
    results = (matrix.out_dir / "results.csv", matrix.out_dir / "results.md")
    with writing_into(matrix.out_dir, overwrite, flag="out_dir in " + str(path)) as folder:
        folder.check(results)
    matrix.out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (name, combo) in enumerate(zip(names, combos), 1):
        run_dir = matrix.out_dir / name
        cfg = run_config(matrix, combo, run_dir, extra_overrides)
        dev = resolve_device(device or cfg.train.device)
        row = {"run": name, **combo}
        step, changed = run_state(run_dir, cfg)
        if step is not None and not changed and step >= cfg.train.max_steps:
            beyond = f" (beyond train.max_steps = {cfg.train.max_steps})" if step > cfg.train.max_steps else ""
            row["status"] = f"skipped: already at step {step}{beyond}"
            log(f"[{i}/{len(combos)}] {name}: {row['status']}")
        else:
            if changed:
                what = f"retrained: settings changed ({', '.join(changed[:4])})"
            else:
                what = f"resumed from step {step}" if step else "trained"
            log(f"[{i}/{len(combos)}] {name}: {what}; {cfg.train.max_steps} steps into {run_dir}")
            started = time.perf_counter()
            try:
                train(cfg, str(matrix.base), device=dev, quiet=quiet, fresh=bool(changed))
                row["status"] = what
                log(f"  done in {time.perf_counter() - started:.0f} s")
            except FlexVAEError as exc:
                row["status"] = f"failed: {exc}"
                log(f"  failed: {exc}")
        if not row["status"].startswith("failed"):
            row.update(final_losses(run_dir))
            try:
                ev = evaluate_run(run_dir, cfg, dev, matrix.nll_samples)
                rec = ev["reconstruction"]
                row.update(eval_mse=rec["mse"], eval_psnr=rec["psnr"], eval_ssim=rec["ssim"],
                           active_units=ev["active_units"]["elements"])
                if ev.get("nll") and "bits_per_dim" in ev["nll"]:
                    row["eval_nll_bits_per_dim"] = ev["nll"]["bits_per_dim"]
                row["eval_data"] = ev.get("data")
            except FlexVAEError as exc:
                row["status"] += f"; evaluation failed: {exc}"
        rows.append(row)
    with writing_into(matrix.out_dir, overwrite, flag="out_dir in " + str(path)):
        files = write_results(matrix, rows)
    return {"rows": rows, **files}


def _columns(matrix: Matrix, rows: list[dict]) -> list[str]:
    columns = ["run", *matrix.axes]
    finals = [k for r in rows for k in r if k.startswith("final_")]
    columns += list(dict.fromkeys(finals))
    columns += [c for c in METRIC_COLUMNS if any(c in r for r in rows)]
    if len({r.get("eval_data") for r in rows if r.get("eval_data")}) > 1:
        columns.append("eval_data")
    return columns + ["status"]


def write_results(matrix: Matrix, rows: list[dict]) -> dict:
    columns = _columns(matrix, rows)
    csv_path = matrix.out_dir / "results.csv"
    with atomic_open(csv_path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    values = [r.get("eval_mse") for r in rows if isinstance(r.get("eval_mse"), float)]
    lo, hi = (min(values), max(values)) if values else (0.0, 0.0)

    def meter(row):
        v = row.get("eval_mse")
        if not isinstance(v, float):
            return ""
        return "*" * (1 + round(19 * (v - lo) / (hi - lo))) if hi > lo else "*"

    header = columns[:-1] + ["MSE meter", "status"]
    table = markdown_table(header, [[r.get(c) for c in columns[:-1]] + [meter(r), r.get("status")] for r in rows])
    sets = list(dict.fromkeys(r["eval_data"] for r in rows if r.get("eval_data")))
    data = sets[0] if len(sets) == 1 else "each run's own data (column eval_data)" if sets else "-"
    md_path = matrix.out_dir / "results.md"
    write_text(md_path,
        f"# Experiment matrix {matrix.source.name}\n\n"
        f"Base config `{matrix.base.as_posix()}`; {len(rows)} runs under `{matrix.out_dir.as_posix()}`. "
        f"final_* = last logged training values; eval_* = evaluation of the final checkpoint on {data} "
        f"(MSE on images in [-1, 1]; active units: Cov_x(E_q[z_u]) > 0.01).\n\n{table}\n")
    return {"markdown": str(md_path), "csv": str(csv_path)}
