"""One optimizer step: AdamW, the learning-rate schedule, accumulation, clipping, precision."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

from ..errors import TrainingError
from ..losses import vae_loss
from .adversarial import TrainingExtras, last_layer_weight
from .schedule import lr_factor

__all__ = ["StepResult", "lr_factor", "make_optimizer", "random_flip", "train_step"]
from .distributed import DistInfo
from .global_batch import global_batch, needs_global_batch
from ..layers.dropout import global_batch_masks
from .runtime import Runtime, flip_mask, mask_key


def make_optimizer(model: torch.nn.Module, cfg) -> torch.optim.Optimizer:
    """AdamW; weight decay on weight matrices and kernels only, not on biases and norms."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas))


def random_flip(images: torch.Tensor, seed: int, step: int, micro: int = 0, dist: DistInfo = DistInfo()) -> torch.Tensor:
    """Horizontal flip of about half the batch, decided by (seed, step, micro-batch) so a
    resumed run, or the same batch split across processes, sees the same flips."""
    flip = flip_mask(images.shape[0], seed, step, micro, dist)
    flip = flip.view(-1, *([1] * (images.dim() - 1))).to(images.device)
    return torch.where(flip, images.flip(-1), images)


@dataclass
class StepResult:
    loss: float
    terms: dict
    kld_weight: float
    grad_norm: float


def train_step(runtime: Runtime, batches, optimizer, cfg, step: int, noises=None,
               extras: TrainingExtras | None = None, labels=None, group_noises=None, guard=None) -> StepResult:
    """One optimizer step over ``len(batches)`` micro-batches (gradient accumulation).

    The forward pass runs under the runtime's autocast; the loss is computed in float32
    outside it. ``noises``: per micro-batch sampling noise of the latent (see
    runtime.sample_noise); dropout masks are drawn for the global batch too (layers/dropout.py).
    ``extras``: the perceptual and adversarial terms (train/adversarial.py); with a
    discriminator, it takes its own step after the VAE's, on the same images. ``labels``: per
    micro-batch class labels (-1 = unlabelled), when the data has them; ``group_noises``: per
    micro-batch noise of a hierarchical decoder's latent groups, by name; ``guard``: a
    guard.SpikeGuard that may leave the update out (the step still counts).
    A plain model stands for an fp32, single-process runtime.
    """
    if isinstance(runtime, torch.nn.Module):
        runtime = Runtime.plain(runtime)
    extras = extras or TrainingExtras()
    adversary = extras.adversary if extras.adversary is not None and extras.adversary.active(step) else None
    optimizer.zero_grad(set_to_none=True)
    output_kind = runtime.model.output
    pairs = []
    split = None  # a split step's whole-batch statistics (global_batch.py)
    if needs_global_batch(cfg, len(batches), runtime.dist.world_size):
        split = global_batch(runtime, batches, cfg, step, noises, labels, group_noises)
    likelihood = getattr(runtime.model, "likelihood", None)
    scale = likelihood.using_global_scale(split and split.log_scale) if hasattr(likelihood, "using_global_scale") \
        else contextlib.nullcontext()
    with scale:
        loss_sum, totals, kld_weight = _micro_batches(runtime, batches, cfg, step, noises, labels, group_noises,
                                                      extras, adversary, output_kind, pairs, split)
    if not math.isfinite(loss_sum):
        raise TrainingError(
            f"the loss became {loss_sum} at step {step + 1} ({', '.join(f'{k}={v:.4g}' for k, v in totals.items())}). "
            "Lower train.lr, raise train.grad_clip or check the data"
        )
    if runtime.scaler is not None:
        runtime.scaler.unscale_(optimizer)
    grad_norm = float("nan")
    if cfg.train.grad_clip > 0 or guard is not None:
        limit = cfg.train.grad_clip if cfg.train.grad_clip > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(runtime.model.parameters(), limit))
    # fp16 overflows are the gradient scaler's to skip; the guard judges every other update
    overflowed = runtime.scaler is not None and not math.isfinite(grad_norm)
    skipped = guard is not None and not overflowed and guard.skip(grad_norm)
    if runtime.scaler is not None:
        if not skipped:
            runtime.scaler.step(optimizer)  # skipped when fp16 gradients overflowed
        runtime.scaler.update()
    elif not skipped:
        optimizer.step()
    if adversary is not None:
        totals.update(adversary.discriminator_step(pairs, runtime.autocast, step))
    elif extras.adversary is not None:  # before adversarial.start: the columns exist, empty
        totals.update(dict.fromkeys(extras.adversary.term_names, float("nan")))
    return StepResult(loss_sum, totals, kld_weight, grad_norm)


def _micro_batches(runtime, batches, cfg, step, noises, labels, group_noises, extras, adversary, output_kind,
                   pairs, split):
    """Forward and backward of every micro-batch; (loss, logged terms, KL weight) of the step."""
    totals: dict[str, float] = {}
    loss_sum, kld_weight = 0.0, 0.0
    for index, images in enumerate(batches):
        noise = noises[index] if noises else None
        masks = global_batch_masks(mask_key(cfg.train.seed, step, index), runtime.dist.rank, runtime.dist.world_size)
        with runtime.no_sync(last_micro_batch=index == len(batches) - 1), masks:
            with runtime.autocast():
                inputs = {"labels": labels[index]} if labels else {}
                if group_noises:
                    inputs["group_noise"] = group_noises[index]
                out = runtime.step_model(images, step=step, noise=noise, **inputs)
            losses = vae_loss(images, out, cfg.loss, step, output=output_kind, model=runtime.model,
                              perceptual=extras.perceptual, kl_means=split and split.kl_means)
            if adversary is not None:
                fake = runtime.model.loss_image(out.recon)
                with runtime.autocast():
                    g_adv = adversary.generator_term(fake)
                weight = adversary.adaptive_weight(losses.total, g_adv, last_layer_weight(runtime.model.decoder))
                losses.total = losses.total + cfg.adversarial.weight * weight * g_adv
                losses.terms.update(g_adv=g_adv.detach(), adaptive_weight=weight)
                pairs.append((images, fake.detach()))
            loss = losses.total / len(batches)
            (runtime.scaler.scale(loss) if runtime.scaler is not None else loss).backward()
        loss_sum += losses.total.item() / len(batches)
        for name, value in losses.terms.items():
            totals[name] = totals.get(name, 0.0) + value.item() / len(batches)
        kld_weight = losses.kld_weight
    return loss_sum, totals, kld_weight
