"""From a config to a planned or built model: structure paths, plugins, the latent."""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import re
import sys
from pathlib import Path

from .objective import likelihoods
from .build import VAEPlan, as_specs, plan_vae
from .errors import ConfigError, StructureError
from .latents import LATENTS
from .presets import PRESETS


def resolve_path(value: str, config_path: str | Path | None) -> Path:
    """Where a relative path of a config points: beside the config file, else in the working
    directory, else among the shipped presets (``structures/small_encoder.json`` works from any
    folder once the package is installed). A path found nowhere is returned as written."""
    path = Path(value).expanduser()
    if path.is_absolute():
        return path
    candidates = ([Path(config_path).parent / path] if config_path is not None else []) + [path, PRESETS / path]
    return next((c for c in candidates if _exists(c)), path)


def _exists(path: Path) -> bool:
    """``path.exists()``, False for a name no file can have (too long, a NUL character)."""
    try:
        return path.exists()
    except (OSError, ValueError):
        return False


_MODULE_NAME = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


def load_plugins(plugins, config_path=None) -> None:
    """Import user modules that register extra tokens (``model.plugins``)."""
    for name in plugins:
        if name.endswith(".py"):
            path = resolve_path(name, config_path)
            if not path.is_file():
                raise ConfigError(f"model.plugins: file not found: {path}")
            module_name = f"flexvae_plugin_{path.stem}"
            if module_name in sys.modules:
                continue
            spec = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[module_name] = module
            try:
                spec.loader.exec_module(module)
            except (Exception, SystemExit) as exc:
                del sys.modules[module_name]
                raise ConfigError(f"model.plugins: importing {path} failed: {_plugin_failure(exc)}") from exc
        else:
            if not _MODULE_NAME.fullmatch(name):
                shown = name if len(name) <= 60 else name[:40] + "..."
                raise ConfigError(f"model.plugins: {shown!r} is neither a module name (such as my_layers or "
                                  "pkg.layers) nor a .py file")
            try:
                importlib.import_module(name)
            except ImportError as exc:
                raise ConfigError(f"model.plugins: cannot import module {name!r}: {exc}") from exc
            except (Exception, SystemExit) as exc:
                raise ConfigError(f"model.plugins: importing module {name!r} failed: {_plugin_failure(exc)}") from exc


def _plugin_failure(exc: BaseException) -> str:
    if isinstance(exc, SystemExit):
        return f"it called sys.exit({exc.code!r}) while being imported; a plugin module only registers tokens"
    return f"{type(exc).__name__}: {exc}"


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


def structure_specs(value, role: str, config_path=None, section: str = "model"):
    """``model.encoder``/``model.decoder`` (``section.role``): a JSON file path or an inline token list."""
    if isinstance(value, str):
        path = resolve_path(value, config_path)
        if not _is_file(path):
            where = "beside the config, in the working directory or among the shipped presets"
            shown = value if len(value) <= 80 else f"{value[:60]}... ({len(value):,} characters)"
            if len(value) >= 4096 or max(map(len, value.split("/"))) > 255 or "\0" in value:
                raise StructureError(f"{section}.{role}: {shown!r} is neither a structure file name nor a JSON "
                                     "list of tokens (write a path, or a list such as [\"C2d_?_16_3_1_1\", ...])")
            raise StructureError(f"{section}.{role}: structure file not found: {shown} (looked {where})")
        return as_specs(path)
    return as_specs(list(value), f"{section}.{role} in {config_path or 'the config'}")


def make_latent(cfg, classes=None):
    """The latent module that ``model.latent`` names, built from the config's [latent] parameters.
    ``classes``: the labels' class names, for a latent with a class part (``latent.classes``
    = 0 takes their count)."""
    latent_type = LATENTS.get(cfg.model.latent)
    params = cfg.latent if isinstance(cfg.latent, latent_type.params) else latent_type.params()
    if "classes" in latent_type.keys:
        params = _with_class_count(cfg, params, classes)
    try:
        return latent_type.build(params)
    except ValueError as exc:
        raise ConfigError(f"[latent] settings for model.latent = {cfg.model.latent!r}: {exc}") from None


