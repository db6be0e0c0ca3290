"""A hierarchy against flat VAEs on the 16 px digits: likelihood, active units per group, the
generation score, and the training step time.

Models (the same data, seed, batches and steps; configs/digits_hvae.toml's training settings):
    hvae         configs/digits_hvae.toml: a 4x4x4 top latent and two decoder groups (Z tokens)
    flat-same    the same encoder and decoder with the Keep and Z tokens left out: a flat
                 VAE of the same convolutions (fewer parameters)
    flat-size    flat-same with a residual block (VAERB_?_32) where each Z token was: a flat
                 VAE of about the hierarchy's size (the step-time reference of the goal)
    flat-digits  configs/digits.toml (a 10-d latent and small MLP ends), at its own settings

Columns: parameters, held-out PSNR, NLL in bits/dim (importance-sampled with every group drawn
from its posterior, 20 samples, each model's own likelihood), KL in nats per image, active
units per group (Cov_x E[z_u] > 0.01), and the generation score of 500 prior samples (the
fraction a logistic regression of the real digits classifies with p > 0.9, and the entropy of
the predicted classes). Step time: ``Trainer.step_once`` on one in-memory batch, hvae,
flat-size and flat-same alternating in rounds (ABC, CBA, ...); the ratio of the median step
times, min..max of the per-round ratios.

    python bench/bench_hvae.py [--steps 1500] [--threads 2] [--rounds 6] [--round-steps 20]

Prints Markdown tables and writes them to bench/results/hvae.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import interleaved, load_text, ratio_of_medians, start

ROOT = Path(__file__).resolve().parents[1]


def flat_version(path: Path, instead_of_z: str | None = None) -> list[str]:
    """A structure file's tokens without its Keep tokens and with each Z token left out or
    replaced by ``instead_of_z``."""
    tokens = []
    for token in json.loads(path.read_text()):
        kind = token.split("_")[0]
        if kind == "Z" and instead_of_z:
            tokens.append(instead_of_z)
        elif kind not in ("Keep", "Z"):
            tokens.append(token)
    return tokens


def configs(data: Path, steps: int, run: Path) -> dict:
    common = [f"data.path={data}", f"train.max_steps={steps}", f"train.save_every={steps}",
              f"train.sample_every={steps}", "train.device=cpu"]
    structures = ROOT / "structures"
    encoder = f"model.encoder={json.dumps(flat_version(structures / 'digits_hvae_encoder.json'))}"
    same = [encoder, f"model.decoder={json.dumps(flat_version(structures / 'digits_hvae_decoder.json'))}"]
    size = [encoder, f"model.decoder={json.dumps(flat_version(structures / 'digits_hvae_decoder.json', 'VAERB_?_32'))}"]
    return {
        "hvae": (ROOT / "configs" / "digits_hvae.toml", common + [f"train.out_dir={run / 'hvae'}"]),
        "flat-same": (ROOT / "configs" / "digits_hvae.toml", common + same + [f"train.out_dir={run / 'same'}"]),
        "flat-size": (ROOT / "configs" / "digits_hvae.toml", common + size + [f"train.out_dir={run / 'size'}"]),
        "flat-digits": (ROOT / "configs" / "digits.toml", common + [f"train.out_dir={run / 'digits'}"]),
    }


def evaluate(run: Path, test: Path, train: Path) -> dict:
    from flexvae.analysis.common import image_dataset, image_loader
    from flexvae.analysis.evaluate import evaluate_model
    from flexvae.analysis.generation import generation_score
    from flexvae.checkpoint import load_run

    model = load_run(run)
    loader = image_loader(image_dataset(model, str(test), model.cfg), 64, "cpu", 0)
    result = evaluate_model(model.vae, loader, nll_samples=20, seed=0)
    result["generation"] = generation_score(model, train, n=500, seed=0)
    result["params"] = sum(p.numel() for p in model.vae.parameters())
    return result


def active(result: dict) -> str:
    if "groups" in result:
        return ", ".join(f"{name} {g['active_units']}/{g['units']}" for name, g in result["groups"].items())
    au = result["active_units"]
    return f"top {au['elements']}/{au['of_elements']}"


def kl_total(result: dict) -> float:
    if "groups" in result:
        return sum(g["kl_nats"] for g in result["groups"].values())
    return result["kl"]["total_nats"]


def step_times(config_items, rounds: int, round_steps: int) -> dict:
    """Seconds per step of each model, alternating in rounds on one in-memory batch."""
    from flexvae.config import load_config
    from flexvae.data import sample_images
    from flexvae.train.trainer import Trainer

    trainers = {}
    for name, (path, overrides) in config_items:
        trainer = Trainer(load_config(path, overrides), path, quiet=True)
        dataset, _ = trainer._loader()
        images = sample_images(dataset, trainer.cfg.train.batch_size, 0)
        trainers[name] = (trainer, images)
        trainer.model.train()
        for _ in range(3):  # warm-up
            trainer.step_once([images])
    steps = {name: (lambda t=trainer, i=images: t.step_once([i])) for name, (trainer, images) in trainers.items()}
    series = interleaved(steps, rounds, per_round=round_steps)
    found = {name: one.median for name, one in series.items()}
    for reference in ("flat-size", "flat-same"):
        ratio = ratio_of_medians(series["hvae"], series[reference])
        found[f"vs {reference}"] = (ratio.value, ratio.low, ratio.high)
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--round-steps", type=int, default=20)
    args = parser.parse_args()
    start("bench_hvae", args.threads)
    load_start = load_text()
    from flexvae.config import load_config
    from flexvae.train.trainer import Trainer

    started = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        subprocess.run([sys.executable, str(ROOT / "scripts" / "make_digits.py"), str(tmp / "digits"),
                        "--holdout", "0.25"], check=True, stdout=subprocess.DEVNULL)
        train, test = tmp / "digits" / "train", tmp / "digits" / "test"
        items = configs(train, args.steps, tmp / "runs")
        for name, (path, overrides) in items.items():
            tick = time.perf_counter()
            Trainer(load_config(path, overrides), path, quiet=True).train()
            seconds = time.perf_counter() - tick
            run = Path(load_config(path, overrides).train.out_dir)
            result = evaluate(run, test, train)
            rows.append((name, result, seconds))
            print(f"{name}: {seconds:.0f} s", file=sys.stderr, flush=True)
        timing_items = [(n, (p, o + [f"train.out_dir={tmp / 'timing' / n}"])) for n, (p, o) in items.items()
                        if n in ("hvae", "flat-size", "flat-same")]
        timing = step_times(timing_items, args.rounds, args.round_steps)

    lines = ["| model | parameters | PSNR | NLL bits/dim | KL nats | active units | prior p>0.9 | class entropy | train s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r, seconds in rows:
        gen = r["generation"]
        lines.append(f"| {name} | {r['params']:,} | {r['reconstruction']['psnr']:.2f} | "
                     f"{r['nll']['bits_per_dim']:.3f} | {kl_total(r):.1f} | {active(r)} | {gen['confident']:.2f} | "
                     f"{gen['class_entropy']:.2f} of {gen['max_entropy']:.2f} | {seconds:.0f} |")
    lines += ["", f"Step time, {args.rounds} rounds x {args.round_steps} steps of batch 64 (median s per step; "
              "ratio of medians, min..max of the rounds' medians):", "",
              "| hvae | flat-size | flat-same | hvae / flat-size | hvae / flat-same |", "|---|---|---|---|---|",
              f"| {timing['hvae']:.4f} | {timing['flat-size']:.4f} | {timing['flat-same']:.4f} | "
              + " | ".join(f"{r:.3f} ({lo:.3f}..{hi:.3f})" for r, lo, hi in (timing["vs flat-size"], timing["vs flat-same"]))
              + " |"]
    footer = (f"\n{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} threads, "
              f"{load_start} at the start and {load_text()} at the end; {args.steps} steps each; "
              f"total {time.perf_counter() - started:.0f} s")
    table = "\n".join(lines) + "\n" + footer + "\n"
    print(table)
    out = ROOT / "bench" / "results" / "hvae.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("# A hierarchy against flat VAEs on the digits (bench/bench_hvae.py)\n\n" + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
