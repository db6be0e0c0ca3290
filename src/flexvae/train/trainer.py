"""The training loop: AdamW, warm-up + cosine, accumulation, clipping, EMA, resume.

A run directory holds ``config.toml`` (the resolved config), ``metrics.csv``,
``samples/step_XXXXXXXX.png`` and ``checkpoints/step_XXXXXXXX.safetensors``.
Running again on a directory with a checkpoint resumes it.
"""

from __future__ import annotations

import csv
import math
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import resolve_device, save_config
from ..data import SkipLog, first_images, make_loader, open_dataset, save_grid
from ..errors import FlexVAEError
from ..loading import checkpoint_metadata, model_from_config
from ..losses import check_loss_config, psnr, reconstruction_loss, vae_loss
from .checkpoint import (capture_rng_state, checkpoint_name, list_checkpoints, load_checkpoint,
                         prune_checkpoints, restore_rng_state, save_checkpoint)
from .distributed import DistInfo, barrier, cleanup, from_environment, mean_across, setup
from .runtime import Runtime, flip_mask, prepare, sample_noise
from .sampler import StreamSampler

SAMPLE_IMAGES = 8


class TrainingError(FlexVAEError):
    """Training cannot go on (non-finite loss, incompatible resume)."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def lr_factor(step: int, cfg) -> float:
    """Multiplier of train.lr at ``step``: linear warm-up, then cosine down to min_lr_ratio."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, cfg) -> torch.optim.Optimizer:
    """AdamW; weight decay on weight matrices and kernels only, not on biases and norms."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas))


class EMA:
    """Exponential moving average of the weights, updated after every optimizer step."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for key, value in model.state_dict().items():
            if value.dtype.is_floating_point:
                self.state[key].lerp_(value, 1 - self.decay)
            else:
                self.state[key].copy_(value)


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


def train_step(runtime: Runtime, batches, optimizer, cfg, step: int, noises=None) -> StepResult:
    """One optimizer step over ``len(batches)`` micro-batches (gradient accumulation).

    The forward pass runs under the runtime's autocast; the loss is computed in float32
    outside it. ``noises``: per micro-batch Gaussian sampling noise (see runtime.sample_noise).
    A plain model stands for an fp32, single-process runtime.
    """
    if isinstance(runtime, torch.nn.Module):
        runtime = Runtime.plain(runtime)
    optimizer.zero_grad(set_to_none=True)
    totals: dict[str, float] = {}
    loss_sum, kld_weight = 0.0, 0.0
    output_kind = runtime.model.output
    for index, images in enumerate(batches):
        noise = noises[index] if noises else None
        with runtime.no_sync(last_micro_batch=index == len(batches) - 1):
            with runtime.autocast():
                out = runtime.step_model(images, step=step, noise=noise)
            losses = vae_loss(images, out, cfg.loss, step, output=output_kind)
            loss = losses.total / len(batches)
            (runtime.scaler.scale(loss) if runtime.scaler is not None else loss).backward()
        loss_sum += losses.total.item() / len(batches)
        for name, value in losses.terms.items():
            totals[name] = totals.get(name, 0.0) + value.item() / len(batches)
        kld_weight = losses.kld_weight
    if not math.isfinite(loss_sum):
        raise TrainingError(
            f"the loss became {loss_sum} at step {step + 1} ({', '.join(f'{k}={v:.4g}' for k, v in totals.items())}). "
            "Lower train.lr, raise train.grad_clip or check the data; the last good checkpoint is kept"
        )
    if runtime.scaler is not None:
        runtime.scaler.unscale_(optimizer)
    grad_norm = float("nan")
    if cfg.train.grad_clip > 0:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(runtime.model.parameters(), cfg.train.grad_clip))
    if runtime.scaler is not None:
        runtime.scaler.step(optimizer)  # skipped when fp16 gradients overflowed
        runtime.scaler.update()
    else:
        optimizer.step()
    return StepResult(loss_sum, totals, kld_weight, grad_norm)


