"""Scores of generated images that noise cannot pass: a judge network trained on the user's
labelled folder, and distances in its features.

- ``train_judge``: a small CNN trained to classify the labelled images (a stratified fifth held
  out; its accuracy there is reported beside every score, so a weak judge shows as one); images
  larger than 64 px a side are shrunk to 64 first, here and in the two-sample test;
- ``class_scores``: the share of images the judge classifies with p > 0.9 and the entropy (bits)
  of its class histogram (log2 K when the classes are covered evenly);
- ``frechet_distance``: the Frechet distance between Gaussians fitted to two feature sets (the
  judge's penultimate layer here; Inception's pool layer is FID, fid.py), in float64;
- ``precision_recall``: Kynkaanniemi et al. 2019: precision is the share of generated images
  inside the real images' k-nearest-neighbour manifold (a ball around each real feature whose
  radius is its distance to its k-th nearest real neighbour), recall the share of real images
  inside the generated images' manifold;
- ``two_sample_test``: a classifier two-sample test: a CNN of the same shape trained to tell two
  image sets apart, its accuracy on a held-out half (0.5: it cannot tell them apart).

Uniform noise gets a large Frechet distance, zero precision and recall, and a two-sample
accuracy near 1, whatever the judge's softmax says of it (tests/test_judge.py checks this).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

CONFIDENCE = 0.9
FEATURES = 128
MAX_SIDE = 64  # larger images are shrunk (area-averaged) to this side first: a CPU trains the judge in seconds


def shrink(images: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) with the longer side at most MAX_SIDE (antialiased), the aspect kept."""
    side = max(images.shape[-2:])
    if side <= MAX_SIDE:
        return images
    size = tuple(max(1, round(d * MAX_SIDE / side)) for d in images.shape[-2:])
    return F.interpolate(images, size=size, mode="bilinear", antialias=True, align_corners=False)


class JudgeNet(nn.Module):
    """Three convolutions (the last two halve the size), pooled to 4 x 4, then a 128-unit layer
    (the features) and the class layer. Works for any image of at least 4 px a side, 2D."""

    def __init__(self, channels: int, classes: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, 32, 3, 1, 1), nn.SiLU(), nn.Conv2d(32, 64, 3, 2, 1), nn.SiLU(),
            nn.Conv2d(64, 64, 3, 2, 1), nn.SiLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
            nn.Linear(64 * 16, FEATURES), nn.SiLU())
        self.head = nn.Linear(FEATURES, classes)

    def forward(self, x):
        return self.head(self.body(x))


class Judge:
    """A trained JudgeNet with the class names it predicts (``classes_``), the held-out accuracy
    and the image shape it takes; ``predict_proba``/``predict`` take images or flattened pixels."""

    def __init__(self, net: JudgeNet, classes, accuracy: float | None, data_shape, held_out: np.ndarray | None = None):
        self.net, self.classes_, self.accuracy, self.data_shape = net.eval(), np.asarray(classes), accuracy, tuple(data_shape)
        self.held_out = held_out  # indices of the images it did not train on

    def _images(self, images) -> torch.Tensor:
        images = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images).float()
        return shrink(images.reshape(-1, *self.data_shape))

    @torch.no_grad()
    def _run(self, images, what):
        images = self._images(images)
        return torch.cat([what(images[i:i + 256]) for i in range(0, len(images), 256)]).double().numpy()

    def features(self, images) -> np.ndarray:
        return self._run(images, self.net.body)

    def predict_proba(self, images) -> np.ndarray:
        return self._run(images, lambda x: F.softmax(self.net(x), 1))

    def predict(self, images) -> np.ndarray:
        return self.classes_[self.predict_proba(images).argmax(1)]


@torch.enable_grad()  # callers may run under no_grad (sampling)
def _fit(net: nn.Module, images: torch.Tensor, targets: torch.Tensor, seed: int, epochs: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    batch = 64
    steps = max(1, epochs * math.ceil(len(images) / batch))
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 2e-3, total_steps=steps)
    net.train()
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(images), batch):
            rows = order[start:start + batch]
            x = images[rows]
            # a pixel of shift either way: the judge should not hinge on exact positions
            shift = torch.randint(-1, 2, (2,), generator=generator).tolist()
            x = torch.roll(x, shifts=shift, dims=(-2, -1))
            loss = F.cross_entropy(net(x), targets[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    net.eval()


def _split(labels: np.ndarray, fraction: float, seed: int):
    """(train indices, held-out indices): ``fraction`` of each class held out (at least one
    image of a class with two or more)."""
    rng = np.random.default_rng(seed)
    train, held = [], []
    for c in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == c))
        k = int(round(len(rows) * fraction)) if len(rows) > 1 else 0
        k = max(k, 1) if len(rows) > 1 else 0
        held += rows[:k].tolist()
        train += rows[k:].tolist()
    return np.array(sorted(train)), np.array(sorted(held))


