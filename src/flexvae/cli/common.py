"""What every mode handler needs from the parsed arguments: the config, the device, the run."""

from __future__ import annotations

from pathlib import Path

DEFAULT_CONFIG = "configs/config.toml"
DEFAULT_CONFIGS = (DEFAULT_CONFIG, "config.toml")  # a clone's default, then a project's (flexvae init)


def load_config(args):
    """(config, its path or None): ``-c``, else configs/config.toml or config.toml in the
    working directory when present, else the built-in defaults; ``--set`` overrides applied. Relative data folders and plugin files are taken
    beside the config file when they are there (then from the working directory), like
    structure files."""
    import dataclasses

    from ..assemble import resolve_path
    from ..config import load_config as load

    path = config_path(args)
    cfg = load(path, args.set)
    if path is not None:
        if cfg.data.source == "folder":
            data = {key: str(resolve_path(value, path)) for key in ("path", "val_path")
                    if (value := getattr(cfg.data, key))}
            cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, **data))
    return cfg, path


def config_path(args):
    """The config file a command reads: ``-c``, else the first of DEFAULT_CONFIGS present, else None."""
    if args.config is not None:
        return args.config
    return next((name for name in DEFAULT_CONFIGS if Path(name).is_file()), None)


def device(args, cfg) -> str:
    from ..device import resolve_device

    return resolve_device(args.device or cfg.train.device)


def run_dir(args, cfg) -> Path:
    """The run directory the mode works in: that of ``--ckpt``, else ``train.out_dir``."""
    from ..checkpoint import run_directory

    return run_directory(args.ckpt) if args.ckpt else Path(cfg.train.out_dir)


def load_run(args, cfg, device: str):
    """The model of ``--ckpt`` (a file or a run directory), else of ``train.out_dir``."""
    from ..assemble import resolve_path
    from ..checkpoint import load_run as load
    from ..errors import DataError

    # plugin files named beside the config resolve as in -t; checkpoints record them by name
    path = config_path(args)
    plugins = [str(resolve_path(p, path)) if p.endswith(".py") and path else p for p in cfg.model.plugins]
    model = load(args.ckpt or cfg.train.out_dir, device=device, prefer_ema=not args.no_ema, plugins=plugins)
    spec = getattr(args, "labels", None) or "auto"
    if spec not in ("auto", "none", "folders") and not spec.lower().endswith(".csv"):
        raise DataError(f"--labels must be auto, none, folders or a .csv file, got {spec!r}")
    model.label_spec = spec
    if getattr(args, "labels", None) and not model.vae.takes_labels:
        import sys

        print(f"note: --labels {spec} is ignored: this model takes no labels (no context token, no class latent)",
              file=sys.stderr)
    print(f"model: {model.path} (step {model.step})"
          + (f"; conditional on {len(model.vae.class_names)} classes" if model.vae.takes_labels else ""))
    choose_prior(args, model)
    return model


def choose_prior(args, model) -> None:
    """``--prior``: auto (the run's fitted prior when it has one, else the model's own), fitted
    (an error when there is none) or model (the fitted one set aside for this command)."""
    from ..errors import DataError

    prior = getattr(args, "prior", None) or "auto"
    if prior == "fitted" and model.vae.fitted_prior is None:
        raise DataError(f"--prior fitted: {model.path} has no fitted prior; fit one first: fit-prior --ckpt {model.path}"
                        + (f" ({model.prior_note})" if model.prior_note else ""))
    if prior == "model":
        model.vae.fitted_prior = None


def output_dir(args, run: Path, name: str, writes=()) -> Path:
    """The mode's output folder (``--output``, else ``<run>/<name>``), opened for the rest of the
    command so that only flexvae's own files in it are replaced (outputs.py). ``writes``: the
    file names the mode may write there, checked before any work is done."""
    out = Path(args.output) if args.output else run / name
    claim_output(args, out).check([out / file for file in writes])
    out.mkdir(parents=True, exist_ok=True)
    return out


def claim_output(args, folder):
    """Open ``folder`` as an output folder until the command ends (``--overwrite``: foreign files
    may be replaced); the OutputFolder."""
    from ..outputs import writing_into

    return args.outputs.enter_context(writing_into(folder, replace=getattr(args, "overwrite", False)))


def count_option(args, name: str, minimum: int, default, what: str):
    """An integer option's value (``default`` when not given), or one DataError line when it is
    below ``minimum``; ``what`` says what the count is for."""
    from ..errors import DataError

    value = getattr(args, name)
    if value is None:
        return default
    if value < minimum:
        flag = "--" + name.replace("_", "-")
        raise DataError(f"{flag} must be at least {minimum} for {what}, got {value}")
    return value