class MetricsLog:
    """Append-only CSV (the columns are fixed by the first row) and TensorBoard when installed."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / "metrics.csv"
        self.columns = None
        if self.path.exists():
            with open(self.path, newline="") as fh:
                self.columns = next(csv.reader(fh), None)
        self.board = None
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.board = SummaryWriter(str(run_dir / "tensorboard"))
        except Exception:  # tensorboard is optional
            pass

    def write(self, row: dict) -> None:
        if self.columns is None:
            self.columns = list(row)
            with open(self.path, "w", newline="") as fh:
                csv.writer(fh).writerow(self.columns)
        with open(self.path, "a", newline="") as fh:
            csv.writer(fh).writerow([_fmt(row.get(c, "")) for c in self.columns])
        if self.board is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.board.add_scalar(key, value, row["step"])

    def close(self) -> None:
        if self.board is not None:
            self.board.close()


def _fmt(value):
    return f"{value:.6g}" if isinstance(value, float) else value


class _Reconstruction(torch.nn.Module):
    """The model seen as image -> reconstruction, the form torchinfo can trace."""

    def __init__(self, vae):
        super().__init__()
        self.encoder, self.decoder = vae.encoder, vae.decoder
        # Not a registered submodule: torchinfo cannot hook a module returning a posterior.
        self._latent = [vae.latent]

    def forward(self, x):
        return self.decoder(self._latent[0](self.encoder(x)).mode())


def _summary(model, data_shape, device) -> str:
    # In eval mode, so the summary's forward pass updates no statistics (BatchNorm, VQ codebooks).
    was_training = model.training
    model.eval()
    try:
        from torchinfo import summary

        return str(summary(_Reconstruction(model), input_size=(1, *data_shape), device=device, depth=3,
                           verbose=0, col_names=("output_size", "num_params"), mode="eval"))
    except Exception as exc:  # a summary is a courtesy; never fail a run over it
        return f"(torchinfo summary unavailable: {exc})"
    finally:
        model.train(was_training)


def _torch_rng_state():
    """torch's CPU and CUDA generator states: the RNGs a training step draws from."""
    return torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None


def _set_torch_rng_state(state) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


