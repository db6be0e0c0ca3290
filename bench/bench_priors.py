"""Priors side by side: learned priors (trained with the model) and fitted priors (fitted after
training), on the 16 px digits and on the bundled photos, from one run of this script.

Digits: configs/digits.toml is trained once per learned prior (model.prior = Normal, MoG, Vamp,
Flow; train.fit_prior off); the Normal model also gets a fitted 10-component Gaussian mixture and
a fitted RealNVP flow. Each prior draws 1,000 samples, scored against the held-out digits by the
judge (analysis/judge.py: a CNN trained on the training digits; its held-out accuracy is printed):
Frechet distance in its features, precision and recall (k = 3), the share it classifies with
p > 0.9 and the entropy of its class histogram (log2 10 = 3.32 bits). -ELBO: nats per held-out
image, one latent sample each (the learned priors' KL is the Monte Carlo estimate). PCA with 10
components is the linear-Gaussian model (samples: the mean plus N(0, its variances) along its
components). Uniform noise and a random half of the training digits bound the scale.

Photos: the default config (configs/config.toml) on assets/photos; a classifier two-sample test
of as many prior samples as photos against the photos' reconstructions (trained on a random half
of each, tested on the other half; the mean over --seeds splits; 0.5: it cannot tell them apart), for N(0, I), a fitted mixture and a fitted flow, and for uniform noise.

pythae (an optional bench dependency, pip install pythae): its VAE (sum-of-squares reconstruction,
KL to N(0, I)) on the same networks (digits.toml's encoder and decoder, built by flexvae and
wrapped as pythae's encoder and decoder), the same steps, batch and learning rate, with its
normal, Gaussian-mixture (10 components) and MAF samplers. Without pythae its rows are left out.

    python bench/bench_priors.py [--steps 1500] [--photo-steps 600] [--threads 2]

Prints Markdown tables and writes them to bench/results/priors.md.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import load_text, start

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_conditional import make_digits, pixels  # noqa: E402

LEARNED = {"N(0, I)": "Normal", "learned mixture (MoG_components=10)": "MoG_components=10",
           "VampPrior (Vamp_components=50)": "Vamp_components=50", "learned flow (Flow)": "Flow"}


def train(config: Path, data: Path, run: Path, steps: int, *overrides) -> float:
    from flexvae.config import load_config
    from flexvae.train.trainer import Trainer

    cfg = load_config(config, [f"data.path={data}", f"train.out_dir={run}", f"train.max_steps={steps}",
                               f"train.save_every={steps}", f"train.sample_every={steps}", "train.device=cpu",
                               "data.num_workers=0", "train.fit_prior=0", *overrides])
    tick = time.perf_counter()
    Trainer(cfg, config, quiet=True).train()
    return time.perf_counter() - tick


def neg_elbo(run, folder) -> float:
    from flexvae.analysis.common import image_dataset, image_loader
    from flexvae.analysis.evaluate import objective_terms
    from flexvae.objective import Objective

    objective = Objective.from_config(run.cfg, run.data_shape, setup=False)
    loader = image_loader(image_dataset(run, str(folder), run.cfg), 256, "cpu", 0)
    terms = objective_terms(run.vae.eval(), objective, loader, "cpu", seed=0)
    return terms["nll"] + terms["kl"]


def draw(vae, n: int, prior: str) -> np.ndarray:
    return vae.sample_prior(n, generator=torch.Generator().manual_seed(0), prior=prior).float().numpy()


def pythae_rows(train_images: np.ndarray, steps: int, samples: int) -> list:
    """(name, None, samples in [-1, 1]) of pythae's VAE on digits.toml's networks, or [] without pythae."""
    try:
        from pythae.data.datasets import DatasetOutput
        from pythae.models import VAE, VAEConfig
        from pythae.models.base.base_utils import ModelOutput
        from pythae.models.nn import BaseDecoder, BaseEncoder
        from pythae.samplers import (GaussianMixtureSampler, GaussianMixtureSamplerConfig, MAFSampler,
                                     MAFSamplerConfig, NormalSampler)
        from pythae.trainers import BaseTrainerConfig
    except ImportError:
        return []
    from flexvae.assemble import model_from_config
    from flexvae.config import load_config

    cfg = load_config(ROOT / "configs" / "digits.toml", ["train.device=cpu"])
    torch.manual_seed(0)
    nets, _ = model_from_config(cfg, ROOT / "configs" / "digits.toml")
    shape = nets.latent_shape

    class Encoder(BaseEncoder):
        def __init__(self):
            super().__init__()
            self.net = nets

        def forward(self, x):
            q = self.net.encode(x)
            return ModelOutput(embedding=q.mean.flatten(1), log_covariance=q.logvar.flatten(1))

    class Decoder(BaseDecoder):
        def __init__(self):
            super().__init__()
            self.net = nets

        def forward(self, z):
            return ModelOutput(reconstruction=self.net.decode(z.view(-1, *shape)))

    data = torch.from_numpy((train_images + 1) / 2).float()  # pythae takes [0, 1]
    model = VAE(VAEConfig(input_dim=tuple(data.shape[1:]), latent_dim=int(np.prod(shape)), reconstruction_loss="mse"),
                encoder=Encoder(), decoder=Decoder())
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.train.lr)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        rows = torch.randint(0, len(data), (cfg.train.batch_size,), generator=generator)
        loss = model(DatasetOutput(data=data[rows])).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    torch.manual_seed(0)
    rows = []
    normal = NormalSampler(model)
    rows.append(("pythae VAE, normal sampler", normal.sample(num_samples=samples, return_gen=True)))
    gmm = GaussianMixtureSampler(model, GaussianMixtureSamplerConfig(n_components=10))
    gmm.fit(data)
    rows.append(("pythae VAE, Gaussian-mixture sampler (10)", gmm.sample(num_samples=samples, return_gen=True)))
    with tempfile.TemporaryDirectory() as out:
        maf = MAFSampler(model, MAFSamplerConfig())
        maf.fit(data, training_config=BaseTrainerConfig(output_dir=out, num_epochs=100, learning_rate=1e-3))
        rows.append(("pythae VAE, MAF sampler", maf.sample(num_samples=samples, return_gen=True)))
    return [(name, None, images.detach().numpy() * 2 - 1) for name, images in rows]


def digits(args, tmp: Path, lines: list) -> None:
    from sklearn.decomposition import PCA

    from flexvae.analysis.judge import sample_scores, train_judge
    from flexvae.checkpoint import load_run
    from flexvae.fitted_prior import fit_prior

    train_dir, test_dir = make_digits(tmp / "digits")
    train_x, train_y = pixels(train_dir)
    test_x, _ = pixels(test_dir)
    real, held = train_x.reshape(-1, 1, 16, 16).astype(np.float32), test_x.reshape(-1, 1, 16, 16).astype(np.float32)
    judge = train_judge(real, train_y, seed=0)
    rows, seconds = [], {}
    config = ROOT / "configs" / "digits.toml"
    for name, token in LEARNED.items():
        seconds[name] = train(config, train_dir, tmp / token, args.steps, f"model.prior={token}")
        run = load_run(tmp / token)
        rows.append((name, neg_elbo(run, test_dir), draw(run.vae, args.samples, "model")))
        if token == "Normal":
            normal = run
    for label, density in (("fitted mixture (10 components)", "mixture"), ("fitted flow", "flow")):
        tick = time.perf_counter()
        normal.vae.fitted_prior = fit_prior(normal, train_dir, components=10, covariance="full", seed=0,
                                            density=density)
        seconds[label] = time.perf_counter() - tick
        rows.append((f"{label} on the N(0, I) model", None, draw(normal.vae, args.samples, "fitted")))
    tick = time.perf_counter()
    found = pythae_rows(real, args.steps, args.samples)
    if found:
        seconds["pythae"] = time.perf_counter() - tick
    rows += found or [("pythae: not installed (pip install pythae), its rows left out", None, None)]
    rng = np.random.default_rng(0)
    pca = PCA(10, random_state=0).fit(train_x)
    z = rng.normal(size=(args.samples, 10)) * np.sqrt(pca.explained_variance_)
    rows.append(("PCA, 10 components (linear-Gaussian)", None, pca.inverse_transform(z).reshape(-1, 1, 16, 16)))
    rows.append(("uniform noise", None, rng.uniform(-1, 1, (args.samples, 1, 16, 16))))
    rows.append(("a random half of the training digits", None, real[rng.permutation(len(real))[: len(real) // 2]]))
    lines += ["## Digits (configs/digits.toml, held-out digits)", "",
              "| samples | -ELBO (nats) | Frechet (judge) | precision | recall | confident (p > 0.9) | class entropy (bits) |",
              "|---|---|---|---|---|---|---|"]
    for name, elbo, images in rows:
        if images is None:
            lines.append(f"| {name} | | | | | | |")
            continue
        s = sample_scores(judge, held, np.clip(images, -1, 1).astype(np.float32))
        lines.append(f"| {name} | {'' if elbo is None else f'{elbo:.1f}'} | {s['frechet']:.2f} | {s['precision']:.3f} | "
                     f"{s['recall']:.3f} | {s['confident']:.3f} | {s['class_entropy_bits']:.2f} |")
    lines += ["", f"{args.steps} steps each ({', '.join(f'{k}: {v:.0f} s' for k, v in seconds.items())}); "
              f"{args.samples} samples each against {len(held)} held-out digits; the judge's held-out accuracy "
              f"{judge.accuracy:.3f}.", ""]


def photos(args, tmp: Path, lines: list) -> None:
    from flexvae.analysis.judge import two_sample_test
    from flexvae.analysis.sample_checks import gather
    from flexvae.analysis.common import image_dataset, image_loader
    from flexvae.checkpoint import load_run
    from flexvae.fitted_prior import fit_prior

    config = ROOT / "configs" / "config.toml"
    seconds = train(config, ROOT / "assets" / "photos", tmp / "photos", args.photo_steps)
    run = load_run(tmp / "photos")
    _, recons = gather(run.vae.eval(), image_loader(image_dataset(run, None, run.cfg), 64, "cpu", 0), "cpu")
    n = len(recons)  # as many samples as photos: no image is in both halves of a test
    sets = {"N(0, I)": draw(run.vae, n, "model")}
    for label, density in (("fitted mixture (10 components)", "mixture"), ("fitted flow", "flow")):
        run.vae.fitted_prior = fit_prior(run, None, components=10, seed=0, density=density)
        sets[label] = draw(run.vae, n, "fitted")
    sets["uniform noise"] = np.random.default_rng(0).uniform(-1, 1, sets["N(0, I)"].shape).astype(np.float32)
    lines += ["## Photos (configs/config.toml on assets/photos)", "",
              f"| prior samples | told from reconstructions (mean of {args.seeds} splits) | min..max |", "|---|---|---|"]
    for name, images in sets.items():
        accuracies = [two_sample_test(torch.from_numpy(images), recons, seed=s) for s in range(args.seeds)]
        lines.append(f"| {name} | {np.mean(accuracies):.3f} | {min(accuracies):.3f}..{max(accuracies):.3f} |")
    lines += ["", f"{args.photo_steps} steps ({seconds:.0f} s); the {n} photos' reconstructions (posterior means) "
              f"against {n} prior samples, each split in halves (train, test) at random {args.seeds} times.", ""]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--photo-steps", type=int, default=600)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--seeds", type=int, default=10, help="photos: random splits of the two-sample test")
    args = parser.parse_args()
    start("bench_priors", args.threads)
    started = time.perf_counter()
    load_start = load_text()
    lines: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        digits(args, Path(tmp), lines)
        photos(args, Path(tmp), lines)
    load_end = load_text()
    lines.append(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} threads, "
                 f"{load_start} at the start and {load_end} at the end; total "
                 f"{time.perf_counter() - started:.0f} s")
    text = "\n".join(lines) + "\n"
    print(text)
    (ROOT / "bench" / "results" / "priors.md").write_text("# Priors (bench/bench_priors.py)\n\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
