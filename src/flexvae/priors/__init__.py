"""Priors over the top latent: ``model.prior`` names a registered one ("Normal", the default:
N(0, I) with its closed-form KL; "MoG_components=10", "Vamp_components=50",
"Flow_layers=4_hidden=128"). See base.py for the Monte Carlo KL a learned prior takes."""

from __future__ import annotations

from ..dsl.grammar import parse_token
from ..errors import ConfigError
from .base import DEFAULT_PRIOR, PRIORS, Arg, Prior, PriorKL, register_prior
from . import flow, mixture, vamp  # noqa: F401  (registers the priors)

__all__ = ["Arg", "DEFAULT_PRIOR", "PRIORS", "Prior", "PriorKL", "build_prior", "register_prior"]

SOURCE = "model.prior"
PRIOR_LATENTS = ("gaussian",)


def build_prior(text: str, latent_shape, data_shape, latent_kind: str = "gaussian") -> Prior | None:
    """The prior module ``text`` declares, or None for the standard normal."""
    spec = parse_token(text, source=SOURCE, what="prior")
    if spec.repeat != 1 or spec.checkpoint is not None:
        raise spec.error("a prior takes no N* repeat or '@' mark")
    if spec.name == DEFAULT_PRIOR and not spec.args and not spec.kwargs:
        return None
    if spec.name == DEFAULT_PRIOR:
        raise spec.error("the Normal prior takes no arguments")
    kind = PRIORS.get(spec)
    if latent_kind not in PRIOR_LATENTS:
        raise ConfigError(f"{SOURCE} = {text!r} is a density over a Gaussian latent (its KL needs log q(z|x)); "
                          f"model.latent is {latent_kind!r}: use model.latent = 'gaussian', or the Normal prior")
    kwargs = kind.bind(spec, tuple(latent_shape), input_name="the latent")
    try:
        return kind.factory(**kwargs, latent_shape=tuple(latent_shape), data_shape=tuple(data_shape))
    except ValueError as exc:
        raise spec.error(str(exc)) from None


def check_prior_token(text: str) -> None:
    """Parse-time check of ``model.prior`` (name and arguments), before any model is built."""
    spec = parse_token(text, source=SOURCE, what="prior")
    if spec.name != DEFAULT_PRIOR:
        PRIORS.get(spec)


