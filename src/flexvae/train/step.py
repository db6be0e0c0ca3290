"""One optimizer step: AdamW, the learning-rate schedule, accumulation, clipping, precision."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from functools import cached_property

import torch

from ..errors import TrainingError
from ..layers.dropout import global_batch_masks
from ..objective import Objective, TermInputs, image_of
from .distributed import DistInfo
from .global_batch import global_batch, needs_global_batch
from .runtime import Runtime, flip_mask, mask_key
from .schedule import lr_factor

__all__ = ["MicroBatch", "StepResult", "lr_factor", "make_optimizer", "random_flip", "train_step"]


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
class MicroBatch:
    """One micro-batch of a step: the images on the device, and what the step draws for them.

    ``labels``: class indices (-1 = unlabelled) when the data has labels; ``noise``: the
    latent's sampling noise (runtime.latent_noises); ``group_noise``: a hierarchical decoder's
    latent groups' noise by name (runtime.group_noises). Drawn for the global batch, so a step
    trains the same however it is split."""

    images: torch.Tensor
    labels: torch.Tensor | None = None
    noise: torch.Tensor | None = None
    group_noise: dict | None = None

    def inputs(self) -> dict:
        """The model's keyword arguments for this micro-batch."""
        found = {"noise": self.noise}
        if self.labels is not None:
            found["labels"] = self.labels
        if self.group_noise:
            found["group_noise"] = self.group_noise
        return found


@dataclass
class StepResult:
    """A step's loss (a float: checked for being finite), its logged terms, the KL weight and the
    gradient norm. The terms stay on the device until read: one transfer when they are logged."""

    loss: float
    raw_terms: dict
    kl_weight: float
    grad_norm: float
    extra: dict = field(default_factory=dict)  # floats already on the CPU (the discriminator's terms)

    @cached_property
    def terms(self) -> dict[str, float]:
        on_device = {k: v for k, v in self.raw_terms.items() if torch.is_tensor(v) and v.device.type != "cpu"}
        values = {}
        if on_device:  # one transfer for all of them
            stacked = torch.stack([v.detach().double().reshape(()) for v in on_device.values()]).tolist()
            values.update(zip(on_device, stacked))
        for name, value in self.raw_terms.items():
            if name not in values:
                values[name] = float(value.detach()) if torch.is_tensor(value) else float(value)
        return {**{name: values[name] for name in self.raw_terms}, **self.extra}


def _as_micro(batches) -> list[MicroBatch]:
    return [b if isinstance(b, MicroBatch) else MicroBatch(b) for b in batches]


def train_step(runtime: Runtime, batches, optimizer, cfg, step: int, objective: Objective | None = None,
               guard=None, stage=None, log: bool = True) -> StepResult:
    """One optimizer step over ``len(batches)`` micro-batches (gradient accumulation).

    ``batches``: MicroBatch objects (or image tensors alone). The forward pass runs under the
    runtime's autocast; the loss (``objective``; built from ``cfg`` when not given) is computed
    in float32 outside it. Dropout masks are drawn for the global batch (layers/dropout.py).
    With a discriminator, it takes its own step after the VAE's, on the same images.
    ``guard``: a guard.SpikeGuard that may leave the update out (the step still counts);
    ``stage``: the training stage (stages.py): which terms are on and which weights are frozen;
    ``log``: whether this step is logged (False: terms skip what they only log, such as bits/dim).
    A plain model stands for an fp32, single-process runtime.
    """
    if isinstance(runtime, torch.nn.Module):
        runtime = Runtime.plain(runtime)
    batches = _as_micro(batches)
    if objective is None:
        objective = Objective.from_config(cfg, tuple(batches[0].images.shape[1:]), device=batches[0].images.device)
    on = None if stage is None else stage.terms
    adversarial = objective.adversarial_active(step, on)
    optimizer.zero_grad(set_to_none=True)
    split = None  # a split step's whole-batch statistics (global_batch.py)
    if needs_global_batch(objective, cfg, len(batches), runtime.dist.world_size):
        split = global_batch(runtime, batches, objective, cfg, step)
    likelihood = getattr(runtime.model, "likelihood", None)
    scale = likelihood.using_global_scale(split and split.log_scale) if hasattr(likelihood, "using_global_scale") \
        else contextlib.nullcontext()
    with scale:
        loss_sum, totals, kl_weight = _micro_batches(runtime, batches, cfg, step, objective, on, split, log)
    loss_value = float(loss_sum)  # the step's one wait for the device: a non-finite loss stops here
    if not math.isfinite(loss_value):
        shown = StepResult(loss_value, totals, kl_weight, float("nan")).terms
        raise TrainingError(
            f"the loss became {loss_value} at step {step + 1} ({', '.join(f'{k}={v:.4g}' for k, v in shown.items())}). "
            "Lower train.lr, raise train.grad_clip or check the data"
        )
    if stage is not None:
        stage.drop_frozen_gradients()
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
    if adversarial and (stage is None or stage.trains_discriminator):
        extra = objective.discriminator_step(runtime.autocast, step)
    else:
        if adversarial:
            objective.term("Adv").pairs.clear()
        extra = dict.fromkeys(objective.discriminator_names()[2:], float("nan"))
    return StepResult(loss_value, totals, kl_weight, grad_norm, extra)


def _micro_batches(runtime, batches, cfg, step, objective, on, split, log=True):
    """Forward and backward of every micro-batch; (loss, logged terms, KL weight) of the step,
    the loss and terms as tensors on the device."""
    totals: dict = {}
    loss_sum, kl_weight = 0.0, 0.0
    model = runtime.model
    for index, micro in enumerate(batches):
        images = micro.images
        masks = global_batch_masks(mask_key(cfg.train.seed, step, index), runtime.dist.rank, runtime.dist.world_size)
        with runtime.no_sync(last_micro_batch=index == len(batches) - 1), masks:
            with runtime.autocast():
                out = runtime.step_model(images, step=step, **micro.inputs())
            inputs = TermInputs(images, out, image_of(out.recon, model, model.output), model, step,
                                labels=micro.labels, kl_means=split and split.kl_means, seed=cfg.train.seed,
                                micro=index, rank=runtime.dist.rank, world_size=runtime.dist.world_size,
                                autocast=runtime.autocast, log=log)
            losses = objective(inputs, on)
            loss = losses.total / len(batches)
            (runtime.scaler.scale(loss) if runtime.scaler is not None else loss).backward()
        loss_sum = loss_sum + losses.total.detach().double() / len(batches)
        for name, value in losses.terms.items():
            value = value.detach().float() if torch.is_tensor(value) else torch.tensor(float(value))
            totals[name] = totals.get(name, 0.0) + value / len(batches)
        kl_weight = losses.kl_weight
    return loss_sum, totals, kl_weight