def _with_class_count(cfg, params, classes):
    count = None if classes is None else len(classes)
    if params.classes == 0:
        if count is None and cfg.data.labels == "none":
            raise ConfigError("latent.classes = 0 takes the number of classes from the labels, but data.labels = "
                              "'none': set data.labels to 'folders' or a CSV file, or set latent.classes")
        if count is None:
            raise ConfigError("latent.classes = 0 takes the number of classes from the labels, which were not "
                              "read here: pass the class names (classes=...) or set latent.classes")
        return dataclasses.replace(params, classes=count)
    if count is not None and params.classes != count:
        names = ", ".join(classes[:12]) + (", ..." if count > 12 else "")
        raise ConfigError(f"latent.classes = {params.classes}, but the labels have {count} classes ({names}); "
                          f"set latent.classes = {count} or 0 (as many as the labels)")
    return params


def data_shape(cfg) -> tuple[int, ...]:
    return (cfg.data.channels, cfg.data.image_size, cfg.data.image_size)


def likelihood_from_config(cfg, channels: int):
    """The decoder likelihood (objective/likelihoods.py): loss.likelihood under the elbo objective;
    the weighted objective's criterion (mse, l1 or bce) otherwise, so a model always has one."""
    loss = cfg.loss
    if loss.objective != "elbo":
        from .objective.legacy import reconstruction_kind

        return likelihoods.LIKELIHOODS[reconstruction_kind(cfg)]()
    if loss.likelihood in likelihoods.LIKELIHOODS and not likelihoods.LIKELIHOODS[loss.likelihood].proper:
        raise ConfigError(f"loss.likelihood = {loss.likelihood!r} is a criterion of the weighted objective, not a "
                          "likelihood; with loss.objective = 'elbo' choose gaussian, laplace, bernoulli or "
                          f"logistic_mixture, or set loss.objective = 'weighted' and the Recon term's kind")
    if loss.likelihood not in likelihoods.LIKELIHOODS:
        from .utils import did_you_mean

        names = [name for name, kind in likelihoods.LIKELIHOODS.items() if kind.proper]
        raise ConfigError(f"loss.likelihood = {loss.likelihood!r} is not a likelihood.{did_you_mean(loss.likelihood, names)}"
                          f" Choose one of {', '.join(names)} (or register one in a model.plugins module)")
    return likelihoods.LIKELIHOODS[loss.likelihood].from_settings(channels, loss)


def plan_specs(encoder, decoder, shape, cfg, classes=None) -> VAEPlan:
    """Plan token lists for ``shape`` with the config's latent and the decoder output its likelihood
    needs; ``classes``: the labels' class names (context tokens and class latents use their count)."""
    likelihood = likelihood_from_config(cfg, shape[0])
    proper = likelihood is not None and likelihood.proper
    channels = likelihood.param_channels(shape[0]) if proper else None
    reason = "" if not proper else (
        f"loss.likelihood = {cfg.loss.likelihood!r}"
        + (f" with {cfg.loss.mixture_components} components" if cfg.loss.likelihood == "logistic_mixture" else ""))
    def plan_at(size_shape):
        return plan_vae(encoder, decoder, size_shape, make_latent(cfg, classes), output_channels=channels,
                        output_reason=reason, classes=None if classes is None else len(classes))

    try:
        plan = plan_at(shape)
    except StructureError as exc:
        if "must reproduce the input shape" in str(exc):
            _refuse_image_size(plan_at, shape, exc)
        raise
    plan.classes = None if classes is None else tuple(classes)
    return plan


def _refuse_image_size(plan_at, shape, error: StructureError) -> None:
    """When the structures reproduce some sizes but not ``shape``'s (a size the downsampling does
    not divide): one ConfigError on data.image_size saying which sizes they take."""
    size = shape[1]
    for multiple in (2, 4, 8, 16, 32, 64, 128):
        below, above = size - size % multiple, size - size % multiple + multiple
        if below < 1 or below == size:
            continue
        fits = []
        for candidate in (below, above):
            try:
                plan_at((shape[0], *[candidate] * (len(shape) - 1)))
                fits.append(candidate)
            except StructureError:
                pass
        if len(fits) == 2:
            raise ConfigError(f"data.image_size = {size} does not fit these structures: they take sizes that are "
                              f"multiples of {multiple}, such as {below} or {above}") from error


