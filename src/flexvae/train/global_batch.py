"""Statistics of the whole global batch that a loss needs before any micro-batch's backward.

Two terms depend on the batch as a whole, not image by image: free bits floor each latent
channel's KL averaged over the batch, and the optimal scale of a Gaussian or Laplace decoder
is the batch's maximum-likelihood one (sqrt of its mean squared error, or its mean absolute
error). A step split into micro-batches (``train.grad_accum``) or across processes would
otherwise compute them on each part, and train something else than one batch of the same
images. When a step is split and one of these terms is on, a first pass without gradient runs
every micro-batch with the step's own noise and dropout masks, sums what the terms need, and
adds the sums over processes; the loss of each micro-batch then uses the global values (see
``losses.kl_per_image`` and ``likelihoods._ScaledLikelihood``). The pass leaves no trace:
buffers (normalisation statistics, codebooks, running scales) and the RNG are restored.
An unsplit step takes neither the pass nor any other path than before.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..layers.dropout import global_batch_masks
from ..objective.likelihoods import LOG_SCALE_MIN
from .distributed import sum_across
from .runtime import mask_key


@dataclass
class GlobalBatch:
    kl_means: list[torch.Tensor] | None  # per latent part (the top latent, then each group): mean KL per channel
    log_scale: torch.Tensor | None  # the optimal log scale of the whole batch


def optimal_scale(cfg) -> str | None:
    """'gaussian' or 'laplace' when the decoder's scale is the batch's optimum, else None."""
    loss = cfg.loss
    if loss.objective == "elbo" and loss.likelihood in ("gaussian", "laplace") and loss.scale == "optimal":
        return loss.likelihood
    return None


def free_bits(objective) -> float:
    """The KL term's free bits (0 without a KL term)."""
    term = objective.term("KL")
    return 0.0 if term is None else term.free_bits


def needs_global_batch(objective, cfg, micro_batches: int, world_size: int) -> bool:
    return (micro_batches > 1 or world_size > 1) and (free_bits(objective) > 0 or optimal_scale(cfg) is not None)


@torch.no_grad()
def global_batch(runtime, batches, objective, cfg, step: int) -> GlobalBatch:
    """The global batch's per-channel KL means and optimal log scale (see the module's doc);
    ``batches``: the step's MicroBatch objects."""
    model = runtime.model
    floor = free_bits(objective)
    buffers = {name: value.clone() for name, value in model.named_buffers()}
    rng = torch.get_rng_state()
    kl_sums, error_sum, values, images_seen = None, 0.0, 0, 0
    kind = optimal_scale(cfg)
    try:
        for index, micro in enumerate(batches):
            images = micro.images
            masks = global_batch_masks(mask_key(cfg.train.seed, step, index), runtime.dist.rank,
                                       runtime.dist.world_size)
            with masks, runtime.autocast():
                out = model(images, step=step, **micro.inputs())
            if floor > 0:
                parts = [out.posterior, *(out.groups or {}).values()]
                sums = [part.kl_groups().double().sum(0) for part in parts]
                kl_sums = sums if kl_sums is None else [a + b for a, b in zip(kl_sums, sums)]
            if kind is not None:
                error = images.double() - out.recon.double()
                error_sum += float(error.pow(2).sum() if kind == "gaussian" else error.abs().sum())
                values += error.numel()
            images_seen += images.shape[0]
    finally:
        for name, value in model.named_buffers():
            value.copy_(buffers[name])
        torch.set_rng_state(rng)
    sizes = [len(s) for s in kl_sums] if kl_sums is not None else []
    flat = [images_seen, error_sum, values] + [v for s in (kl_sums or []) for v in s.tolist()]
    merged = sum_across(runtime.dist, flat, runtime.device)
    images_seen, error_sum, values, rest = merged[0], merged[1], merged[2], merged[3:]
    kl_means = None
    if kl_sums is not None:
        kl_means, start = [], 0
        for size in sizes:
            kl_means.append(torch.tensor(rest[start:start + size], device=runtime.device) / images_seen)
            start += size
    log_scale = None
    if kind is not None:
        mean_error = max(error_sum / values, 1e-12)
        value = 0.5 * math.log(mean_error) if kind == "gaussian" else math.log(mean_error)
        log_scale = torch.tensor([max(value, LOG_SCALE_MIN)], device=runtime.device)
    return GlobalBatch(kl_means, log_scale)
