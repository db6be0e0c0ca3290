"""How a training step runs: precision, memory layout, compilation, checkpointing, DDP.

``prepare(model, cfg, device, dist)`` returns a ``Runtime`` used by the trainer and by
``-mem`` alike, so the batch size ``-mem`` finds is measured with the same settings.
"""

from __future__ import annotations

import contextlib
import shutil
from dataclasses import dataclass, field

import torch

from ..errors import ConfigError
from ..latents.base import draw_noise
from .distributed import DistInfo

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Runtime:
    model: torch.nn.Module  # the plain VAE: checkpoints, samples and EMA use it
    step_model: torch.nn.Module  # what the training step calls (maybe DDP-wrapped and compiled)
    device: torch.device
    dtype: torch.dtype | None  # autocast dtype, None for fp32
    scaler: torch.amp.GradScaler | None
    memory_format: torch.memory_format | None
    dist: DistInfo = field(default_factory=DistInfo)
    compiled: bool = False
    notes: list[str] = field(default_factory=list)
    eager_model: torch.nn.Module | None = None  # step_model before torch.compile
    ddp: torch.nn.Module | None = None  # the DistributedDataParallel wrapper, when distributed

    def no_sync(self, last_micro_batch: bool):
        """Skip DDP's gradient all-reduce on all but the last micro-batch of a step."""
        if self.ddp is None or last_micro_batch:
            return contextlib.nullcontext()
        return self.ddp.no_sync()

    @classmethod
    def plain(cls, model: torch.nn.Module) -> "Runtime":
        """fp32, one process, no compilation: the model as it is."""
        device = next(model.parameters()).device
        return cls(model, model, device, None, None, None, eager_model=model)

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def to_input(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True)
        if self.memory_format is not None:
            images = images.contiguous(memory_format=self.memory_format)
        return images

    def fall_back_to_eager(self, exc: BaseException) -> None:
        """torch.compile failed on the first step: train the same model eagerly."""
        self.step_model = self.eager_model
        self.compiled = False
        self.notes.append(f"torch.compile failed ({type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}); "
                          "training without compilation")


def _memory_format(data_dims: int, enabled: bool, notes: list[str]):
    if not enabled:
        return None
    if data_dims == 2:
        return torch.channels_last
    if data_dims == 3:
        return torch.channels_last_3d
    notes.append("train.channels_last has no effect on 1D data")
    return None


def _compile_blocker(device: torch.device) -> str | None:
    """Why torch.compile cannot work here, or None."""
    if not hasattr(torch, "compile"):
        return "this PyTorch has no torch.compile"
    if device.type == "cpu" and not (shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")):
        return "compiling for the CPU needs a C++ compiler (c++, g++ or clang++) on PATH"
    if device.type == "mps":
        return "torch.compile does not support the mps device well enough for training"
    return None


def prepare(model, cfg, device: torch.device, dist: DistInfo | None = None) -> Runtime:
    """Apply train.precision, channels_last, grad_checkpointing, DDP and compile to ``model``."""
    tcfg = cfg.train
    dist = dist or DistInfo()
    notes: list[str] = []
    dtype = PRECISIONS[tcfg.precision]
    if dtype is torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("train.precision = 'bf16' needs a GPU with bfloat16 support; use 'fp16' or 'fp32'")
    scaler = torch.amp.GradScaler(device.type) if tcfg.precision == "fp16" else None
    if tcfg.precision == "fp16" and device.type == "cpu":
        notes.append("fp16 on the CPU has no fast convolution kernels (tens of times slower here); bf16 is the fast choice")
    memory_format = _memory_format(len(model.latent_shape) - 1, tcfg.channels_last, notes)
    if memory_format is not None:
        model.to(memory_format=memory_format)
    model.set_grad_checkpointing(tcfg.grad_checkpointing)

    ddp = None
    step_model = model
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        step_model = ddp = DistributedDataParallel(model, device_ids=ids)
    eager = step_model
    compiled = False
    if tcfg.compile:
        blocker = _compile_blocker(device)
        if blocker:
            notes.append(f"train.compile: {blocker}; training without compilation")
        else:
            step_model = torch.compile(step_model)
            compiled = True
    return Runtime(model, step_model, device, dtype, scaler, memory_format, dist, compiled, notes, eager, ddp)


# The streams of random draws of one micro-batch, each with keys of its own (noise_key): the
# latent's noise, the flips, the dropout masks, then each latent group g of a hierarchy (3 + g).
LATENT_NOISE, FLIPS, DROPOUT, FIRST_GROUP = 0, 1, 2, 3
TERM_STREAM = 100_000  # + a term's own number: the draws of loss terms (augmented views), after every group's


def noise_key(seed: int, step: int, micro: int, stream: int = LATENT_NOISE) -> int:
    """The one formula every random draw of training is seeded by: (train.seed, the step, the
    micro-batch, the stream). The same key on every process, so draws are made for the global
    batch and sliced, and a resumed run draws what the uninterrupted one drew."""
    return (seed * 1_000_003 + step) * 131 + micro + stream * 65_537


def sample_noise(noise_shape, batch: int, seed: int, step: int, micro: int, dist: DistInfo, device,
                 kind: str = "normal", stream: int = LATENT_NOISE) -> torch.Tensor:
    """A latent's sampling noise for one micro-batch (``kind``: "normal" or "uniform", per-sample
    shape ``noise_shape``), drawn for the global batch and sliced.

    Process r of N holds samples r, r+N, ... of the global batch (the StreamSampler's
    order), so N processes see exactly the noise one process would see: results do not
    depend on how the batch is split.
    """
    generator = torch.Generator().manual_seed(noise_key(seed, step, micro, stream))
    noise = draw_noise(kind, (batch * dist.world_size, *noise_shape), generator=generator)
    return noise[dist.rank::dist.world_size].to(device, non_blocking=True)


def mask_key(seed: int, step: int, micro: int) -> int:
    """The key of one micro-batch's dropout masks (see layers/dropout.py)."""
    return noise_key(seed, step, micro, DROPOUT)


def flip_mask(batch: int, seed: int, step: int, micro: int, dist: DistInfo) -> torch.Tensor:
    """Which samples of this process's micro-batch are flipped, by the same slicing rule."""
    generator = torch.Generator().manual_seed(noise_key(seed, step, micro, FLIPS))
    return (torch.rand(batch * dist.world_size, generator=generator) < 0.5)[dist.rank::dist.world_size]


def latent_noises(latent, latent_shape, micro, seed: int, step: int, dist: DistInfo, device):
    """The latent's sampling noise per micro-batch, drawn for the global batch (``sample_noise``),
    or None when the latent needs none."""
    shape = latent.noise_shape(latent_shape)
    if shape is None:
        return None
    return [sample_noise(shape, m.shape[0], seed, step, i, dist, device, kind=latent.noise_kind)
            for i, m in enumerate(micro)]


def group_noises(groups, micro, seed: int, step: int, dist: DistInfo, device):
    """Standard normal noise of each decoder latent group per micro-batch, drawn for the global
    batch like the top latent's, group g from stream FIRST_GROUP + g; None for a flat model."""
    if not groups:
        return None
    return [{name: sample_noise(shape, m.shape[0], seed, step, i, dist, device, stream=FIRST_GROUP + g)
             for g, (name, shape) in enumerate(groups)} for i, m in enumerate(micro)]
