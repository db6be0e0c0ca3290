"""Shared plumbing for the analysis modes: a model from a checkpoint, images for it, output files."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import data
from ..data import ImageFolder, make_loader, open_dataset
from ..errors import DataError


@dataclass
class LoadedModel:
    """A model rebuilt from a checkpoint alone: the inference context, the config it was
    trained with (its data settings are the defaults for every analysis) and where it came from."""

    ctx: object  # inference.ModelContext
    cfg: object  # config.Config stored in the checkpoint
    path: Path
    step: int

    @property
    def vae(self):
        return self.ctx.vae


def load_model(checkpoint, device="cpu", prefer_ema: bool = True, plugins=()) -> LoadedModel:
    """A checkpoint file, or a run directory (its latest checkpoint), ready for evaluation."""
    from ..inference import ModelContext
    from ..loading import model_from_checkpoint
    from ..train.checkpoint import load_checkpoint, resolve_checkpoint

    path = resolve_checkpoint(checkpoint)
    ckpt = load_checkpoint(path, with_train_state=False)
    model, cfg, plan = model_from_checkpoint(ckpt, device=device, prefer_ema=prefer_ema, extra_plugins=plugins)
    return LoadedModel(ModelContext.from_checkpoint(model, cfg, plan), cfg, path, ckpt.step)


def image_dataset(ctx, path=None, cfg=None, train: bool = False):
    """Images preprocessed exactly as the model's training data was.

    ``path`` is an image folder; without it the stored config's data is used: its
    ``val_path`` when set, else ``data.path`` (a torchvision source gives its test split).
    """
    channels, size = ctx.data_shape[0], ctx.data_shape[1]
    options = dict(channels=channels, image_size=size, resize_filter=ctx.resize_filter,
                   pad_to_square=ctx.pad_to_square)
    if path is not None:
        return ImageFolder(path, **options)
    if cfg is None:
        raise DataError("no input images: give a folder (--input)")
    if cfg.data.val_path:
        return ImageFolder(cfg.data.val_path, **options)
    return open_dataset(cfg.data.source, cfg.data.path, train=train, **options)


def image_loader(dataset, batch_size: int = 32, device="cpu", num_workers: int = 0):
    return make_loader(dataset, batch_size, shuffle=False, num_workers=num_workers,
                       device_type=torch.device(device).type)


def first_images(dataset, n: int) -> torch.Tensor:
    """The first ``n`` readable images of a dataset, stacked."""
    images = data.first_images(dataset, n)
    if images is None:
        raise DataError("no readable image in the input")
    return images


def load_single_image(ctx, path) -> torch.Tensor:
    """One image file as a (1, C, H, W) batch with the model's preprocessing."""
    from ..data import load_image

    return load_image(path, ctx.data_shape[0], ctx.data_shape[1], ctx.resize_filter, ctx.pad_to_square)[None]


def write_json(data, path) -> Path:
    """Write JSON atomically (NaN and infinities become null)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(_finite(data), indent=2) + "\n")
    os.replace(tmp, path)
    return path


def _finite(value):
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def markdown_table(header, rows) -> str:
    """A GitHub Markdown table; numbers right-aligned."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(str(h))] + [len(r[i]) for r in cells]) for i, h in enumerate(header)]
    numeric = [bool(rows) and all(isinstance(r[i], (int, float)) and not isinstance(r[i], bool) or r[i] is None
                                  for r in rows) for i in range(len(header))]
    line = "| " + " | ".join(str(h).ljust(w) for h, w in zip(header, widths)) + " |"
    rule = "|" + "|".join(("-" * (w + 1) + ":") if num else (":" + "-" * (w + 1))
                          for w, num in zip(widths, numeric)) + "|"
    body = ["| " + " | ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(r, widths, numeric)) + " |"
            for r in cells]
    return "\n".join([line, rule, *body])


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != value:
            return "nan"
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.4e}"
    return str(value)
