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
import itertools
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import finish, interleaved, load_text, ratio_of_medians, start

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "digits.toml"


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
        times = interleaved({"trainer": trainer_block, "bare": bare_block}, rounds)
        print(f"1. steps ({rounds} rounds of {block} steps each, interleaved; {threads} threads; {load_text()})")
        print(f"   trainer {times['trainer'].median / block * 1e3:.2f} ms/step, bare loop "
              f"{times['bare'].median / block * 1e3:.2f} ms/step; ratio of medians "
              f"{ratio_of_medians(times['trainer'], times['bare'])} (goal <= 1.03)")


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
    with tempfile.TemporaryDirectory() as out:
        script = Path(out) / "bare.py"
        script.write_text(BARE_SCRIPT.format(bench=str(REPO / "bench"), threads=threads, config=str(CONFIG),
                                             images=str(images), steps=steps))
        runs = itertools.count()

        def train_py():
            subprocess.run([sys.executable, str(REPO / "train.py"), "-t", "-c", str(CONFIG), "--fresh",
                            "--set", f"train.out_dir={out}/run{next(runs)}", "--set", f"data.path={images}",
                            "--set", f"train.max_steps={steps}", "--set", "train.device=cpu",
                            "--set", "train.fit_prior=0"], check=True, capture_output=True, env=env, cwd=REPO)

        def bare_script():
            subprocess.run([sys.executable, str(script)], check=True, capture_output=True, env=env, cwd=REPO)

        times = interleaved({"train.py -t": train_py, "bare script": bare_script}, rounds)
    a, b = times["train.py -t"], times["bare script"]
    print(f"2. whole process ({rounds} rounds of {steps} steps, interleaved; {threads} threads; {load_text()})")
    print(f"   train.py -t {a.median:.2f} s, bare script {b.median:.2f} s; ratio of medians {ratio_of_medians(a, b)}; "
          "start-up counts: the bare script decodes its PNGs one by one, -t fills its cache in parallel")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--block", type=int, default=20)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-process", action="store_true")
    args = parser.parse_args()
    began = time.perf_counter()
    start("bench_objective", args.threads)
    with tempfile.TemporaryDirectory() as data:
        subprocess.run([sys.executable, str(REPO / "scripts" / "make_digits.py"), data, "--holdout", "0.25"],
                       check=True, capture_output=True)
        images = Path(data) / "train"
        step_comparison(images, args.rounds, args.block, args.threads)
        if not args.skip_process:
            process_comparison(images, max(2, args.rounds // 2), args.steps, args.threads)
    finish(began)


if __name__ == "__main__":
    main()
