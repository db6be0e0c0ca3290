"""Validation during training: the images of ``data.val_path`` and their metrics."""

from __future__ import annotations

import torch

from ..data import make_loader, open_dataset
from ..data.labels import read_labels
from ..metrics import psnr


def validation_batches(cfg, skips, classes=None):
    """(images, labels or None) batches of data.val_path, loaded once, for the metrics written
    every val_every steps. With data.labels = 'folders' and a model's ``classes``, the
    validation folder's sub-folders are its labels too."""
    data = cfg.data
    if not (data.val_path and cfg.train.val_every):
        return None
    dataset = open_dataset("folder", data.val_path, train=False, channels=data.channels,
                           image_size=data.image_size, resize_filter=data.resize_filter,
                           pad_to_square=data.pad_to_square)
    if data.labels == "folders" and classes is not None:
        dataset.set_labels(read_labels("folders", dataset.relpaths, data.val_path, classes=classes))
    loader = make_loader(dataset, cfg.train.batch_size, shuffle=False, num_workers=0)
    batches = []
    for batch in loader:
        skips.add(batch.failures)
        if batch.images is not None:
            batches.append((batch.images, batch.labels))
    return batches


@torch.no_grad()
def validate(model, runtime, batches, objective) -> dict:
    """Mean MSE and PSNR of the posterior means' reconstructions on the validation images, and
    the reconstruction loss (weighted objective) or the NLL in nats per image (elbo objective),
    as the run's ``objective`` computes it."""
    model.eval()
    recon_loss, mse, psnr_sum, count = 0.0, 0.0, 0.0, 0
    name = "val_recon"
    for images, labels in batches:
        images = runtime.to_input(images)
        out = model(images, sample=False, labels=None if labels is None else labels.to(images.device))
        n = images.shape[0]
        name, value = objective.reconstruction(model, out.recon, images)
        recon_loss += value.item()
        image = model.to_image(out.recon)
        mse += (image.float() - images.float()).pow(2).flatten(1).mean(1).sum().item()
        psnr_sum += psnr(image, images).sum().item()
        count += n
    model.train()
    return {name: recon_loss / count, "val_mse": mse / count, "val_psnr": psnr_sum / count}