def plan_from_config(cfg, config_path=None, classes=None) -> VAEPlan:
    """The plan of ``cfg``'s model; with data.labels and no ``classes`` given, the classes are read
    from the data (``--check``, ``-mem``)."""
    if classes is None and cfg.data.labels != "none":
        classes = open_training_data(cfg, config_path).labels.classes
    load_plugins(cfg.model.plugins, config_path)
    encoder = structure_specs(cfg.model.encoder, "encoder", config_path)
    decoder = structure_specs(cfg.model.decoder, "decoder", config_path)
    return plan_specs(encoder, decoder, data_shape(cfg), cfg, classes)


def output_kind(cfg) -> str:
    if cfg.loss.objective == "elbo":
        kind = likelihoods.LIKELIHOODS.get(cfg.loss.likelihood)
        return "value" if kind is None else kind.output
    from .objective.legacy import reconstruction_kind

    return "logits" if reconstruction_kind(cfg) == "bce" else "value"


def build_model(plan: VAEPlan, cfg, device=None, scaling_factor: float | None = None):
    """A VAE from a plan and its config: output kind and likelihood come from ``cfg.loss``, the
    prior of the top latent from ``cfg.model.prior``."""
    from .objective.balance import LossBalance
    from .priors import build_prior

    factor = cfg.model.scaling_factor if scaling_factor is None else scaling_factor
    model = plan.build(device, scaling_factor=factor, output=output_kind(cfg),
                       likelihood=likelihood_from_config(cfg, plan.data_shape[0]))
    if cfg.loss.balance == "learned" and cfg.loss.objective == "weighted":
        model.balance = LossBalance().to(device or "cpu")
    prior = build_prior(cfg.model.prior, model.latent_shape, plan.data_shape, model.latent.kind)
    if prior is not None:
        model.prior = prior.to(device or "cpu")
    model.class_names = plan.classes
    return model


def objective_state(cfg, channels: int) -> dict:
    """Fresh state of the objective's parameters inside a VAE (``likelihood.*``, ``balance.*``):
    what a model built from ``cfg`` starts with, for weights that come from elsewhere."""
    from .objective.balance import LossBalance

    state = {}
    likelihood = likelihood_from_config(cfg, channels)
    if likelihood is not None:
        state.update({f"likelihood.{k}": v for k, v in likelihood.state_dict().items()})
    if cfg.loss.balance == "learned" and cfg.loss.objective == "weighted":
        state.update({f"balance.{k}": v for k, v in LossBalance().state_dict().items()})
    return state


def prior_state(cfg, latent_shape, data_shape, latent_kind: str = "gaussian") -> dict:
    """Fresh state of the learned prior ``cfg.model.prior`` declares (``prior.*``; empty for N(0, I))."""
    from .priors import build_prior

    prior = build_prior(cfg.model.prior, latent_shape, data_shape, latent_kind)
    return {} if prior is None else {f"prior.{k}": v for k, v in prior.state_dict().items()}


def model_from_config(cfg, config_path=None, device=None, classes=None, training_batch: int | None = None):
    """(model, plan) of ``cfg``; with ``training_batch``, refused in one line before anything is
    allocated when training at that batch size cannot fit on ``device`` (fits.py)."""
    plan = plan_from_config(cfg, config_path, classes)
    if training_batch is not None:
        from .fits import refuse_unless_fits

        refuse_unless_fits(plan, training_batch, device or "cpu", training=True,
                           element_bytes=2 if cfg.train.precision in ("bf16", "fp16") else 4,
                           hint="lower train.batch_size (-mem finds the largest that fits) or declare a smaller model")
    return build_model(plan, cfg, device), plan


def open_training_data(cfg, config_path=None, classes=None):
    """The training dataset of ``cfg.data`` with its labels attached (``data.labels``);
    ``classes``: a model's class names, which the labels must use."""
    from .data import open_dataset
    from .data.labels import read_labels

    data = cfg.data
    if data.labels != "none" and data.source != "folder":
        raise ConfigError(f"data.labels = {data.labels!r} reads the labels of an image folder, but "
                          f"data.source = {data.source!r}; use data.source = 'folder'")
    dataset = open_dataset(data.source, data.path, train=True, channels=data.channels, image_size=data.image_size,
                           resize_filter=data.resize_filter, pad_to_square=data.pad_to_square)
    if data.labels != "none":
        csv_path = None if data.labels == "folders" else resolve_path(data.labels, config_path)
        dataset.set_labels(read_labels(data.labels, dataset.relpaths, data.path, csv_path=csv_path,
                                       classes=classes, fraction=data.label_fraction, seed=cfg.train.seed))
    return dataset
