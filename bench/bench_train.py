"""Data-path benchmarks: do reading and writing files slow training and encoding down?

1. Training steps of the default config (configs/config.toml: small model, 32 px, batch 16) fed
   through the trainer's own data path (ImageFolder on assets/photos, StreamSampler,
   make_loader, Trainer._next_batch) against the same model, optimizer and train_step fed one
   pre-built in-memory batch. Blocks of steps alternate (loader, memory, memory, loader, ...)
   after a warm-up; the ratio is the median over adjacent block pairs of loader / memory
   throughput, so that load from other processes drifting over time cancels out (goal >= 0.90).
   Each num_workers setting is tried; the data path alone (batches/s with no training) is
   printed too.
2. ``-e`` end to end (encode_folder on assets/photos: reading, preprocessing, encoding and
   writing latent files and the manifest) against encode_latents alone on the same images
   already in memory, same batch size (goal >= 0.90).

    python bench/bench_train.py [--steps N] [--block N] [--workers 0,1,2] [--reps N] [--threads N]

Prints only; nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import warnings
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from common import finish, interleaved, load_text, start

REPO = Path(__file__).resolve().parents[1]
CONFIG = "configs/config.toml"


# ------------------------------------------------------------------ 1. training
def train_comparison(cfg, workers: int, steps: int, block: int, warmup: int, out_dir: str,
                     cache: str = "auto", config_path=CONFIG) -> dict:
    from flexvae.config import apply_overrides
    from flexvae.train.trainer import Trainer, random_flip, train_step

    cfg = apply_overrides(cfg, [f"data.num_workers={workers}", f"train.out_dir={out_dir}", f"data.cache={cache}"])
    tcfg = cfg.train
    trainer = Trainer(cfg, config_path, quiet=True)
    device = trainer.device
    dataset, loader = trainer._loader()
    cached = dataset.cache is not None
    batches = iter(loader)
    memory = torch.stack([dataset[i % len(dataset)]["image"] for i in range(tcfg.batch_size)]).to(device)
    trainer.model.train()

    def one_step(micro):
        micro = [random_flip(m, tcfg.seed, trainer.step) if cfg.data.flip else m for m in micro]
        train_step(trainer.model, micro, trainer.optimizer, cfg, trainer.step)
        trainer.scheduler.step()
        if trainer.ema is not None:
            trainer.ema.update(trainer.model)
        trainer.step += 1

    def from_loader():
        one_step([trainer._next_batch(batches)[0] for _ in range(tcfg.grad_accum)])

    def from_memory():
        one_step([memory] * tcfg.grad_accum)

    def block_of(step_fn):
        return lambda: [step_fn() for _ in range(block)]

    for _ in range(warmup):  # starts the workers, fills their prefetch queue, warms the allocator
        from_loader()
        from_memory()
    began = time.perf_counter()
    for _ in range(block):
        trainer._next_batch(batches)
    data_only = block / (time.perf_counter() - began)
    times = interleaved({"loader": block_of(from_loader), "memory": block_of(from_memory)},
                        max(1, steps // block), device)
    rates = {name: [block / t for t in series.all] for name, series in times.items()}
    del batches, loader  # stops the workers
    images_per_step = tcfg.batch_size * tcfg.grad_accum
    pairs = [r / m for r, m in zip(rates["loader"], rates["memory"])]
    return {
        "workers": workers, "steps": len(rates["loader"]) * block, "images_per_step": images_per_step,
        "loader": statistics.median(rates["loader"]), "memory": statistics.median(rates["memory"]),
        "ratio": statistics.median(pairs), "spread": (min(pairs), max(pairs)), "data_only": data_only,
        "cache": "on" if cached else "off",
    }


# ------------------------------------------------------------------ 2. encoding
def encode_comparison(cfg, reps: int, workers_list, out_root: Path) -> list[dict]:
    from flexvae.data import ImageFolder
    from flexvae.checkpoint import LoadedModel
    from flexvae.inference import encode_folder
    from flexvae.assemble import model_from_config

    device = torch.device(_device(cfg))
    model, plan = model_from_config(cfg, CONFIG, device=device)
    model.eval()
    ctx = LoadedModel(model, tuple(plan.data_shape), cfg.data.resize_filter, cfg.data.pad_to_square)
    folder = ImageFolder(cfg.data.path, channels=cfg.data.channels, image_size=cfg.data.image_size,
                         resize_filter=cfg.data.resize_filter, pad_to_square=cfg.data.pad_to_square)
    images = torch.stack([folder[i]["image"] for i in range(len(folder))]).to(device)
    count, batch_size = len(folder), cfg.encode.batch_size

    @torch.no_grad()
    def model_only() -> None:
        for first in range(0, count, batch_size):
            ctx.vae.encode_latents(images[first:first + batch_size]).float().cpu()

    results = []
    run = 0
    for workers in workers_list:
        def end_to_end() -> None:
            nonlocal run
            run += 1
            summary = encode_folder(ctx, cfg.data.path, out_root / f"latents_{run}", fmt=cfg.encode.format,
                                    batch_size=batch_size, num_workers=workers, device=str(device), progress=False)
            assert summary["encoded"] == count, summary

        # encode_folder starts no worker processes for a couple of batches' worth of images
        effective = 0 if count <= 2 * batch_size else workers

        end_to_end(), model_only()  # warm-up
        times = interleaved({"files": end_to_end, "model": model_only}, reps, device)
        rates = {name: [count / t for t in series.all] for name, series in times.items()}
        pairs = [f / m for f, m in zip(rates["files"], rates["model"])]
        results.append({"workers": workers, "effective_workers": effective, "images": count, "batch": batch_size,
                        "files": statistics.median(rates["files"]), "model": statistics.median(rates["model"]),
                        "ratio": statistics.median(pairs), "spread": (min(pairs), max(pairs))})
    return results


def _device(cfg) -> str:
    from flexvae.device import resolve_device

    return resolve_device(cfg.train.device)


# ------------------------------------------------------------------ main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=120, help="timed training steps per path and setting")
    parser.add_argument("--block", type=int, default=10, help="steps per timed block")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per path first")
    parser.add_argument("--workers", default="0,1,2", help="num_workers settings to try")
    parser.add_argument("--reps", type=int, default=7, help="timed encode runs per path and setting")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--config", default=CONFIG, help=f"the run config (default {CONFIG}; "
                        "configs/digits.toml after scripts/make_digits.py data/digits --holdout 0.25)")
    parser.add_argument("--cache", default="off,auto", help="data.cache settings to try")
    parser.add_argument("--skip-encode", action="store_true", help="only the training comparison")
    args = parser.parse_args()
    os.chdir(REPO)  # the config names its structures and images relative to the repository
    warnings.filterwarnings("ignore", message="skipping unreadable image")
    start("bench_train", args.threads)

    from flexvae.config import load_config

    cfg = load_config(args.config)
    workers_list = [int(w) for w in args.workers.split(",")]
    print(f"{platform.processor() or platform.machine()}, device {_device(cfg)}")
    print(f"config {args.config}: {cfg.data.image_size} px, batch {cfg.train.batch_size} x {cfg.train.grad_accum}, "
          f"images from {cfg.data.path}, default num_workers {cfg.data.num_workers}")
    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        print(f"\n1. Training throughput: trainer data path vs in-memory batch "
              f"({args.steps} steps each, blocks of {args.block}, alternating)")
        for cache in args.cache.split(","):
            for workers in workers_list:
                run_dir = str(Path(tmp) / f"run{workers}{cache}")
                r = train_comparison(cfg, workers, args.steps, args.block, args.warmup, run_dir, cache, args.config)
                default = "  (default)" if workers == cfg.data.num_workers else ""
                print(f"  cache {cache} ({r['cache']}), num_workers={workers}: loader {r['loader']:6.2f} steps/s "
                      f"{r['loader'] * r['images_per_step']:7.1f} img/s"
                      f" | memory {r['memory']:6.2f} steps/s {r['memory'] * r['images_per_step']:7.1f} img/s"
                      f" | ratio {r['ratio']:.3f} (pairs {r['spread'][0]:.2f}..{r['spread'][1]:.2f}) goal >= 0.97"
                      f" | data path alone {r['data_only']:6.1f} batches/s | {load_text()}{default}")
        if args.skip_encode:
            finish(began)
            return

        print(f"\n2. -e throughput: encode_folder end to end vs encode_latents on in-memory images "
              f"(median of {args.reps})")
        for r in encode_comparison(cfg, args.reps, sorted({0, cfg.data.num_workers}), Path(tmp)):
            default = "  (default)" if r["workers"] == cfg.data.num_workers else ""
            print(f"  num_workers={r['workers']} (runs with {r['effective_workers']}): files {r['files']:7.1f} img/s"
                  f" | model only {r['model']:7.1f} img/s"
                  f" | ratio {r['ratio']:.3f} (pairs {r['spread'][0]:.2f}..{r['spread'][1]:.2f}) goal >= 0.90"
                  f"  ({r['images']} images, batch {r['batch']}) | {load_text()}{default}")
    finish(began)


if __name__ == "__main__":
    main()
