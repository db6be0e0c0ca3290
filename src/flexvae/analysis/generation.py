"""Generation score: do decoded prior samples look like the labelled data?

A judge network (judge.py: a small CNN trained on the labelled folder's images, a fifth held
out for its accuracy) scores ``n`` decoded prior samples against the folder's images:

- ``frechet``: the Frechet distance between the judge's penultimate features of the samples and
  of the real images (0: the same statistics);
- ``precision`` / ``recall``: k-nearest-neighbour manifolds in those features (Kynkaanniemi et
  al. 2019): how many samples look like some real image, how many real images some sample covers;
- ``confident``: the share of samples the judge classifies with p > 0.9;
- ``class_entropy_bits``: the entropy of the histogram of predicted classes (log2 K at most):
  low means the samples cover few classes (mode collapse).

Uniform noise is scored beside them (``noise``): it must score worse on every one, or the score
says nothing. The judge's held-out accuracy is reported with them.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .judge import class_scores, sample_scores, train_judge
from .probe import encode_labelled


def fit_classifier(pixels: np.ndarray, labels: np.ndarray, seed: int = 0, data_shape=None):
    """(the judge trained on the images, its held-out accuracy); ``pixels`` (N, C, H, W), or
    flattened with ``data_shape`` (C, H, W)."""
    images = np.asarray(pixels, dtype=np.float32)
    if data_shape is not None:
        images = images.reshape(-1, *data_shape)
    judge = train_judge(images, labels, seed=seed)
    return judge, judge.accuracy


def score_samples(classifier, samples: np.ndarray) -> dict:
    """The judge's class scores of ``samples`` (pixels or images), with the entropy in nats too."""
    score = class_scores(classifier.predict_proba(samples), classifier.classes_)
    return {"samples": int(len(samples)), **score, "class_entropy": score["class_entropy_bits"] * math.log(2),
            "max_entropy": math.log(len(classifier.classes_))}


def _summary(score: dict) -> dict:
    return {k: score[k] for k in ("frechet", "precision", "recall", "confident", "class_entropy_bits")}


@torch.no_grad()
def generation_score(ctx, labelled_root, n: int = 500, seed: int = 0, device="cpu", batch: int = 100,
                     with_classifier: bool = False) -> dict:
    """The score of ``n`` prior samples of ``ctx.vae`` (from its fitted prior when it has one:
    "prior" says which) against the labelled folder's images and judge (also the judge itself,
    as "fitted", with ``with_classifier``)."""
    _, pixels, labels = encode_labelled(ctx, labelled_root, device=device)
    images = pixels.reshape(-1, *ctx.data_shape).astype(np.float32)
    judge, accuracy = fit_classifier(images, labels, seed)
    generator = torch.Generator(device=device).manual_seed(seed)
    samples = torch.cat([ctx.vae.sample_prior(min(batch, n - start), generator=generator).float().cpu()
                         for start in range(0, n, batch)]).numpy()
    noise = np.random.default_rng(seed).uniform(-1, 1, samples.shape).astype(np.float32)
    score = sample_scores(judge, images, samples)
    result = {"classifier_accuracy": accuracy, "classes": len(np.unique(labels)), "real_images": int(len(images)),
              "prior": "fitted" if ctx.vae.fitted_prior is not None else "model", "samples": int(len(samples)),
              **score, "class_entropy": score["class_entropy_bits"] * math.log(2),
              "max_entropy": math.log(len(judge.classes_)), "noise": _summary(sample_scores(judge, images, noise))}
    return {**result, "fitted": judge} if with_classifier else result
