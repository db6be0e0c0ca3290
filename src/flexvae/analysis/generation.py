"""Generation score: do decoded prior samples look like the labelled data?

A classifier trained on the real labelled images (standardised pixels -> multinomial logistic
regression, scikit-learn) scores ``n`` decoded prior samples:

- ``confident``: the fraction of samples it classifies with probability > 0.9 (a sample that
  looks like no class, such as textured noise, gets a spread-out prediction);
- ``class_entropy``: the entropy (nats) of the histogram of predicted classes, next to its
  maximum log K: low means the samples cover few classes (mode collapse).

The classifier's own held-out accuracy on the real images is reported beside them, so a weak
classifier shows as one. Images are the model's preprocessing of the folder (data shape).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from . import require
from .probe import encode_labelled

CONFIDENCE = 0.9


def fit_classifier(pixels: np.ndarray, labels: np.ndarray, seed: int = 0):
    """(fitted classifier, held-out accuracy on a stratified quarter)."""
    require("sklearn", "the generation score")
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    def classifier():
        return make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000, random_state=seed))

    counts = np.unique(labels, return_counts=True)[1]
    accuracy = None
    if len(counts) > 1 and counts.min() >= 2:
        train_x, test_x, train_y, test_y = train_test_split(pixels, labels, test_size=0.25, stratify=labels,
                                                            random_state=seed)
        accuracy = float(classifier().fit(train_x, train_y).score(test_x, test_y))
    return classifier().fit(pixels, labels), accuracy


def score_samples(classifier, samples: np.ndarray) -> dict:
    probs = classifier.predict_proba(samples)
    predicted = classifier.classes_[probs.argmax(1)]
    classes = list(classifier.classes_)
    histogram = np.array([(predicted == c).sum() for c in classes], dtype=float) / len(predicted)
    nonzero = histogram[histogram > 0]
    return {
        "samples": int(len(samples)),
        "confident": float((probs.max(1) > CONFIDENCE).mean()),
        "class_entropy": float(-(nonzero * np.log(nonzero)).sum()),
        "max_entropy": math.log(len(classes)),
        "predicted_classes": {str(c): float(h) for c, h in zip(classes, histogram)},
    }


@torch.no_grad()
def generation_score(ctx, labelled_root, n: int = 500, seed: int = 0, device="cpu", batch: int = 100,
                     with_classifier: bool = False) -> dict:
    """The score of ``n`` prior samples of ``ctx.vae`` (from its fitted prior when it has one:
    "prior" says which) against the labelled folder's classifier (also the fitted classifier
    itself, as "fitted", with ``with_classifier``)."""
    _, pixels, labels = encode_labelled(ctx, labelled_root, device=device)
    classifier, accuracy = fit_classifier(pixels, labels, seed)
    generator = torch.Generator(device=device).manual_seed(seed)
    samples = torch.cat([ctx.vae.sample_prior(min(batch, n - start), generator=generator).flatten(1).double().cpu()
                         for start in range(0, n, batch)]).numpy()
    result = {"classifier_accuracy": accuracy, "classes": len(np.unique(labels)),
              "prior": "fitted" if ctx.vae.fitted_prior is not None else "model", **score_samples(classifier, samples)}
    return {**result, "fitted": classifier} if with_classifier else result
