"""Conditional and semi-supervised models on the 16 px digits: the two figures of the
conditional-latents work, from one run.

Data: scikit-learn's digits at 16 px grey (scripts/make_digits.py, 25% held out).

- conditional generation score of configs/digits_cond.toml (a conditional VAE: the label
  enters the encoder and the decoder): 100 prior samples per class, classified by a logistic
  regression fitted on the real training images; the score of class c is the fraction
  classified as c (goal: at least 0.9 on average).
- class accuracy of configs/digits_m2.toml (a mixed latent whose class part is supervised
  on 10% of the training labels, per class, seeded by train.seed) on the held-out digits,
  next to a logistic regression on the pixels of the same 10% of labelled images, and one on
  all the training labels (the ceiling of the pixel classifier); and the same conditional
  generation score for it (its samples drawn with the class variable set).

    python bench/bench_conditional.py [--steps 1500] [--threads 2]

Prints a Markdown table and writes it to bench/results/conditional.md.
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import load_text, start

ROOT = Path(__file__).resolve().parents[1]


def make_digits(out: Path) -> tuple[Path, Path]:
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_digits.py"), str(out), "--holdout", "0.25"],
                   check=True, stdout=subprocess.DEVNULL)
    return out / "train", out / "test"


def train(config: str, data: Path, run: Path, steps: int) -> float:
    from flexvae.config import load_config
    from flexvae.train.trainer import Trainer

    path = ROOT / "configs" / config
    cfg = load_config(path, [f"data.path={data}", f"train.out_dir={run}", f"train.max_steps={steps}",
                             f"train.save_every={steps}", f"train.sample_every={steps}", "train.device=cpu"])
    tick = time.perf_counter()
    Trainer(cfg, path, quiet=True).train()
    return time.perf_counter() - tick


def pixels(root: Path, fraction: float = 1.0, seed: int = 0):
    """(pixels, labels) of a labelled folder; with ``fraction`` only the images whose label a run
    with data.label_fraction = fraction and train.seed = seed keeps."""
    from flexvae.data import ImageFolder
    from flexvae.data.labels import read_labels

    dataset = ImageFolder(root, channels=1, image_size=16)
    labels = read_labels("folders", dataset.relpaths, root, fraction=fraction, seed=seed)
    keep = [i for i in range(len(dataset)) if int(labels.indices[i]) >= 0]
    x = np.stack([dataset[i]["image"].flatten().numpy() for i in keep]).astype(np.float64)
    return x, np.array([labels.classes[int(labels.indices[i])] for i in keep])


def logistic(train_x, train_y, test_x, test_y) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000, random_state=0))
    return float(model.fit(train_x, train_y).score(test_x, test_y))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    start("bench_conditional", args.threads)
    from flexvae.analysis.conditional import class_accuracy, conditional_score
    from flexvae.analysis.generation import fit_classifier
    from flexvae.checkpoint import load_run
    from flexvae.config import load_config

    started = time.perf_counter()
    load_start = load_text()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        train_dir, test_dir = make_digits(tmp / "digits")
        train_x, train_y = pixels(train_dir)
        test_x, test_y = pixels(test_dir)
        classifier, classifier_accuracy = fit_classifier(train_x, train_y, seed=0, data_shape=(1, 16, 16))

        seconds = train("digits_cond.toml", train_dir, tmp / "cond", args.steps)
        cond = conditional_score(load_run(tmp / "cond"), train_dir, n=100, seed=0, classifier=classifier)
        worst = min(cond["per_class"], key=cond["per_class"].get)
        rows.append(("digits_cond.toml", "class-c samples classified as c (mean of 10 classes, 100 each)",
                     f"{cond['mean']:.3f} (worst: {worst}, {cond['per_class'][worst]:.2f})", f"{seconds:.0f}"))

        m2_cfg = load_config(ROOT / "configs" / "digits_m2.toml")
        fraction, seed = m2_cfg.data.label_fraction, m2_cfg.train.seed
        seconds = train("digits_m2.toml", train_dir, tmp / "m2", args.steps)
        accuracy = class_accuracy(load_run(tmp / "m2"), test_dir)
        few_x, few_y = pixels(train_dir, fraction, seed)
        rows.append(("digits_m2.toml", f"class accuracy on the held-out digits ({len(few_y)} training labels)",
                     f"{accuracy['accuracy']:.3f}", f"{seconds:.0f}"))
        m2 = conditional_score(load_run(tmp / "m2"), train_dir, n=100, seed=0, classifier=classifier)
        worst = min(m2["per_class"], key=m2["per_class"].get)
        rows.append(("digits_m2.toml", "class-c samples classified as c (mean of 10 classes, 100 each)",
                     f"{m2['mean']:.3f} (worst: {worst}, {m2['per_class'][worst]:.2f})", ""))
        rows.append(("logistic regression", f"pixels of the same {len(few_y)} labelled images",
                     f"{logistic(few_x, few_y, test_x, test_y):.3f}", ""))
        rows.append(("logistic regression", f"pixels of all {len(train_y)} training images",
                     f"{logistic(train_x, train_y, test_x, test_y):.3f}", ""))

    lines = ["| model | figure | value | train s |", "|---|---|---|---|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    load_end = load_text()
    footer = (f"\n{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} threads, "
              f"{load_start} at the start and {load_end} at the end; {args.steps} steps each; "
              f"the scoring classifier's held-out accuracy on real digits {classifier_accuracy:.3f}; "
              f"total {time.perf_counter() - started:.0f} s")
    table = "\n".join(lines) + "\n" + footer + "\n"
    print(table)
    out = ROOT / "bench" / "results" / "conditional.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("# Conditional and semi-supervised digits (bench/bench_conditional.py)\n\n" + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
