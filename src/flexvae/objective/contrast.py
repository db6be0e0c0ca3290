"""Two-view terms (AE-LEGO's contrast and semantic-align terms, its Twin setting: two augmented
views of each image through one encoder).

``Contrast``: the second view of each image (a seeded random horizontal flip, crop of at
least ``crop`` of each side resized back, and brightness shift) is encoded by the same
encoder; the posterior means of the two views of an image are positives, every other image of
the micro-batch a negative, in a symmetric InfoNCE at ``temperature`` over cosine similarities
(SimCLR's NT-Xent between the views). The latent code becomes invariant to the augmentations.

``Align``: for images with a class label, posterior means of the same class are pulled
together and others apart (the supervised contrastive loss of Khosla et al. 2020, over the
micro-batch's labelled images): the latent space lines up with the labels' semantics.

Both compare images within one micro-batch, so their value depends on how a step is split
(train.grad_accum, processes), unlike the per-image terms.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..train.runtime import TERM_STREAM, noise_key
from .term import Arg, Term, register_term

VIEW_STREAM = TERM_STREAM + 2


def second_view(x: torch.Tensor, seed: int, step: int, micro: int, crop: float = 0.7, rank: int = 0,
                world_size: int = 1) -> torch.Tensor:
    """An augmented copy of each image (B, C, H, W): flip, crop and resize, brightness; drawn for
    the global batch and sliced like the training flips."""
    generator = torch.Generator().manual_seed(noise_key(seed, step, micro, VIEW_STREAM))
    n = x.shape[0] * world_size
    flips = (torch.rand(n, generator=generator) < 0.5)[rank::world_size]
    sides = (crop + (1 - crop) * torch.rand(n, generator=generator))[rank::world_size]
    corners = torch.rand(n, 2, generator=generator)[rank::world_size]
    shifts = (0.2 * torch.rand(n, generator=generator) - 0.1)[rank::world_size]
    height, width = x.shape[-2:]
    views = []
    for index in range(x.shape[0]):
        h, w = max(1, round(height * float(sides[index]))), max(1, round(width * float(sides[index])))
        top, left = int(corners[index, 0] * (height - h + 1)), int(corners[index, 1] * (width - w + 1))
        view = x[index:index + 1, :, top:top + h, left:left + w].float()
        view = F.interpolate(view, size=(height, width), mode="bilinear", align_corners=False)
        view = view.flip(-1) if flips[index] else view
        views.append((view + float(shifts[index])).clamp(-1, 1))
    return torch.cat(views).to(x.dtype)


def _codes(posterior) -> torch.Tensor:
    return F.normalize(posterior.mean.float().flatten(1), dim=1)


@register_term("Contrast", Arg("temperature", float, 0.1, "softmax temperature of the cosine similarities"),
               Arg("crop", float, 0.7, "smallest crop side of the second view, as a share of the image"),
               doc="InfoNCE between the codes of two augmented views of each image (AE-LEGO's contrast, Twin)")
class Contrast(Term):
    log_name = "contrast"

    def __init__(self, temperature: float = 0.1, crop: float = 0.7):
        super().__init__()
        if temperature <= 0 or not 0 < crop <= 1:
            raise ValueError("temperature must be positive and crop in (0, 1]")
        self.temperature, self.crop = temperature, crop

    def check(self, data_shape, objective):
        if len(data_shape) != 3:
            raise ConfigError(f"the Contrast term needs 2D images; this data has shape {tuple(data_shape)}")

    def forward(self, batch):
        view = second_view(batch.x, batch.seed, batch.step, batch.micro, self.crop, batch.rank, batch.world_size)
        with batch.autocast():
            other = batch.model.encode(view, labels=batch.labels)
        first, second = _codes(batch.out.posterior), _codes(other)
        logits = first @ second.T / self.temperature  # (B, B): image i's first view against every second view
        targets = torch.arange(logits.shape[0], device=logits.device)
        return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))


@register_term("Align", Arg("temperature", float, 0.1, "softmax temperature of the cosine similarities"),
               doc="supervised contrastive loss of the codes: same-class images together (AE-LEGO's semantic align)")
class Align(Term):
    log_name = "align"

    def __init__(self, temperature: float = 0.1):
        super().__init__()
        if temperature <= 0:
            raise ValueError("temperature must be positive")
        self.temperature = temperature

    def setup(self, device, cfg=None, **context):
        if cfg is not None and cfg.data.labels == "none":
            raise ConfigError("the Align term needs class labels: set data.labels ('folders' or a CSV file)")

    def forward(self, batch):
        codes = _codes(batch.out.posterior)
        if batch.labels is None or batch.labels.dim() != 1:
            return codes.sum() * 0.0
        known = batch.labels >= 0
        codes, labels = codes[known], batch.labels[known]
        if codes.shape[0] < 2:
            return codes.sum() * 0.0
        logits = codes @ codes.T / self.temperature
        self_mask = torch.eye(len(labels), dtype=torch.bool, device=codes.device)
        log_prob = logits.masked_fill(self_mask, float("-inf")).log_softmax(dim=1)
        positive = (labels[:, None] == labels[None, :]) & ~self_mask
        anchors = positive.any(dim=1)
        if not anchors.any():
            return codes.sum() * 0.0
        per_anchor = -(log_prob.masked_fill(~positive, 0.0).sum(1) / positive.sum(1).clamp(min=1))
        return per_anchor[anchors].mean()
