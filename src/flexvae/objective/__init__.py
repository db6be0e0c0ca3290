"""The objective: likelihoods, loss terms and their schedules, each registered beside its class,
and the one module (``Objective``) that turns a model output into a loss.

    likelihoods.py     p(x|z): gaussian, laplace, bernoulli, logistic_mixture (@register_likelihood)
    term.py            the Term base class, TermInputs, @register_term
    schedule.py        a term's weight over the run (weight, start, stop, warmup, cycle)
    reconstruction.py  NLL (the likelihood's), Recon (mse, l1, bce)
    kl.py              KL, with free bits
    similarity.py      SSIM          sparsity.py   Sparse        perceptual.py  LPIPS
    adversarial.py     Adv and its discriminator
    equivariance.py    Equiv (EQ-VAE)  contrast.py  Contrast and Align (two views; AE-LEGO)
    objective.py       Objective: the terms of a run, the loss and its logged parts
    legacy.py          the [loss] and [adversarial] keys as term tokens
"""

from __future__ import annotations

from . import adversarial, contrast, equivariance, kl, perceptual, reconstruction, similarity, sparsity  # noqa: F401
from .balance import BALANCED_TERMS, LossBalance
from .kl import kl_per_image, kl_term
from .legacy import kl_weight_at
from .likelihoods import LIKELIHOODS, Likelihood, make_likelihood, register_likelihood
from .objective import Objective, ObjectiveOutput
from .reconstruction import reconstruction_loss
from .schedule import Schedule
from .term import TERMS, Arg, Term, TermInputs, register_term

__all__ = ["Arg", "BALANCED_TERMS", "LIKELIHOODS", "Likelihood", "LossBalance", "Objective", "ObjectiveOutput",
           "Schedule", "TERMS", "Term", "TermInputs", "check_loss_config", "image_of", "kl_per_image", "kl_term", "kl_weight_at",
           "make_likelihood", "reconstruction_loss", "register_likelihood", "register_term", "vae_loss"]


def image_of(recon, model=None, output: str = "value"):
    """The decoder output as differentiable image values: the likelihood's mean, the sigmoid of
    logits, or the output itself."""
    likelihood = getattr(model, "likelihood", None)
    if likelihood is not None:
        return likelihood.image(recon)
    import torch

    return torch.sigmoid(recon.float()) * 2 - 1 if output == "logits" else recon


def check_loss_config(cfg, data_shape) -> None:
    """Fail before training for loss settings the data cannot support. ``cfg``: a whole Config,
    or its [loss] section alone."""
    from ..config.schema import Config
    from ..errors import ConfigError

    if not hasattr(cfg, "loss"):
        cfg = Config(loss=cfg)
    if cfg.loss.balance == "learned" and cfg.loss.objective != "weighted":
        raise ConfigError("loss.balance = 'learned' applies to the weighted objective; with loss.objective = "
                          "'elbo' the likelihood's learned scale (loss.scale = 'learned') balances the terms")
    from .legacy import check_term_keys

    check_term_keys(cfg)
    Objective.from_config(cfg, data_shape, setup=False)


def vae_loss(x, out, loss_cfg, step: int = 0, output: str = "value", model=None, perceptual=None, kl_means=None):
    """The loss of the terms the [loss] settings ``loss_cfg`` declare, for one batch (no
    discriminator): a shortcut to ``Objective`` for scripts and tests."""
    import dataclasses

    from ..config.schema import Config

    cfg = Config(loss=loss_cfg)
    if perceptual is None and loss_cfg.perceptual_weight > 0:
        cfg = dataclasses.replace(cfg, loss=dataclasses.replace(loss_cfg, perceptual_weight=0.0))
    objective = Objective.from_config(cfg, tuple(x.shape[1:]), setup=False)
    lpips = objective.term("LPIPS")
    if lpips is not None:
        lpips.__dict__["distance"] = perceptual
    if loss_cfg.objective == "elbo" and not getattr(getattr(model, "likelihood", None), "proper", False):
        raise ValueError("the elbo objective needs the model's likelihood (pass model=)")
    batch = TermInputs(x, out, image_of(out.recon, model, output), model, step, kl_means=kl_means)
    return objective(batch)
