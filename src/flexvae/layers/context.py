"""Context tokens: a learned embedding of the image's class label, injected at the token's
position in the encoder or the decoder (a conditional VAE).

A context layer takes ``(x, labels)``, or ``(x, state)`` with the pass's ``ForwardState``
holding them (forward_state.py). ``labels`` is either class indices (B,), where -1
means "no label", or class weights (B, K) or (B, K + 1) (interpolating between classes; see
``class_weights``). The embedding table has K + 1 rows: row K is the "no label" embedding
(trained on the unlabelled images of a partly labelled folder, zero at the start). ``K``
comes from the data's labels (``data.labels``); the stack passes it to the factory.

- ``CtxCat_E``: concatenates the E-dim embedding, repeated over every position:
  (C, *S) -> (C + E, *S);
- ``CtxFiLM_C``: FiLM, x * (1 + gamma(y)) + beta(y) per channel; gamma and beta start at
  zero, so the layer starts as the identity.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..forward_state import labels_of
from ..registry import Arg, register


def class_weights(labels: torch.Tensor, classes: int) -> torch.Tensor:
    """Labels as (B, classes + 1) weights over the classes and the "no label" row: indices
    (-1 = no label) become one-hot rows; (B, classes) weights get a zero "no label" column."""
    if not labels.is_floating_point():
        labels = labels.long()
        if labels.numel() and (int(labels.min()) < -1 or int(labels.max()) >= classes):
            raise ValueError(f"labels must lie in [0, {classes - 1}] (or -1 for none), "
                             f"found [{int(labels.min())}, {int(labels.max())}]")
        return F.one_hot(torch.where(labels < 0, classes, labels), classes + 1).float()
    if labels.dim() != 2 or labels.shape[1] not in (classes, classes + 1):
        raise ValueError(f"class weights must have shape (batch, {classes}) or (batch, {classes + 1}), "
                         f"found {tuple(labels.shape)}")
    if labels.shape[1] == classes:
        labels = F.pad(labels, (0, 1))
    return labels.float()


class _Context(nn.Module):
    classes: int

    def embed(self, labels, x: torch.Tensor) -> torch.Tensor:
        """(B, features) for a batch of labels or a pass's state holding them (None: every image unlabelled)."""
        labels = labels_of(labels)
        if labels is None:
            labels = torch.full((x.shape[0],), -1, dtype=torch.long, device=x.device)
        weights = class_weights(labels.to(x.device), self.classes)
        if weights.shape[0] != x.shape[0]:
            raise ValueError(f"{weights.shape[0]} labels for a batch of {x.shape[0]}")
        return weights.to(self.table.dtype) @ self.table


def _spread(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B, F) -> (B, F, 1, ..., 1) against a (B, C, *S) tensor."""
    return v.view(*v.shape, *([1] * (like.dim() - 2)))


@register(
    "CtxCat",
    Arg("features", doc="size of the label embedding appended to the channels"),
    doc="conditional: append a learned embedding of the label as channels, repeated over positions",
    context="labels",
)
class ContextConcat(_Context):
    def __init__(self, features: int, classes: int):
        super().__init__()
        if features < 1:
            raise ValueError(f"features must be positive, got {features}")
        self.classes, self.features = int(classes), int(features)
        self.table = nn.Parameter(torch.randn(classes + 1, features) * 0.1)
        with torch.no_grad():
            self.table[classes].zero_()

    def forward(self, x, labels=None):
        e = _spread(self.embed(labels, x).to(x.dtype), x)
        return torch.cat([x, e.expand(-1, -1, *x.shape[2:])], dim=1)


@register(
    "CtxFiLM",
    Arg("channels", infer="channels", doc="channels of the input"),
    doc="conditional: per-channel scale and shift from the label, x * (1 + gamma) + beta (identity at the start)",
    context="labels",
)
class ContextFiLM(_Context):
    def __init__(self, channels: int, classes: int):
        super().__init__()
        self.classes, self.channels = int(classes), int(channels)
        self.table = nn.Parameter(torch.zeros(classes + 1, 2 * channels))

    def forward(self, x, labels=None):
        gamma, beta = _spread(self.embed(labels, x).to(x.dtype), x).chunk(2, dim=1)
        return x * (1 + gamma) + beta
