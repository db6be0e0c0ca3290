"""Samples from the model's prior N(0, I) against samples from a prior fitted after training
(fitted_prior.py), on the 16 px digits, from one run.

configs/digits.toml is trained once (train.fit_prior off); its checkpoint then draws 1,000
samples from each prior. Scored against the held-out digits:

- Frechet distance in the first 30 principal components of the training digits' pixels
  (0 would be the held-out digits' own statistics; a random half of the training digits
  shows the floor a finite sample gives);
- the repository's generation score: a logistic regression of the training pixels, the share
  of samples it classifies with p > 0.9 and the entropy of its class histogram (log2 10 = 3.32
  bits for ten classes in equal shares).

Uniform noise is scored too: a score that noise passes is no score (the confident share is
one; the Frechet distance and the class entropy are not fooled). This is a first bench of
priors: the judge network, FID, learned priors and flows are not in it yet.

    python bench/bench_priors.py [--steps 1500] [--threads 2]

Prints a Markdown table and writes it to bench/results/priors.md.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_conditional import make_digits, pixels, train  # noqa: E402


def frechet(features_a: np.ndarray, features_b: np.ndarray) -> float:
    from scipy import linalg

    mean_a, mean_b = features_a.mean(0), features_b.mean(0)
    cov_a, cov_b = np.cov(features_a, rowvar=False), np.cov(features_b, rowvar=False)
    root, _ = linalg.sqrtm(cov_a @ cov_b, disp=False)
    return float(((mean_a - mean_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root.real))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--samples", type=int, default=1000)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from sklearn.decomposition import PCA

    from flexvae.analysis.generation import fit_classifier, score_samples
    from flexvae.checkpoint import load_run
    from flexvae.fitted_prior import fit_prior

    started = time.perf_counter()
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        train_dir, test_dir = make_digits(tmp / "digits")
        train_x, train_y = pixels(train_dir)
        test_x, _ = pixels(test_dir)
        classifier, classifier_accuracy = fit_classifier(train_x, train_y, seed=0)
        pca = PCA(30, random_state=0).fit(train_x)
        seconds = train("digits.toml", train_dir, tmp / "run", args.steps)
        run = load_run(tmp / "run")
        tick = time.perf_counter()
        prior = fit_prior(run, train_dir, components=10, covariance="full", seed=0)
        fit_seconds = time.perf_counter() - tick
        run.vae.fitted_prior = prior
        rng = np.random.default_rng(0)
        half = train_x[rng.permutation(len(train_x))[: len(train_x) // 2]]
        sets = {"N(0, I), the model's prior": run.vae.sample_prior(args.samples, generator=torch.Generator().manual_seed(0),
                                                                   prior="model"),
                "fitted: 10-component full-covariance mixture": run.vae.sample_prior(
                    args.samples, generator=torch.Generator().manual_seed(0), prior="fitted"),
                "uniform noise": torch.from_numpy(rng.uniform(-1, 1, (args.samples, train_x.shape[1]))),
                "a random half of the training digits": torch.from_numpy(half)}
        rows = []
        for name, images in sets.items():
            values = images.flatten(1).double().numpy()
            score = score_samples(classifier, values)
            rows.append((name, f"{frechet(pca.transform(test_x), pca.transform(values)):.2f}",
                         f"{score['confident']:.3f}", f"{score['class_entropy'] / math.log(2):.2f}"))
    lines = ["| samples | Frechet distance (PCA-30 of pixels) | confident (p > 0.9) | class entropy (bits) |",
             "|---|---|---|---|"] + ["| " + " | ".join(row) + " |" for row in rows]
    load_end = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    footer = (f"\nconfigs/digits.toml, {args.steps} steps ({seconds:.0f} s), prior fitted in {fit_seconds:.1f} s on "
              f"{prior.meta['images']} training digits; {args.samples} samples each against "
              f"{len(test_x)} held-out digits; the classifier's held-out accuracy on real digits "
              f"{classifier_accuracy:.3f}. {platform.processor() or platform.machine()}, torch {torch.__version__}, "
              f"{args.threads} threads, load average {load_start:.2f} at the start and {load_end:.2f} at the end; "
              f"total {time.perf_counter() - started:.0f} s")
    table = "\n".join(lines) + "\n" + footer + "\n"
    print(table)
    out = ROOT / "bench" / "results" / "priors.md"
    out.write_text("# The model's prior against a fitted prior (bench/bench_priors.py)\n\n" + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
