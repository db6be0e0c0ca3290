"""Model quality by objective and data: held-out reconstruction, likelihood, active units and
a generation score, beside PCA with as many dimensions as the latent.

Data (both offline):
    photos  the bundled 32 px crops (assets/photos: chelsea / coffee, 28 each); the last 4
            of each class are held out; the class is the generation score's label
    digits  scikit-learn's digits at 16 px grey (scripts/make_digits.py, 25% held out)

Objectives (the same structures, seed, batches and steps per data set):
    weighted       the original formula and the old default: mse + 1e-4 * per-element KL
    elbo-trap      the textbook ELBO written with the original formula: mean mse + 1 * KL sum
    elbo-sigma     loss.objective = elbo, gaussian with the optimal (calibrated) sigma, kl_weight 1
    elbo-learned   elbo, gaussian with a learned per-channel sigma, kl_weight 1
    elbo-bernoulli elbo, bernoulli likelihood, kl_weight 1 (digits only: near-binary images)

Columns: held-out PSNR and SSIM (posterior mean), NLL in bits/dim (importance-sampled, 20
samples, each model's own likelihood; the weighted models use sigma = sqrt(MSE)), KL in nats
per image, active units (Cov_x E[z_u] > 0.01), and the generation score of 500 prior
samples: the fraction a logistic-regression classifier of the real labelled images gives
p > 0.9, and the entropy of the predicted classes (nats; max log K).

    python bench/bench_quality.py [--steps-photos 600] [--steps-digits 1500] [--threads 2]

Prints a Markdown table and writes it to bench/results/quality.md.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import load_text, start

ROOT = Path(__file__).resolve().parents[1]

OBJECTIVES = {
    "weighted": [],
    "elbo-trap": ["loss.kl_reduction=sum", "loss.kl_weight=1"],
    "elbo-sigma": ["loss.objective=elbo", "loss.scale=optimal", "loss.kl_weight=1"],
    "elbo-learned": ["loss.objective=elbo", "loss.scale=channel", "loss.kl_weight=1"],
    "elbo-bernoulli": ["loss.objective=elbo", "loss.likelihood=bernoulli", "loss.kl_weight=1"],
}
DATA = {"photos": ["elbo-bernoulli"], "digits": []}  # objectives left out per data set


def split_photos(out: Path) -> tuple[Path, Path]:
    for name in ("chelsea", "coffee"):
        files = sorted((ROOT / "assets" / "photos" / name).glob("*.png"))
        for i, path in enumerate(files):
            target = out / ("test" if i >= len(files) - 4 else "train") / name / path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, target)
    return out / "train", out / "test"


def make_digits(out: Path) -> tuple[Path, Path]:
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_digits.py"), str(out), "--holdout", "0.25"],
                   check=True, stdout=subprocess.DEVNULL)
    return out / "train", out / "test"


def base_overrides(data: str, train: Path, steps: int, run: Path) -> tuple[Path, list[str]]:
    common = [f"data.path={train}", f"train.out_dir={run}", f"train.max_steps={steps}", "data.num_workers=0",
              "train.device=cpu", f"train.save_every={steps}", f"train.sample_every={steps}"]
    config = ROOT / "configs" / ("digits.toml" if data == "digits" else "config.toml")
    # every objective starts from the built-in loss settings of the original formula
    reset = ["loss.objective=weighted", "loss.scale=learned", "loss.kl_weight=0.0001", "loss.recon=mse",
             "loss.kl_reduction=mean"]
    return config, common + reset


def pca_row(train: Path, test: Path, shape, dims: int) -> dict:
    from flexvae.data import open_dataset
    from flexvae.metrics import psnr, ssim

    def load(root):
        dataset = open_dataset("folder", root, train=False, channels=shape[0], image_size=shape[1])
        return torch.stack([dataset[i]["image"] for i in range(len(dataset))]).double()

    x_train, x_test = load(train), load(test)
    flat = x_train.flatten(1)
    mean = flat.mean(0)
    _, _, v = torch.linalg.svd(flat - mean, full_matrices=False)
    basis = v[:min(dims, v.shape[0])]
    recon = ((x_test.flatten(1) - mean) @ basis.T @ basis + mean).view_as(x_test).clamp(-1, 1).float()
    return {"psnr": float(psnr(recon, x_test.float()).mean()), "ssim": float(ssim(recon, x_test.float()).mean()),
            "dims": basis.shape[0]}


def evaluate_run(run: Path, test: Path, train: Path) -> dict:
    from flexvae.analysis.common import image_dataset, image_loader
    from flexvae.analysis.evaluate import evaluate_model
    from flexvae.analysis.generation import generation_score
    from flexvae.checkpoint import load_run

    model = load_run(run)
    loader = image_loader(image_dataset(model, str(test), model.cfg), 64, "cpu", 0)
    result = evaluate_model(model.vae, loader, nll_samples=20, seed=0)
    result["generation"] = generation_score(model, train, n=500, seed=0)
    return result


def format_row(data: str, name: str, r: dict, seconds: float) -> str:
    if name == "PCA":
        return f"| {data} | PCA ({r['dims']} dims) | {r['psnr']:.2f} | {r['ssim']:.3f} | | | | | | |"
    nll, gen, au = r.get("nll", {}), r["generation"], r["active_units"]
    return (f"| {data} | {name} | {r['reconstruction']['psnr']:.2f} | {r['reconstruction']['ssim']:.3f} | "
            f"{nll.get('bits_per_dim', float('nan')):.3f} | {r['kl']['total_nats']:.1f} | "
            f"{au['elements']}/{au['of_elements']} | {gen['confident']:.2f} | "
            f"{gen['class_entropy']:.2f} of {gen['max_entropy']:.2f} | {seconds:.0f} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps-photos", type=int, default=600)
    parser.add_argument("--steps-digits", type=int, default=1500)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", default="", help="comma-separated objectives")
    args = parser.parse_args()
    start("bench_quality", args.threads)
    from flexvae.config import load_config
    from flexvae.train.trainer import Trainer

    only = set(filter(None, args.only.split(",")))
    rows = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for data, skipped in DATA.items():
            train, test = split_photos(tmp / "photos") if data == "photos" else make_digits(tmp / "digits")
            steps = args.steps_photos if data == "photos" else args.steps_digits
            dims = None
            for name, overrides in OBJECTIVES.items():
                if name in skipped or (only and name not in only):
                    continue
                run = tmp / "runs" / f"{data}-{name}"
                config, base = base_overrides(data, train, steps, run)
                cfg = load_config(config, base + overrides)
                tick = time.perf_counter()
                Trainer(cfg, config, quiet=True).train()
                seconds = time.perf_counter() - tick
                result = evaluate_run(run, test, train)
                dims = int(np.prod(result["latent_shape"]))
                rows.append((data, name, result, seconds))
                print(f"{data} {name}: {seconds:.0f} s: " + format_row(data, name, result, seconds),
                      file=sys.stderr, flush=True)
            shape = tuple(result["data_shape"])
            rows.append((data, "PCA", pca_row(train, test, shape, dims), 0.0))

    header = ("data", "objective", "PSNR", "SSIM", "NLL bits/dim", "KL nats", "active units",
              "prior p>0.9", "class entropy", "train s")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += [format_row(*row) for row in rows]
    footer = (f"\n{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} threads, "
              f"{load_text()} at the end; {args.steps_photos} steps on photos, {args.steps_digits} "
              f"on digits; total {time.perf_counter() - started:.0f} s")
    table = "\n".join(lines) + "\n" + footer + "\n"
    print(table)
    out = ROOT / "bench" / "results" / "quality.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("# Model quality by objective (bench/bench_quality.py)\n\n" + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