class Trainer:
    def __init__(self, cfg, config_path=None, fresh: bool = False, device: str | None = None, quiet: bool = False):
        self.cfg = cfg
        self.config_path = config_path
        # Under torchrun every process trains; only rank 0 logs, writes samples and checkpoints.
        self.dist = from_environment()
        self.device = setup(self.dist, torch.device(resolve_device(device or cfg.train.device)))
        self.quiet = quiet or not self.dist.is_main
        self.run_dir = Path(cfg.train.out_dir)
        if fresh and self.run_dir.exists() and self.dist.is_main:
            for name in ("checkpoints", "samples", "tensorboard"):
                shutil.rmtree(self.run_dir / name, ignore_errors=True)
            (self.run_dir / "metrics.csv").unlink(missing_ok=True)
        barrier(self.dist)
        seed_everything(cfg.train.seed)
        self.model, self.plan = model_from_config(cfg, config_path, device=self.device)
        check_loss_config(cfg.loss, self.plan.data_shape)
        self.runtime = prepare(self.model, cfg, self.device, self.dist)
        self.optimizer = make_optimizer(self.model, cfg.train)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, cfg.train))
        self.ema = EMA(self.model, cfg.train.ema_decay) if cfg.train.ema else None
        self.step = 0
        self.skips = SkipLog()
        self._rng_state = None  # restored right before the loop, see train()
        # Samples of the StreamSampler consumed so far: batches whose images all failed to load
        # are skipped, so this can run ahead of step * batch_size.
        self.stream_position = 0
        self._compile_verified = False

    def log(self, text: str) -> None:
        if not self.quiet:
            print(text, flush=True)

    # ---------------------------------------------------------------- state
    def resume(self) -> bool:
        found = list_checkpoints(self.run_dir)
        if not found:
            return False
        ckpt = load_checkpoint(found[-1])
        stored = ckpt.metadata
        now = checkpoint_metadata(self.cfg, self.plan, 0, self.cfg.model.scaling_factor)
        for key in ("encoder", "decoder", "data_shape"):
            if stored.get(key) != now[key]:
                raise TrainingError(
                    f"{self.run_dir} holds a run with a different {key.replace('_', ' ')} "
                    f"({found[-1].name}); use --fresh to start over or choose another train.out_dir"
                )
        self.model.load_state_dict(ckpt.model_state)
        state = ckpt.train_state or {}
        if "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self._apply_config_hyperparameters(ckpt.step)
        if self.ema is not None and ckpt.ema_state:
            self.ema.state = {k: v.to(self.device) for k, v in ckpt.ema_state.items()}
        # Restored just before the first step (train()): building the loader and the summary
        # draw from the global RNG, which an uninterrupted run did before its first step.
        self._rng_state = state.get("rng")
        per_step = self.cfg.train.batch_size * self.cfg.train.grad_accum
        self.stream_position = int(state.get("stream_position", ckpt.step * per_step))
        self.step = ckpt.step
        self.log(f"resuming {self.run_dir} from step {self.step} ({found[-1].name})")
        return True

    def _apply_config_hyperparameters(self, step: int) -> None:
        """Loading the optimizer and scheduler states brings back the stored lr, betas and weight
        decay; the current config (saved as config.toml) is what the resumed run must use."""
        tcfg = self.cfg.train
        lr = tcfg.lr * lr_factor(step, tcfg)
        for group, decay in zip(self.optimizer.param_groups, (tcfg.weight_decay, 0.0)):
            group.update(lr=lr, initial_lr=tcfg.lr, betas=tuple(tcfg.betas), weight_decay=decay)
        self.scheduler.base_lrs = [tcfg.lr] * len(self.optimizer.param_groups)
        self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def save(self) -> Path:
        meta = checkpoint_metadata(self.cfg, self.plan, self.step, self.model.scaling_factor)
        train_state = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": capture_rng_state(),
            "stream_position": self.stream_position,
        }
        path = save_checkpoint(
            self.run_dir / "checkpoints" / checkpoint_name(self.step), self.model.state_dict(), meta,
            train_state=train_state, ema_state=self.ema.state if self.ema else None,
        )
        prune_checkpoints(self.run_dir, self.cfg.train.keep_last)
        return path

    # ----------------------------------------------------------------- data
    def _loader(self):
        data = self.cfg.data
        dataset = open_dataset(
            data.source, data.path, train=True, channels=data.channels, image_size=data.image_size,
            resize_filter=data.resize_filter, pad_to_square=data.pad_to_square, flip=False,
        )
        sampler = StreamSampler(len(dataset), seed=self.cfg.train.seed, start=self.stream_position,
                                rank=self.dist.rank, world_size=self.dist.world_size)
        self._read_position = self.stream_position  # runs ahead of stream_position during a step
        loader = make_loader(dataset, self.cfg.train.batch_size, shuffle=False, num_workers=data.num_workers,
                             device_type=self.device.type, sampler=sampler)
        return dataset, loader

    def _next_images(self, batches):
        while True:
            batch = next(batches)
            # Stream positions are global: each of N processes reads every N-th one.
            self._read_position += (len(batch.paths) + len(batch.failures)) * self.dist.world_size
            self.skips.add(batch.failures)
            if batch.images is not None:
                return self.runtime.to_input(batch.images)

    @torch.no_grad()
    def write_samples(self, fixed: torch.Tensor) -> Path:
        self.model.eval()
        generator = torch.Generator(device=self.device).manual_seed(self.cfg.train.seed)
        recon = self.model.reconstruct(fixed)
        prior = self.model.sample_prior(fixed.shape[0], generator=generator)
        self.model.train()
        path = self.run_dir / "samples" / f"step_{self.step:08d}.png"
        save_grid([fixed, recon, prior], path)
        return path

    # ----------------------------------------------------------------- loop
    def train(self) -> Path | None:
        cfg, tcfg = self.cfg, self.cfg.train
        main = self.dist.is_main
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.toml")
        self.resume()
        if self.step >= tcfg.max_steps:
            self.log(f"{self.run_dir} already reached train.max_steps = {tcfg.max_steps}; nothing to do")
            return None
        dataset, loader = self._loader()  # a missing data folder fails before the summary is printed
        self.log(_summary(self.model, self.plan.data_shape, self.device))
        self.log(f"device: {self.device}; data shape {self.plan.data_shape}; latent {self.plan.latent_shape}; "
                 f"precision {tcfg.precision}" + (f"; {self.dist.world_size} processes" if self.dist.enabled else ""))
        for note in self.runtime.notes:
            self.log(f"note: {note}")
        batches = iter(loader)
        fixed = self._fixed_batch(dataset)
        validation = self._validation_batches()
        metrics = MetricsLog(self.run_dir) if main else None
        if self._rng_state is not None:
            restore_rng_state(self._rng_state)
        from tqdm import tqdm

        progress = tqdm(total=tcfg.max_steps, initial=self.step, disable=self.quiet, dynamic_ncols=True)
        self.model.train()
        last_saved = None
        tick, images_seen = time.perf_counter(), 0
        step_rng = None
        try:
            while self.step < tcfg.max_steps:
                step_rng = _torch_rng_state()  # what a Ctrl-C before this step completes saves
                micro = [self._next_images(batches) for _ in range(tcfg.grad_accum)]
                if cfg.data.flip:
                    micro = [random_flip(m, tcfg.seed, self.step, i, self.dist) for i, m in enumerate(micro)]
                noises = None
                if self.model.latent.kind == "gaussian":
                    noises = [sample_noise(self.plan.latent_shape, m.shape[0], tcfg.seed, self.step, i, self.dist,
                                           self.device) for i, m in enumerate(micro)]
                result = self._step(micro, noises)
                self.scheduler.step()
                if self.ema is not None:
                    self.ema.update(self.model)
                self.step += 1
                self.stream_position, step_rng = self._read_position, None
                images_seen += sum(m.shape[0] for m in micro)
                progress.update(1)
                progress.set_postfix({k: f"{v:.4g}" for k, v in {"loss": result.loss, **result.terms}.items()})
                last = self.step == tcfg.max_steps
                if self.step % tcfg.log_every == 0 or last:
                    elapsed = time.perf_counter() - tick
                    # Every process joins the averaging; rank 0 writes the global batch's values.
                    values = mean_across(self.dist, {"loss": result.loss, **result.terms}, self.device)
                    row = {
                        "step": self.step, **values,
                        "kld_weight": result.kld_weight, "lr": self.scheduler.get_last_lr()[0],
                        "grad_norm": result.grad_norm,
                        "images_per_s": images_seen * self.dist.world_size / max(elapsed, 1e-9),
                        **self.model.metrics(),  # quantizer diagnostics (codebook usage...), not losses
                    }
                    if validation and tcfg.val_every and (self.step % tcfg.val_every == 0 or last):
                        row.update(self.validate(validation))
                    if metrics is not None:
                        metrics.write(row)
                    tick, images_seen = time.perf_counter(), 0
                if main and (self.step % tcfg.sample_every == 0 or last):
                    self.write_samples(fixed)
                if main and (self.step % tcfg.save_every == 0 or last):
                    last_saved = self.save()
        except KeyboardInterrupt:
            progress.close()
            if step_rng is not None:  # interrupted within a step: save the RNG as that step found it
                _set_torch_rng_state(step_rng)
            if main and self.step and (last_saved is None or not last_saved.name.endswith(checkpoint_name(self.step))):
                self.save()
            raise TrainingError(
                f"interrupted at step {self.step}; checkpoint saved in {self.run_dir / 'checkpoints'}. "
                "Run the same command again to resume"
            ) from None
        finally:
            progress.close()
            if metrics is not None:
                metrics.close()
            if self.skips.count:
                self.log(f"warning: {self.skips.summary()} (listed above)")
        self.log(f"done: step {self.step}, checkpoint {last_saved}")
        return last_saved

    def _step(self, micro, noises) -> StepResult:
        """A training step; when the compiled model fails on its first step, say so and
        train the same model without compilation."""
        if not self.runtime.compiled or self._compile_verified:
            return train_step(self.runtime, micro, self.optimizer, self.cfg, self.step, noises)
        try:
            result = train_step(self.runtime, micro, self.optimizer, self.cfg, self.step, noises)
        except (TrainingError, KeyboardInterrupt):
            raise
        except Exception as exc:  # torch.compile raises many exception types
            self.runtime.fall_back_to_eager(exc)
            self.log(f"note: {self.runtime.notes[-1]}")
            return train_step(self.runtime, micro, self.optimizer, self.cfg, self.step, noises)
        self._compile_verified = True  # compiled and ran: later failures are real errors
        return result

    def _validation_batches(self):
        """Images of data.val_path, loaded once, for the metrics written every val_every steps."""
        data = self.cfg.data
        if not (data.val_path and self.cfg.train.val_every):
            return None
        dataset = open_dataset("folder", data.val_path, train=False, channels=data.channels,
                               image_size=data.image_size, resize_filter=data.resize_filter,
                               pad_to_square=data.pad_to_square)
        loader = make_loader(dataset, self.cfg.train.batch_size, shuffle=False, num_workers=0)
        batches = []
        for batch in loader:
            self.skips.add(batch.failures)
            if batch.images is not None:
                batches.append(batch.images)
        return batches

    @torch.no_grad()
    def validate(self, batches) -> dict:
        """Mean reconstruction loss, MSE and PSNR of the posterior means on the validation images."""
        self.model.eval()
        recon_loss, mse, psnr_sum, count = 0.0, 0.0, 0.0, 0
        for images in batches:
            images = self.runtime.to_input(images)
            out = self.model(images, sample=False)
            n = images.shape[0]
            recon_loss += reconstruction_loss(out.recon, images, self.cfg.loss.recon).item() * n
            image = self.model.to_image(out.recon)
            mse += (image.float() - images.float()).pow(2).flatten(1).mean(1).sum().item()
            psnr_sum += psnr(image, images).sum().item()
            count += n
        self.model.train()
        return {"val_recon": recon_loss / count, "val_mse": mse / count, "val_psnr": psnr_sum / count}

    def _fixed_batch(self, dataset) -> torch.Tensor:
        """The first readable images, for sample grids that are comparable across steps."""
        images = first_images(dataset, SAMPLE_IMAGES)
        if images is None:
            raise TrainingError(f"no readable image in {self.cfg.data.path}")
        return images.to(self.device)


def train(cfg, config_path=None, fresh: bool = False, device: str | None = None, quiet: bool = False):
    trainer = Trainer(cfg, config_path, fresh=fresh, device=device, quiet=quiet)
    try:
        return trainer.train()
    finally:
        cleanup(trainer.dist)

