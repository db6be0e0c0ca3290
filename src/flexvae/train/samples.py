"""The training sample grid: fixed images, their reconstructions, prior samples (one row per
class for a conditional model, the same style noise in every row)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..data import sample_items, save_grid
from ..errors import TrainingError

SAMPLE_IMAGES = 8
MAX_CLASS_ROWS = 16


def fixed_batch(dataset, seed: int, device, where) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Readable images drawn at random (seeded), the same at every step, for sample grids that
    are comparable across steps, with their labels when the dataset has them."""
    images, labels = sample_items(dataset, SAMPLE_IMAGES, seed)
    if images is None:
        raise TrainingError(f"no readable image in {where}")
    return images.to(device), None if labels is None else labels.to(device)


def prior_rows(model, n: int, seed: int, device) -> list[torch.Tensor]:
    """Rows of ``n`` prior samples: one per class (the first 16) when the model takes labels,
    each drawn from the same seed so a column shares its style; else one unconditional row."""
    classes = model.classes if model.takes_labels else None
    if not classes:
        generator = torch.Generator(device=device).manual_seed(seed)
        return [model.sample_prior(n, generator=generator)]
    rows = []
    for c in range(min(classes, MAX_CLASS_ROWS)):
        generator = torch.Generator(device=device).manual_seed(seed)
        rows.append(model.sample_prior(n, generator=generator, labels=torch.full((n,), c, device=device)))
    return rows


@torch.no_grad()
def write_samples(model, fixed, labels, seed: int, path: Path) -> Path:
    model.eval()
    try:
        recon = model.reconstruct(fixed, labels if model.takes_labels else None)
        rows = [fixed, recon, *prior_rows(model, fixed.shape[0], seed, fixed.device)]
    finally:
        model.train()
    save_grid(rows, path)
    return path