def train_judge(images, labels, seed: int = 0, epochs: int = 30, held_out: float = 0.2) -> Judge:
    """A JudgeNet trained on ``images`` (N, C, H, W) in [-1, 1] (or flattened, with their
    shape given by a 4-D array) with ``labels`` (N,) of any hashable kind."""
    images = torch.as_tensor(np.asarray(images)).float()
    if images.dim() != 4:
        raise ValueError(f"the judge takes 2D images (N, C, H, W), got shape {tuple(images.shape)}")
    labels = np.asarray([str(c) for c in labels])
    classes = np.unique(labels)
    if len(classes) < 2:
        raise ValueError(f"the judge needs at least two classes of labelled images, found {len(classes)}")
    targets = torch.as_tensor(np.searchsorted(classes, labels))
    data_shape = images.shape[1:]
    images = shrink(images)
    torch.manual_seed(seed)
    train, held = _split(labels, held_out, seed)
    net = JudgeNet(images.shape[1], len(classes))
    _fit(net, images[train], targets[train], seed, epochs)
    accuracy = None
    if len(held):
        with torch.no_grad():
            accuracy = float((net(images[held]).argmax(1) == targets[held]).float().mean())
    return Judge(net, classes, accuracy, data_shape, held)


def class_scores(probs: np.ndarray, classes) -> dict:
    """The confident share and the class histogram's entropy in bits (of log2 K)."""
    predicted = probs.argmax(1)
    histogram = np.bincount(predicted, minlength=probs.shape[1]) / len(predicted)
    nonzero = histogram[histogram > 0]
    return {"confident": float((probs.max(1) > CONFIDENCE).mean()),
            "class_entropy_bits": float(-(nonzero * np.log2(nonzero)).sum()),
            "max_entropy_bits": math.log2(probs.shape[1]),
            "predicted_classes": {str(c): float(h) for c, h in zip(classes, histogram)}}


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2), float64; the matrix root
    through symmetric eigendecompositions (no complex parts to drop)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"two feature sets (N, D) with the same D and N >= 2 each, got {a.shape} and {b.shape}")
    mean = a.mean(0) - b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    cov_a, cov_b = np.atleast_2d(cov_a), np.atleast_2d(cov_b)
    values, vectors = np.linalg.eigh(cov_a)
    root_a = (vectors * np.sqrt(values.clip(min=0))) @ vectors.T
    middle = np.linalg.eigvalsh(root_a @ cov_b @ root_a).clip(min=0)
    distance = float(mean @ mean + np.trace(cov_a) + np.trace(cov_b) - 2 * np.sqrt(middle).sum())
    return max(distance, 0.0)  # rounding can take identical sets a hair below zero


def _knn_radii(features: torch.Tensor, k: int) -> torch.Tensor:
    distances = torch.cdist(features, features)
    return distances.kthvalue(min(k + 1, len(features)), dim=1).values  # the 0 to itself is the first


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """(precision, recall) of ``fake`` against ``real`` features, k-nearest-neighbour manifolds."""
    real_t, fake_t = torch.as_tensor(real, dtype=torch.float64), torch.as_tensor(fake, dtype=torch.float64)

    def coverage(inside: torch.Tensor, manifold: torch.Tensor) -> float:
        radii = _knn_radii(manifold, k)
        return float((torch.cdist(inside, manifold) <= radii.unsqueeze(0)).any(1).double().mean())

    return coverage(fake_t, real_t), coverage(real_t, fake_t)


def two_sample_test(a, b, seed: int = 0, epochs: int = 20) -> float:
    """Held-out accuracy of a CNN trained to tell image sets ``a`` and ``b`` apart (equal sizes
    are used: the larger set is cut), trained on half of each, tested on the other half."""
    a, b = (shrink(torch.as_tensor(np.asarray(t)).float()) for t in (a, b))
    n = min(len(a), len(b))
    if n < 4:
        raise ValueError(f"a two-sample test needs at least 4 images a side, got {n}")
    generator = torch.Generator().manual_seed(seed)
    a, b = a[torch.randperm(len(a), generator=generator)[:n]], b[torch.randperm(len(b), generator=generator)[:n]]
    half = n // 2
    torch.manual_seed(seed)
    net = JudgeNet(a.shape[1], 2)
    train_x, train_y = torch.cat([a[:half], b[:half]]), torch.cat([torch.zeros(half), torch.ones(half)]).long()
    _fit(net, train_x, train_y, seed, epochs)
    test_x, test_y = torch.cat([a[half:], b[half:]]), torch.cat([torch.zeros(n - half), torch.ones(n - half)]).long()
    with torch.no_grad():
        return float((net(test_x).argmax(1) == test_y).float().mean())


def sample_scores(judge: Judge, real, images, k: int = 3) -> dict:
    """Every score of ``images`` (N, C, H, W) against ``real`` images, in ``judge``'s features."""
    real_features, features = judge.features(real), judge.features(images)
    precision, recall = precision_recall(real_features, features, k)
    return {"images": int(len(features)), "frechet": frechet_distance(real_features, features),
            "precision": precision, "recall": recall, **class_scores(judge.predict_proba(images), judge.classes_)}
