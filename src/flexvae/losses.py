"""Loss terms and schedules.

    total = alpha * recon + kld_weight(step) * KLD
            + [ssim] * beta * (1 - SSIM) + [sparse] * gamma * mean|posterior mean|
            + every auxiliary loss of the latent and of quantizer tokens

Each term is returned separately for logging. Images live in [-1, 1]; SSIM comes from
``metrics`` (on [0, 1] with ``data_range=1`` fixed by that range, never guessed from a batch).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import ConfigError
from .metrics import pick_ssim_kind, similarity_loss_value


@dataclass
class LossOutput:
    total: torch.Tensor
    terms: dict  # name -> unweighted scalar tensor
    kld_weight: float


def kld_weight_at(step: int, cfg) -> float:
    """KL weight after ``step`` optimizer steps: constant, linear warm-up, or cyclical.

    linear: kld_weight * min(1, step / kld_warmup_steps).
    cyclical: within each period of kld_cycle_steps, ramp linearly from 0 to kld_weight
    over the first kld_cycle_ratio of it, then hold.
    """
    weight = cfg.kld_weight
    if cfg.kld_schedule == "linear" and cfg.kld_warmup_steps > 0:
        return weight * min(1.0, step / cfg.kld_warmup_steps)
    if cfg.kld_schedule == "cyclical":
        phase = (step % cfg.kld_cycle_steps) / cfg.kld_cycle_steps
        return weight * min(1.0, phase / cfg.kld_cycle_ratio)
    return weight


def reconstruction_loss(recon: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-element mean. bce treats ``recon`` as logits of pixel values in [0, 1]."""
    if kind == "mse":
        return F.mse_loss(recon.float(), target.float())
    if kind == "l1":
        return F.l1_loss(recon.float(), target.float())
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(recon.float(), (target.float() + 1) / 2)
    raise ValueError(f"unknown reconstruction loss {kind!r}")


def kld_term(posterior, reduction: str) -> torch.Tensor:
    """'mean': mean over every latent element (the original FlexVAE);
    'sum': sum over each sample's latent elements, averaged over the batch (the ELBO's KL)."""
    if reduction == "mean":
        return posterior.kl_elements().float().mean()
    if reduction == "sum":
        return posterior.kl().float().mean()
    raise ValueError(f"unknown KL reduction {reduction!r}")


def check_loss_config(cfg, data_shape: tuple[int, ...]) -> None:
    """Fail before training for loss settings the data cannot support."""
    spatial = tuple(data_shape[1:])
    if cfg.ssim:
        if len(spatial) not in (2, 3):
            raise ConfigError(f"loss.ssim needs 2D or 3D data; this data has shape {tuple(data_shape)}")
        if min(spatial) < 3:
            raise ConfigError(f"loss.ssim needs images at least 3 px on every side, got {spatial}")
        pick_ssim_kind(cfg.ssim_kind, spatial)


def vae_loss(x: torch.Tensor, out, cfg, step: int = 0, output: str = "value") -> LossOutput:
    """Total loss and its parts for a batch ``x`` and the model's ``VAEOutput``."""
    terms = {"recon": reconstruction_loss(out.recon, x, cfg.recon)}
    kld_weight = kld_weight_at(step, cfg)
    terms["kld"] = kld_term(out.posterior, cfg.kld_reduction)
    total = cfg.alpha * terms["recon"] + kld_weight * terms["kld"]
    if cfg.ssim:
        image = torch.sigmoid(out.recon.float()) * 2 - 1 if output == "logits" else out.recon
        terms["ssim"] = 1 - similarity_loss_value(image, x, cfg.ssim_kind)
        total = total + cfg.beta * terms["ssim"]
    if cfg.sparse:
        terms["sparse"] = out.posterior.mean.float().abs().mean()
        total = total + cfg.gamma * terms["sparse"]
    for name, value in out.aux.items():
        terms[name] = value.float()
        total = total + terms[name]
    return LossOutput(total, terms, kld_weight)
