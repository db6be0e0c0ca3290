"""The training loop: resume, data stream, steps, logging, samples and checkpoints.

A run directory holds ``config.toml`` (the resolved config), ``metrics.csv``,
``samples/step_XXXXXXXX.png`` and ``checkpoints/step_XXXXXXXX.safetensors``.
Running again on a directory with a checkpoint resumes it.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..assemble import model_from_config, open_training_data
from ..checkpoint import (checkpoint_metadata, checkpoint_name, list_checkpoints, load_checkpoint, load_run,
                          prune_checkpoints, save_checkpoint)
from ..data import SkipLog, make_loader, sample_items
from ..data.cache import CachedLoader, fill_cache
from ..device import resolve_device
from ..errors import Interrupted, Terminated, TrainingError
from ..files import RunLock
from ..layers.pca import fit_to_data, fits_to_data
from ..metrics import MetricsLog
from ..objective import Objective, check_loss_config
from ..outputs import writing_into
from .distributed import barrier, broadcast_parameters, cleanup, from_environment, mean_across, setup
from .ema import EMA
from .guard import SpikeGuard
from .run_dir import adopt_unrecorded_run, check_resumable, resume_lines, save_run_config, set_aside_run_outputs, tidy_resumed_run
from .rng import capture_rng_state, restore_rng_state, seed_everything, set_torch_rng_state, torch_rng_state
from .runtime import group_noises, latent_noises, prepare
from .sampler import StreamSampler
from .signals import SigTerm, on_sigterm, raise_terminated
from .samples import fixed_batch, write_samples
from .summary import announce
from .stages import Stages, set_peak_lr
from .validation import validate, validation_batches
from .step import MicroBatch, StepResult, lr_factor, make_optimizer, random_flip, train_step

class Trainer:
    """A training run of ``cfg``: its model, optimizer, schedule, EMA and run directory.
    ``train()`` runs (or resumes) the whole loop; ``step_once`` is one optimizer step."""

    def __init__(self, cfg, config_path=None, fresh: bool = False, device: str | None = None, quiet: bool = False,
                 verbose: bool = False, overwrite: bool = False):
        self.cfg, self.overwrite = cfg, overwrite  # overwrite: files in the run directory not of its record
        self.verbose = verbose  # print the full layer table at the start
        self.config_path = config_path
        # Under torchrun every process trains; only rank 0 logs, writes samples and checkpoints.
        self.dist = from_environment()
        self.device = setup(self.dist, torch.device(resolve_device(device or cfg.train.device)))
        self.quiet = quiet or not self.dist.is_main
        self.run_dir = Path(cfg.train.out_dir)
        self.fresh = fresh
        if cfg.train.fit_prior:
            from ..fitted_prior import require_sklearn

            require_sklearn("train.fit_prior")  # said now, not after the run
        self.lock = RunLock(self.run_dir)
        seed_everything(cfg.train.seed)
        # With data.labels the model's classes come from the data, so the data is opened first.
        self._dataset = open_training_data(cfg, config_path) if cfg.data.labels != "none" else None
        classes = None if self._dataset is None else self._dataset.labels.classes
        self.model, self.plan = model_from_config(cfg, config_path, device=self.device, classes=classes,
                                                  training_batch=cfg.train.batch_size)
        check_loss_config(cfg, self.plan.data_shape)
        self.runtime = prepare(self.model, cfg, self.device, self.dist)
        self.objective = Objective.from_config(cfg, self.plan.data_shape, config_path, self.device, self.dist)
        self.objective.check_latent(self.plan.latent_shape)  # every loss term, the discriminator among them
        self.stages = Stages(cfg, self.model, self.plan, self.objective, str(config_path or "config"), config_path)
        self.stage = None  # the stage the last step ran in (stages.py)
        self.optimizer = make_optimizer(self.model, cfg.train)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, cfg.train))
        self.ema = EMA(self.model, cfg.train.ema_decay) if cfg.train.ema else None
        self.guard = SpikeGuard.from_config(cfg.train)
        self.step = 0
        self.skips = SkipLog()
        self._rng_state = None  # restored right before the loop, see train()
        # Samples of the StreamSampler consumed so far: batches whose images all failed to load
        # are skipped, so this can run ahead of step * batch_size.
        self.stream_position = 0
        self._read_position = 0
        self._compile_verified = False
        self.last_saved: Path | None = None

    def log(self, text: str) -> None:
        """Print a line unless the trainer is quiet."""
        if not self.quiet:
            print(text, flush=True)

    # ---------------------------------------------------------------- state
    def resume(self) -> bool:
        """Load the run directory's latest checkpoint (weights, optimizer, EMA, RNG, data position); False when there is none."""
        found = list_checkpoints(self.run_dir)
        if not found:
            return False
        ckpt = load_checkpoint(found[-1])
        stored = ckpt.metadata
        now = checkpoint_metadata(self.cfg, self.plan, 0, self.cfg.model.scaling_factor)
        check_resumable(self.run_dir, found[-1], stored, now)
        self.model.load_state_dict(ckpt.model_state)
        state = ckpt.train_state or {}
        if "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self._apply_config_hyperparameters(ckpt.step)
        if self.runtime.scaler is not None and "scaler" in state:
            self.runtime.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and ckpt.ema_state:
            self.ema.state = {k: v.to(self.device) for k, v in ckpt.ema_state.items()}
        if self.guard is not None and "guard" in state:
            try:
                self.guard.load_state_dict(state["guard"])
            except (TypeError, ValueError) as exc:
                raise TrainingError(f"{found[-1]}: corrupt training state: {exc}") from None
        if self.objective.adversary is not None and "adversarial" in state:
            self.objective.adversary.load_state_dict(state["adversarial"], found[-1])
        # Restored just before the first step (train()): building the loader and the summary
        # draw from the global RNG, which an uninterrupted run did before its first step.
        self._rng_state = state.get("rng")
        per_step = self.cfg.train.batch_size * self.cfg.train.grad_accum
        self.stream_position = int(state.get("stream_position", ckpt.step * per_step))
        self.step = ckpt.step
        self.last_saved = found[-1]
        for line in resume_lines(self.run_dir, found[-1], self.step, stored, now["config"]):
            self.log(line)
        return True

    def _apply_config_hyperparameters(self, step: int) -> None:
        """Loading the optimizer and scheduler states brings back the stored lr, betas and weight
        decay; the current config (saved as config.toml) is what the resumed run must use."""
        tcfg = self.cfg.train
        for group, decay in zip(self.optimizer.param_groups, (tcfg.weight_decay, 0.0)):
            group.update(betas=tuple(tcfg.betas), weight_decay=decay)
        set_peak_lr(self.optimizer, self.scheduler, tcfg.lr, step, tcfg)

    def save(self) -> Path:
        """Write a checkpoint of the current step atomically and return its path."""
        meta = checkpoint_metadata(self.cfg, self.plan, self.step, self.model.scaling_factor)
        train_state = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": capture_rng_state(),
            "stream_position": self.stream_position,
        }
        if self.runtime.scaler is not None:
            train_state["scaler"] = self.runtime.scaler.state_dict()
        if self.objective.adversary is not None:
            train_state["adversarial"] = self.objective.adversary.state_dict()
        if self.guard is not None:
            train_state["guard"] = self.guard.state_dict()
        path = save_checkpoint(
            self.run_dir / "checkpoints" / checkpoint_name(self.step), self.model.state_dict(), meta,
            train_state=train_state, ema_state=self.ema.state if self.ema else None,
        )
        prune_checkpoints(self.run_dir, self.cfg.train.keep_last)
        self.last_saved = path
        return path

    # ----------------------------------------------------------------- data
    def _loader(self, image_size: int = 0):
        """(dataset, loader) from the stream position on; ``image_size``: a stage's size (0 = data.image_size)."""
        data = self.cfg.data
        dataset = self._dataset if self._dataset is not None else open_training_data(self.cfg, self.config_path)
        if image_size and image_size != data.image_size:
            dataset = open_training_data(self.stages.sized(self.cfg, image_size), self.config_path, self.plan.classes)
        workers = data.num_workers
        note = dataset.enable_cache(data.cache, processes=self.dist.world_size)
        if note:
            self.runtime.notes.append(note)
        if dataset.cache is not None:
            fill_cache(dataset, workers)  # every image decoded once, in parallel; later batches are
            # gathered from the cache in this process (worker processes would only add transfers)
        if self.dist.is_main:
            self.skips.add(dataset.excluded)
        sampler = StreamSampler(len(dataset), seed=self.cfg.train.seed, start=self.stream_position,
                                rank=self.dist.rank, world_size=self.dist.world_size)
        self._read_position = self.stream_position  # runs ahead of stream_position during a step
        if dataset.cache is not None:
            loader = CachedLoader(dataset, self.cfg.train.batch_size, sampler, pin_memory=self.device.type == "cuda")
        else:
            loader = make_loader(dataset, self.cfg.train.batch_size, shuffle=False, num_workers=workers,
                                 device_type=self.device.type, sampler=sampler)
        return dataset, loader

    def _next_batch(self, batches):
        """(images, labels) of the next batch with a readable image, on the device; labels
        (-1 = unlabelled) when data.labels is set, else None."""
        while True:
            batch = next(batches)
            # Stream positions are global: each of N processes reads every N-th one.
            self._read_position += (len(batch.paths) + len(batch.failures)) * self.dist.world_size
            self.skips.add(batch.failures)
            if batch.images is not None:
                labels = None if self._dataset is None or batch.labels is None else batch.labels.to(self.device)
                return self.runtime.to_input(batch.images), labels

    def write_samples(self, fixed: torch.Tensor, labels: torch.Tensor | None = None) -> Path:
        """A PNG grid of reconstructions of ``fixed`` and prior samples at the current step."""
        path = self.run_dir / "samples" / f"step_{self.step:08d}.png"
        return write_samples(self.model, fixed, labels, self.cfg.train.seed, path)

    # ----------------------------------------------------------------- steps
    def step_once(self, micro: list[torch.Tensor], labels: list[torch.Tensor] | None = None) -> StepResult:
        """One optimizer step on these micro-batches (images already on the device, with their
        labels when the data has them): flips, sampling noise, forward, backward, update,
        schedule and EMA; ``self.step`` advances."""
        if self.cfg.data.flip:
            micro = [random_flip(m, self.cfg.train.seed, self.step, i, self.dist) for i, m in enumerate(micro)]
        if self.stages.at(self.step) is not self.stage:
            self._enter_stage(self.stages.at(self.step))
        try:
            tcfg, plan = self.cfg.train, self.stages.plan_for(self.stage, self.plan)
            noises = latent_noises(self.model.latent, plan.latent_shape, micro, tcfg.seed, self.step, self.dist,
                                   self.device)
            groups = group_noises(plan.decoder.groups, micro, tcfg.seed, self.step, self.dist, self.device)
            result = self._step_or_uncompiled([MicroBatch(images, labels[i] if labels else None, noises[i] if noises else None,
                                                  groups[i] if groups else None) for i, images in enumerate(micro)])
        except TrainingError as exc:
            kept = (f"the last checkpoint ({self.last_saved.name}) is kept" if self.last_saved is not None
                    else "no checkpoint had been written yet")
            raise TrainingError(f"{exc}; {kept}") from None
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.model, skip=self.stage.frozen_names() if self.stage is not None else ())
        self.step += 1
        return result

    def _enter_stage(self, stage) -> None:
        """Freeze what the stage does not train, set its learning rate, say so."""
        self.stage = stage
        self.stages.enter(stage, self.model, self.optimizer, self.scheduler, self.cfg.train, self.step, self.dist)
        self.log(f"step {self.step}: {stage.title()}")

    def _step_or_uncompiled(self, micro) -> StepResult:
        """A training step; when the compiled model fails on its first step, say so and
        train the same model without compilation."""
        def run():
            done = self.step + 1
            return train_step(self.runtime, micro, self.optimizer, self.cfg, self.step, self.objective, guard=self.guard,
                              stage=self.stage, log=done % self.cfg.train.log_every == 0 or done == self.cfg.train.max_steps)

        if not self.runtime.compiled or self._compile_verified:
            return run()
        try:
            result = run()
        except (TrainingError, KeyboardInterrupt):
            raise
        except Exception as exc:  # torch.compile raises many exception types
            self.runtime.fall_back_to_eager(exc)
            self.log(f"note: {self.runtime.notes[-1]}")
            return run()
        self._compile_verified = True  # compiled and ran: later failures are real errors
        return result

    # ----------------------------------------------------------------- run directory
    def _take_run_dir(self, folder) -> None:
        """Lock the run directory for this process (rank 0), adopt a run an older flexvae wrote
        without a record, apply --fresh, save the config."""
        if not self.dist.is_main:
            return
        try:
            self.lock.acquire()
        except BlockingIOError as exc:
            raise TrainingError(
                f"{self.run_dir} is in use by another flexvae process (pid {exc.holder}); wait for it to "
                "finish, or choose another train.out_dir") from None
        adopt_unrecorded_run(folder, self.run_dir)
        if self.fresh:
            moved = set_aside_run_outputs(self.run_dir)
            if moved:
                self.log(f"--fresh: moved the previous run's {moved}")
        save_run_config(self.cfg, self.run_dir, folder)

    # ----------------------------------------------------------------- loop
    def train(self) -> Path | None:
        """Train to ``train.max_steps`` (resuming where the run stopped), then fit the prior if configured: the last checkpoint's path, or None when the run had already reached ``max_steps``."""
        previous = on_sigterm(raise_terminated)
        try:
            # the run directory is an output folder: only files of its record are replaced (outputs.py)
            with writing_into(self.run_dir, self.overwrite, flag="train.out_dir") as folder:
                self._take_run_dir(folder)
                barrier(self.dist)
                return self._train()
        finally:
            on_sigterm(previous)
            self.lock.release()

    def _train(self) -> Path | None:
        tcfg = self.cfg.train
        resumed = self.resume()
        if resumed and self.dist.is_main:
            tidy_resumed_run(self.run_dir, self.step)
        if self.step >= tcfg.max_steps:
            self.log(f"{self.run_dir} already reached train.max_steps = {tcfg.max_steps}; nothing to do")
            return None
        dataset, loader = self._loader()  # a missing data folder fails before the summary is printed
        self._announce(dataset)
        if not resumed:
            self._fit_to_data(dataset)
        started = time.perf_counter()
        batches, loader_size = iter(loader), 0
        fixed, fixed_labels = fixed_batch(dataset, self.cfg.train.seed, self.device, self.cfg.data.path)
        validation = validation_batches(self.cfg, self.skips, self.plan.classes)
        metrics = MetricsLog(self.run_dir) if self.dist.is_main else None
        if self._rng_state is not None:
            restore_rng_state(self._rng_state)
        from tqdm import tqdm

        progress = tqdm(total=tcfg.max_steps, initial=self.step, disable=self.quiet, dynamic_ncols=True)
        self.model.train()
        self._tick, self._images_seen = time.perf_counter(), 0
        step_rng = None
        try:
            while self.step < tcfg.max_steps:
                step_rng = torch_rng_state()  # what a Ctrl-C before this step completes saves
                size = self.stages.image_size_at(self.step, self.cfg.data.image_size)
                if size != (loader_size or self.cfg.data.image_size):  # a stage trains at another size
                    batches, loader_size = iter(self._loader(size)[1]), size
                pairs = [self._next_batch(batches) for _ in range(tcfg.grad_accum)]
                micro, labels = [p[0] for p in pairs], [p[1] for p in pairs]
                result = self.step_once(micro, labels if self._dataset is not None else None)
                self.stream_position, step_rng = self._read_position, None
                self._images_seen += sum(m.shape[0] for m in micro)
                progress.update(1)
                if self.step % tcfg.log_every == 0:  # the terms leave the device once per logging step
                    progress.set_postfix({k: f"{v:.4g}" for k, v in {"loss": result.loss, **result.terms}.items()})
                self._after_step(result, metrics, (fixed, fixed_labels), validation)
        except (KeyboardInterrupt, SigTerm) as exc:
            progress.close()
            self._save_on_interrupt(step_rng, terminated=isinstance(exc, SigTerm))
        finally:
            progress.close()
            if metrics is not None:
                metrics.close()
            if self.skips.count:
                self.log(f"warning: {self.skips.summary()} (listed above)")
        if tcfg.fit_prior and self.dist.is_main and self.step == tcfg.max_steps and self.last_saved is not None:
            self._fit_prior((fixed, fixed_labels))
        self.log(f"done: step {self.step} in {_duration(time.perf_counter() - started)}; checkpoints in "
                 f"{self.run_dir / 'checkpoints'} (latest {self.last_saved.name if self.last_saved else 'none'}), "
                 f"samples in {self.run_dir / 'samples'}, metrics in {self.run_dir / 'metrics.csv'}")
        return self.last_saved

    def _fit_prior(self, fixed) -> None:
        """train.fit_prior: the last checkpoint's prior (fitted_prior.py), and its sample grid again."""
        from ..fitted_prior import fit_run_prior

        loaded = load_run(self.last_saved, device=str(self.device))
        note = fit_run_prior(loaded, self.cfg, self.device)
        if loaded.vae.fitted_prior is not None:
            write_samples(loaded.vae, *fixed, self.cfg.train.seed, self.last_saved.parent.parent / "samples"
                          / self.last_saved.with_suffix(".png").name)
        self.log(note)

    def _fit_to_data(self, dataset) -> None:
        """Before a fresh run's first step: the layers set from the data (PCA tokens, layers/pca.py),
        from train.init_images images drawn with the run's seed (the same on every process)."""
        if not fits_to_data(self.model):
            return
        images, labels = sample_items(dataset, self.cfg.train.init_images, self.cfg.train.seed)
        if images is None:
            raise TrainingError(f"no readable image in {self.cfg.data.path} to fit the PCA layers to")
        if self.cfg.data.flip:  # the data as training sees it: mirror images too
            images = torch.cat([images, images.flip(-1)])
            labels = None if labels is None else torch.cat([labels, labels])
        mirrors = " and their mirror images" if self.cfg.data.flip else ""
        self.log(f"fitting the PCA layers to {len(images) // (2 if mirrors else 1)} training images{mirrors} "
                 f"(train.init_images = {self.cfg.train.init_images})")
        images = self.runtime.to_input(images)
        labels = None if labels is None or self._dataset is None else labels.to(self.device)
        more = (f"raise train.init_images (now {self.cfg.train.init_images})" if len(dataset) > self.cfg.train.init_images
                else f"{self.cfg.data.path} has no more readable images: use more")
        for line in fit_to_data(self.model, images, labels, more=more):
            self.log(line)
        broadcast_parameters(self.dist, self.model)  # the same fit everywhere: rank 0's copy settles it
        if self.ema is not None:
            self.ema = EMA(self.model, self.cfg.train.ema_decay)

    def _announce(self, dataset) -> None:
        for line in announce(self, dataset):
            self.log(line)

    def _after_step(self, result: StepResult, metrics, fixed, validation) -> None:
        """Log, write samples and save as the config's intervals ask."""
        tcfg = self.cfg.train
        last = self.step == tcfg.max_steps
        if self.step % tcfg.log_every == 0 or last:
            elapsed = time.perf_counter() - self._tick
            # Every process joins the averaging; rank 0 writes the global batch's values.
            values = mean_across(self.dist, {"loss": result.loss, **result.terms}, self.device)
            row = {
                "step": self.step, **values,
                "kl_weight": result.kl_weight, "lr": self.scheduler.get_last_lr()[0],
                "grad_norm": result.grad_norm, **({"stage": self.stage.number} if self.stage is not None else {}),
                **({} if self.guard is None else {"skipped": self.guard.skipped,
                                                   "skip_threshold": self.guard.threshold()}),
                "images_per_s": self._images_seen * self.dist.world_size / max(elapsed, 1e-9),
                **self.model.metrics(),  # quantizer diagnostics (codebook usage...), not losses
            }
            if validation and tcfg.val_every and (self.step % tcfg.val_every == 0 or last):
                row.update(validate(self.model, self.runtime, validation, self.objective))
            if metrics is not None:
                metrics.write(row)
            self._tick, self._images_seen = time.perf_counter(), 0
        if self.dist.is_main and (self.step % tcfg.sample_every == 0 or last):
            self.write_samples(*fixed)
        if self.dist.is_main and (self.step % tcfg.save_every == 0 or last):
            self.save()

    def _save_on_interrupt(self, step_rng, terminated: bool = False) -> None:
        if step_rng is not None:  # interrupted within a step: save the RNG as that step found it
            set_torch_rng_state(step_rng)
        saved_now = self.last_saved is not None and self.last_saved.name == checkpoint_name(self.step)
        if self.dist.is_main and self.step and not saved_now:
            self.save()
        where = (f"checkpoint saved in {self.run_dir / 'checkpoints'}. Run the same command again to resume"
                 if self.step else "nothing to save before the first step")
        if terminated:
            raise Terminated(f"terminated (SIGTERM) at step {self.step}; {where}") from None
        raise Interrupted(f"interrupted at step {self.step}; {where}") from None


def _duration(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest} s" if minutes else f"{seconds:.1f} s"


def train(cfg, config_path=None, fresh: bool = False, device: str | None = None, quiet: bool = False,
          verbose: bool = False, overwrite: bool = False):
    trainer = Trainer(cfg, config_path, fresh=fresh, device=device, quiet=quiet, verbose=verbose, overwrite=overwrite)
    try:
        return trainer.train()
    finally:
        cleanup(trainer.dist)
