"""Loss terms and schedules, for the two objectives of ``loss.objective``.

weighted (the original FlexVAE's formula, per-element means):

    total = alpha * recon + kld_weight(step) * KLD
            + [ssim] * beta * (1 - SSIM) + [sparse] * gamma * mean|posterior mean|

elbo (a likelihood with units): per image, NLL = -log p(x|z) in nats under
``loss.likelihood`` and KL = KL(q(z|x) || p(z)) in nats, summed over every element;

    total = (NLL + kld_weight(step) * KL) / D    (+ the ssim and sparse terms as above)

where D is the number of values per image, so kld_weight = 1 is the negative ELBO per
dimension (its gradient is the ELBO's divided by a constant) and kld_weight = beta is a
beta-VAE. Logged: nll and kld in nats per image, bpd = -ELBO in bits per dimension.

Both add ``perceptual_weight * LPIPS`` (mean per image) when it is on, and every auxiliary
loss of the latent (a class latent's classification term) and of quantizer tokens; the
posterior's diagnostics (per-part KL, temperature, label agreement) are logged beside them. Free bits: the KL that enters the loss is
sum_c max(free_bits, mean over the batch of KL_c) over latent channels c (the logged KL is
the true one). A learned balance (weighted objective) trains one log-weight s per term:
w * exp(-s) * term + s.

Each term is returned separately for logging. Images live in [-1, 1]; SSIM comes from
``metrics`` (on [0, 1] with ``data_range=1`` fixed by that range, never guessed from a batch).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import ConfigError
from .metrics import pick_ssim_kind, similarity_loss_value

BALANCED_TERMS = ("recon", "kld", "ssim", "sparse", "perceptual")
# The smallest image each LPIPS backbone's pooling stages leave at least one position of.
PERCEPTUAL_MIN_SIZE = {"vgg": 16, "alex": 31}
LOG_WEIGHT_LIMIT = 12.0  # |s| of a learned balance: exp(12) ~ 1.6e5


@dataclass
class LossOutput:
    total: torch.Tensor
    terms: dict  # name -> unweighted scalar tensor
    kld_weight: float


class LossBalance(nn.Module):
    """Learned log-weights s, one per term of the weighted objective (starting at 0)."""

    def __init__(self, names=BALANCED_TERMS):
        super().__init__()
        self.log_weights = nn.ParameterDict({name: nn.Parameter(torch.zeros(())) for name in names})

    def weigh(self, name: str, weight: float, value: torch.Tensor) -> torch.Tensor:
        s = self.log_weights[name].clamp(-LOG_WEIGHT_LIMIT, LOG_WEIGHT_LIMIT)
        return weight * torch.exp(-s) * value + s

    def metrics(self) -> dict:
        return {f"balance_{name}": float(torch.exp(-p.detach())) for name, p in self.log_weights.items()}


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


def kl_per_image(posterior, free_bits: float = 0.0, groups=None, kl_means=None) -> torch.Tensor:
    """The KL of a batch as it enters the loss, in nats per image (batch mean): the top latent's
    plus each decoder group's (``groups``: GroupPosteriors by name); with free bits, each sums
    over its channels max(free_bits, the channel's batch-mean KL). ``kl_means``: per part, the
    channels' KL means over the whole global batch when this batch is one micro-batch of it
    (train/global_batch.py): a channel is floored when the global mean is below free bits, so
    the micro-batches' terms average to the whole batch's."""
    parts = [posterior, *(groups or {}).values()]
    if free_bits <= 0:
        return sum(part.kl().float().mean() for part in parts)
    if kl_means is None:
        return sum(part.kl_groups().float().mean(0).clamp(min=free_bits).sum() for part in parts)
    return sum(torch.where(means.to(part.kl_groups().device) >= free_bits, part.kl_groups().float().mean(0),
                           torch.full_like(means, free_bits, dtype=torch.float32)).sum()
               for part, means in zip(parts, kl_means))


def kld_term(posterior, reduction: str, free_bits: float = 0.0, groups=None, kl_means=None) -> torch.Tensor:
    """'mean': mean over every latent element (the original FlexVAE; with decoder groups, their
    elements count too); 'sum': sum over each sample's latent elements, averaged over the batch
    (the ELBO's KL)."""
    if reduction == "mean":
        if free_bits <= 0 and not groups:
            return posterior.kl_elements().float().mean()
        elements = posterior.kl_elements()[0].numel() + sum(g.kl_elements()[0].numel() for g in (groups or {}).values())
        return kl_per_image(posterior, free_bits, groups, kl_means) / elements
    if reduction == "sum":
        return kl_per_image(posterior, free_bits, groups, kl_means)
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
    if cfg.balance == "learned" and cfg.objective != "weighted":
        raise ConfigError("loss.balance = 'learned' applies to the weighted objective; with loss.objective = "
                          "'elbo' the likelihood's learned scale (loss.scale = 'learned') balances the terms")
    if cfg.perceptual_weight > 0:
        if len(spatial) != 2 or data_shape[0] not in (1, 3):
            raise ConfigError(f"loss.perceptual_weight needs 2D grey or RGB images; this data has shape {tuple(data_shape)}")
        smallest = PERCEPTUAL_MIN_SIZE[cfg.perceptual_net]
        if min(spatial) < smallest:
            raise ConfigError(f"loss.perceptual_net = {cfg.perceptual_net!r} needs images of at least {smallest} px, "
                              f"got {spatial}" + ("; 'vgg' takes 16 px" if cfg.perceptual_net == "alex" else ""))


def vae_loss(x: torch.Tensor, out, cfg, step: int = 0, output: str = "value", model=None,
             perceptual=None, kl_means=None) -> LossOutput:
    """Total loss and its parts for a batch ``x`` and the model's ``VAEOutput``.

    ``model``: the VAE (its likelihood for the elbo objective, its balance when learned);
    ``perceptual``: an LPIPS module, when loss.perceptual_weight > 0; ``kl_means``: free bits'
    per-channel KL means of the whole global batch (see ``kl_per_image``)."""
    likelihood = getattr(model, "likelihood", None)
    balance = getattr(model, "balance", None)
    kld_weight = kld_weight_at(step, cfg)
    terms = {}

    def add(name, weight, value, total):
        terms[name] = value
        if balance is not None and name in balance.log_weights:
            return total + balance.weigh(name, weight, value)
        return total + weight * value

    if cfg.objective == "elbo":
        if likelihood is None:
            raise ValueError("the elbo objective needs the model's likelihood (pass model=)")
        dims = x[0].numel()
        nll = -likelihood.log_prob(out.recon, x)
        kl = out.kl()
        terms["nll"], terms["kld"] = nll.mean(), kl.mean()
        with torch.no_grad():  # of the mass of each value's 8-bit bin: never below 0
            terms["bpd"] = likelihood.bits_per_dim(-likelihood.log_mass(out.recon, x).float() + kl.float(), dims).mean()
        total = (terms["nll"] + kld_weight * kl_per_image(out.posterior, cfg.free_bits, out.groups, kl_means)) / dims
        image = likelihood.image(out.recon)
    else:
        total = add("recon", cfg.alpha, reconstruction_loss(out.recon, x, cfg.recon), 0.0)
        total = add("kld", kld_weight, kld_term(out.posterior, cfg.kld_reduction, cfg.free_bits, out.groups,
                                                kl_means), total)
        image = torch.sigmoid(out.recon.float()) * 2 - 1 if output == "logits" else out.recon
    if cfg.ssim:
        total = add("ssim", cfg.beta, 1 - similarity_loss_value(image, x, cfg.ssim_kind), total)
    if cfg.sparse:
        total = add("sparse", cfg.gamma, out.posterior.mean.float().abs().mean(), total)
    if perceptual is not None and cfg.perceptual_weight > 0:
        total = add("perceptual", cfg.perceptual_weight, perceptual(image.float(), x.float()).mean(), total)
    for name, value in out.aux.items():
        terms[name] = value.float()
        total = total + terms[name]
    terms.update(out.posterior.diagnostics())  # logged, not optimised (per-part KL, temperature ...)
    if out.groups:  # a hierarchy: each group's KL in nats per image, and the top latent's
        terms["kld_top"] = out.posterior.kl().float().mean().detach()
        terms.update({f"kld_{name}": group.kl().float().mean().detach() for name, group in out.groups.items()})
    return LossOutput(total, terms, kld_weight)
