"""The trainer's step against a bare PyTorch loop on the same networks (configs/digits.toml).

Both train the digits preset's encoder and decoder with its objective (the calibrated ELBO: a
Gaussian decoder at the batch's maximum-likelihood sigma, the KL summed per image, divided by the
values per image) under AdamW, gradient clipping and the cosine schedule:

1. steps: in one process, blocks of ``--block`` steps alternate between ``Trainer.step_once``
   (flips, seeded noise, the Objective, stages, the scheduler; logged terms left on the device
   except every log_every-th step, as ``-t`` does) and a bare loop written out below, on the same
   in-memory batches; ratio = median(trainer seconds per step) / median(bare seconds per step).
2. process: ``train.py -t -c configs/digits.toml`` against a script that is the bare loop
   (reading the same images with PIL), whole process including start-up, ``--steps`` steps,
   alternating A B B A ...; ratio of medians, min..max.

    python bench/bench_objective.py [--rounds 6] [--block 20] [--steps 300] [--threads 2]

Goal: at most 1.03 for the steps. Prints only; nothing is asserted.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "digits.toml"


def load_line() -> str:
    try:
        return "load average %.2f %.2f %.2f" % os.getloadavg()
    except OSError:
        return "load average unknown"


def bare_loss(model, images, noise):
    """The digits objective written out: -ELBO per dimension with the optimal Gaussian sigma."""
    posterior = model.encode(images)
    z = posterior.mean + posterior.std * noise
    recon = model.decoder(z)
    error = images - recon
    log_sigma = 0.5 * error.detach().pow(2).mean().clamp(min=1e-12).log().clamp(min=-6.0)
    nll = (0.5 * (error * torch.exp(-log_sigma)).pow(2) + log_sigma + 0.5 * math.log(2 * math.pi)).flatten(1).sum(1)
    kl = 0.5 * (posterior.mean.pow(2) + posterior.logvar.exp() - 1 - posterior.logvar).flatten(1).sum(1)
    return (nll.mean() + kl.mean()) / images[0].numel()


def step_comparison(images, rounds: int, block: int, threads: int) -> None:
    from flexvae.config import load_config
    from flexvae.train.schedule import lr_factor
    from flexvae.train.step import make_optimizer
    from flexvae.train.trainer import Trainer

    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(CONFIG, [f"train.out_dir={out}", "train.device=cpu", f"data.path={images}",
                                   "train.fit_prior=0"])
        trainer = Trainer(cfg, CONFIG, quiet=True)
        dataset, _ = trainer._loader()
        size = cfg.train.batch_size
        batches = [torch.stack([dataset[(i * size + j) % len(dataset)]["image"] for j in range(size)])
                   for i in range(8)]
        bare_model = trainer.model.__class__  # the same networks: a copy of the trainer's model
        import copy

        bare = copy.deepcopy(trainer.model)
        optimizer = make_optimizer(bare, cfg.train)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg.train))
        generator = torch.Generator().manual_seed(0)
        state = {"step": 0}

        def trainer_block():
            for i in range(block):
                result = trainer.step_once([batches[i % 8]])
                if trainer.step % cfg.train.log_every == 0:
                    result.terms  # what -t reads on a logging step

        def bare_block():
            for i in range(block):
                optimizer.zero_grad(set_to_none=True)
                noise = torch.randn(size, *trainer.plan.latent_shape, generator=generator)
                loss = bare_loss(bare, batches[i % 8], noise)
                loss.backward()
                if not math.isfinite(loss.item()):
                    raise RuntimeError("non-finite loss")
                torch.nn.utils.clip_grad_norm_(bare.parameters(), cfg.train.grad_clip)
                optimizer.step()
                scheduler.step()
                state["step"] += 1

        del bare_model
        trainer.model.train()
        bare.train()
        trainer_block(), bare_block()  # warm-up
        times = {"trainer": [], "bare": []}
        for r in range(rounds):
            for name in (("trainer", "bare") if r % 2 == 0 else ("bare", "trainer")):
                began = time.perf_counter()
                (trainer_block if name == "trainer" else bare_block)()
                times[name].append((time.perf_counter() - began) / block)
        ratios = [t / b for t, b in zip(times["trainer"], times["bare"])]
        print(f"1. steps ({rounds} rounds of {block} steps each, interleaved; {threads} threads; {load_line()})")
        print(f"   trainer {statistics.median(times['trainer']) * 1e3:.2f} ms/step, bare loop "
              f"{statistics.median(times['bare']) * 1e3:.2f} ms/step; ratio of medians "
              f"{statistics.median(times['trainer']) / statistics.median(times['bare']):.3f} "
              f"(per round {min(ratios):.3f}..{max(ratios):.3f}; goal <= 1.03)")


BARE_SCRIPT = '''
import math, sys, time
from pathlib import Path
import numpy as np, torch
from PIL import Image
sys.path.insert(0, {bench!r})
from bench_objective import bare_loss
from flexvae.config import load_config
from flexvae.assemble import model_from_config
from flexvae.train.schedule import lr_factor
from flexvae.train.step import make_optimizer
torch.set_num_threads({threads})
cfg = load_config({config!r}, ["train.device=cpu"])
torch.manual_seed(cfg.train.seed)
model, plan = model_from_config(cfg, {config!r})
paths = sorted(p for p in Path({images!r}).rglob("*.png"))
data = torch.stack([torch.from_numpy(np.asarray(Image.open(p).convert("L").resize((16, 16)), dtype=np.float32)
                                     / 127.5 - 1)[None] for p in paths])
optimizer = make_optimizer(model, cfg.train)
scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg.train))
generator = torch.Generator().manual_seed(0)
for step in range({steps}):
    index = torch.randint(0, len(data), (cfg.train.batch_size,), generator=generator)
    optimizer.zero_grad(set_to_none=True)
    loss = bare_loss(model, data[index], torch.randn(cfg.train.batch_size, *plan.latent_shape, generator=generator))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
    optimizer.step()
    scheduler.step()
'''


def process_comparison(images, rounds: int, steps: int, threads: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore"}
    times = {"train.py -t": [], "bare script": []}
    with tempfile.TemporaryDirectory() as out:
        script = Path(out) / "bare.py"
        script.write_text(BARE_SCRIPT.format(bench=str(REPO / "bench"), threads=threads, config=str(CONFIG),
                                             images=str(images), steps=steps))
        for r in range(rounds):
            for name in (("train.py -t", "bare script") if r % 2 == 0 else ("bare script", "train.py -t")):
                if name == "bare script":
                    command = [sys.executable, str(script)]
                else:
                    command = [sys.executable, str(REPO / "train.py"), "-t", "-c", str(CONFIG), "--fresh",
                               "--set", f"train.out_dir={out}/run{r}", "--set", f"data.path={images}",
                               "--set", f"train.max_steps={steps}", "--set", "train.device=cpu",
                               "--set", "train.fit_prior=0"]
                began = time.perf_counter()
                subprocess.run(command, check=True, capture_output=True, env=env, cwd=REPO)
                times[name].append(time.perf_counter() - began)
    a, b = times["train.py -t"], times["bare script"]
    ratios = [x / y for x, y in zip(a, b)]
    print(f"2. whole process ({rounds} rounds of {steps} steps, interleaved; {threads} threads; {load_line()})")
    print(f"   train.py -t {statistics.median(a):.2f} s, bare script {statistics.median(b):.2f} s; ratio of medians "
          f"{statistics.median(a) / statistics.median(b):.3f} (per round {min(ratios):.3f}..{max(ratios):.3f}); "
          "start-up counts: the bare script decodes its PNGs one by one, -t fills its cache in parallel")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--block", type=int, default=20)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-process", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as data:
        subprocess.run([sys.executable, str(REPO / "scripts" / "make_digits.py"), data, "--holdout", "0.25"],
                       check=True, capture_output=True)
        images = Path(data) / "train"
        print(f"torch {torch.__version__}, {os.cpu_count()} CPUs")
        step_comparison(images, args.rounds, args.block, args.threads)
        if not args.skip_process:
            process_comparison(images, max(2, args.rounds // 2), args.steps, args.threads)


if __name__ == "__main__":
    main()
