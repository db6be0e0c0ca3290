"""Shared plumbing for the analysis modes: images preprocessed for a model, output files."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .. import data
from ..data import ImageFolder, make_loader, open_dataset
from ..errors import DataError
from ..files import write_text


def image_dataset(ctx, path=None, cfg=None, train: bool = False):
    """Images preprocessed exactly as the model's training data was.

    ``path`` is an image folder; without it the stored config's data is used: its
    ``val_path`` when set, else ``data.path`` (a torchvision source gives its test split).
    A conditional model's folder images get their labels (``ctx.label_spec``, see
    data/labels.input_labels).
    """
    channels, size = ctx.data_shape[0], ctx.data_shape[1]
    options = dict(channels=channels, image_size=size, resize_filter=ctx.resize_filter,
                   pad_to_square=ctx.pad_to_square)
    if path is None and cfg is None:
        raise DataError("no input images: give a folder (--input)")
    if path is None and not cfg.data.val_path:
        dataset = open_dataset(cfg.data.source, cfg.data.path, train=train, **options)
        if not isinstance(dataset, ImageFolder):
            return dataset
        path = cfg.data.path
    else:
        path = path if path is not None else cfg.data.val_path
        dataset = ImageFolder(path, **options)
    if ctx.vae.takes_labels and ctx.vae.class_names:
        from ..data.labels import input_labels

        labels, note = input_labels(getattr(ctx, "label_spec", "auto"), dataset.relpaths, path, ctx.vae.class_names)
        dataset.set_labels(labels)
        print(f"note: {note}")
    return dataset


def image_loader(dataset, batch_size: int = 32, device="cpu", num_workers: int = 0):
    return make_loader(dataset, batch_size, shuffle=False, num_workers=num_workers,
                       device_type=torch.device(device).type)


def sample_images(dataset, n: int, seed: int = 0) -> torch.Tensor:
    """``n`` readable images of a dataset drawn at random (fixed by ``seed``), stacked."""
    images = data.sample_images(dataset, n, seed)
    if images is None:
        raise DataError("no readable image in the input")
    return images


def write_json(data, path) -> Path:
    """Write JSON atomically (NaN and infinities become null)."""
    return write_text(path, json.dumps(_finite(data), indent=2) + "\n")


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
