"""Latent types compared on the bundled photographs at a comparable bit budget.

Every latent type is trained on ``assets/photos`` (32 x 32 px) with the small structures
(``structures/small_*.json``), adapted per type by changing only the encoder's last conv's
output channels and the decoder's first conv's input channels. All runs use the same seed,
batches, optimizer (AdamW, cosine schedule) and number of steps; each is then evaluated in
eval mode on the training images (PSNR, SSIM), with the codes used and their perplexity
for the discrete types.

Bit budget per latent position (the latent is 8 x 8 positions for 32 px images):
    vq           512 codes                      9 bits
    fsq          levels [8, 8, 8]               9 bits
    categorical  1 group x 512 categories       9 bits
    gaussian / deterministic: 4 continuous channels (no fixed bit count)

    python bench/bench_latents.py [--steps N] [--threads N] [--only vq-restart,fsq]

Prints a Markdown table and writes it to bench/results/latents.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time
from pathlib import Path

import torch

from common import finish, start

from flexvae.build import build_vae
from flexvae.config import Config
from flexvae.data import open_dataset
from flexvae.latents import CategoricalLatent, DeterministicLatent, FSQLatent, GaussianLatent, VQLatent
from flexvae.metrics import psnr, ssim_window
from flexvae.train.step import lr_factor, make_optimizer, train_step

ROOT = Path(__file__).resolve().parents[1]
IMAGE_SIZE = 32
BATCH = 16
LR = 2e-3


def variants() -> dict:
    """name -> (latent factory, encoder output channels, decoder input channels, bits per position)."""
    return {
        "gaussian": (lambda: GaussianLatent(), 8, 4, "continuous (4 ch)"),
        "deterministic": (lambda: DeterministicLatent(), 4, 4, "continuous (4 ch)"),
        "vq (no restart)": (lambda: VQLatent(512, 4, dead_threshold=0.0), 4, 4, "9"),
        "vq + dead-code restart": (lambda: VQLatent(512, 4, dead_threshold=0.1), 4, 4, "9"),
        "vq + restart + k-means init": (lambda: VQLatent(512, 4, dead_threshold=0.1, kmeans_init=True), 4, 4, "9"),
        "fsq [8, 8, 8]": (lambda: FSQLatent((8, 8, 8)), 3, 3, "9"),
        "categorical 1 x 512": (lambda: CategoricalLatent(512, 1, tau_start=1.0, tau_min=0.5, tau_rate=1e-3),
                                512, 512, "9"),
    }


def structures(enc_out: int, dec_in: int) -> tuple[list[str], list[str]]:
    """The small structures with the latent-facing channel counts replaced."""
    encoder = json.loads((ROOT / "structures/small_encoder.json").read_text())
    decoder = json.loads((ROOT / "structures/small_decoder.json").read_text())
    name, c_in, _, *rest = encoder[-1].split("_")
    encoder[-1] = "_".join([name, c_in, str(enc_out), *rest])
    name, _, c_out, *rest = decoder[0].split("_")
    decoder[0] = "_".join([name, str(dec_in), c_out, *rest])
    return encoder, decoder


def load_images() -> torch.Tensor:
    dataset = open_dataset("folder", ROOT / "assets/photos", train=True, channels=3, image_size=IMAGE_SIZE)
    return torch.stack([dataset[i]["image"] for i in range(len(dataset))])


def batches(images: torch.Tensor, steps: int, seed: int = 0):
    """The same shuffled, randomly flipped batches for every variant."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.empty(0, dtype=torch.long)
    for _ in range(steps):
        if len(order) < BATCH:
            order = torch.cat([order, torch.randperm(len(images), generator=generator)])
        pick, order = order[:BATCH], order[BATCH:]
        batch = images[pick]
        flip = torch.rand(BATCH, generator=generator) < 0.5
        yield torch.where(flip.view(-1, 1, 1, 1), batch.flip(-1), batch)


@torch.no_grad()
def evaluate(model, images: torch.Tensor) -> dict:
    from pytorch_msssim import ssim

    model.eval()
    posterior = model.encode(images)
    recon = model.to_image(model.decode(posterior.mode()))
    result = {
        "psnr": float(psnr(recon, images).mean()),
        "ssim": float(ssim((recon + 1) / 2, (images + 1) / 2, data_range=1.0,
                           win_size=ssim_window(tuple(images.shape[2:])))),
    }
    if hasattr(model.latent, "codes"):
        codes = model.latent.codes(posterior).flatten()
        total = model.latent.quantizer.num_codes if hasattr(model.latent, "quantizer") else model.latent.categories
        counts = torch.bincount(codes, minlength=total).float()
        probs = counts / counts.sum()
        result["used"] = float((counts > 0).float().mean())
        result["perplexity"] = float(torch.exp(-(probs * probs.clamp_min(1e-12).log()).sum()))
        result["codes"] = total
    return result


def run(name, make, enc_out, dec_in, images, steps, seed=0) -> dict:
    encoder, decoder = structures(enc_out, dec_in)
    torch.manual_seed(seed)
    model = build_vae(encoder, decoder, (3, IMAGE_SIZE, IMAGE_SIZE), make())
    cfg = Config()
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, lr=LR, max_steps=steps))
    optimizer = make_optimizer(model, cfg.train)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg.train))
    model.train()
    started = time.perf_counter()
    for step, batch in enumerate(batches(images, steps, seed)):
        train_step(model, [batch], optimizer, cfg, step)
        scheduler.step()
    seconds = time.perf_counter() - started
    window_usage = model.metrics().get("vq_usage")
    result = evaluate(model, images)
    result.update(name=name, seconds=seconds, window_usage=window_usage)
    return result


def table(rows, bits, steps, threads, count) -> str:
    lines = [
        f"Latent types on the bundled photos ({count} images, {IMAGE_SIZE} px, latent 8 x 8 positions), "
        f"{steps} steps of batch {BATCH}, AdamW lr {LR} with cosine decay, seed 0; "
        f"evaluated in eval mode on the training images. CPU, {threads} thread{'' if threads == 1 else 's'}, "
        f"torch {torch.__version__}, {platform.machine()}.",
        "",
        "| latent | bits / position | PSNR (dB) | SSIM | codes used (eval) | VQ usage (last 100 train batches) "
        "| perplexity | train s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        used = f"{row['used'] * 100:.1f}% of {row['codes']}" if "used" in row else "-"
        window = f"{row['window_usage'] * 100:.1f}%" if row.get("window_usage") is not None else "-"
        perplexity = f"{row['perplexity']:.1f}" if "perplexity" in row else "-"
        lines.append(f"| {row['name']} | {bits[row['name']]} | {row['psnr']:.2f} | {row['ssim']:.4f} | {used} "
                     f"| {window} | {perplexity} | {row['seconds']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=500, help="optimizer steps per latent type")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", default="", help="comma-separated subset of the latent names")
    parser.add_argument("--out", default=str(ROOT / "bench/results/latents.md"))
    args = parser.parse_args()
    began = time.perf_counter()
    start("bench_latents", args.threads)
    images = load_images()
    chosen = variants()
    if args.only:
        wanted = [w.strip() for w in args.only.split(",")]
        chosen = {k: v for k, v in chosen.items() if any(k.startswith(w) for w in wanted)}
    rows = []
    for name, (make, enc_out, dec_in, _) in chosen.items():
        rows.append(run(name, make, enc_out, dec_in, images, args.steps))
        print(f"{name}: PSNR {rows[-1]['psnr']:.2f} dB, SSIM {rows[-1]['ssim']:.4f}, "
              f"{rows[-1]['seconds']:.0f} s", flush=True)
    text = table(rows, {k: v[3] for k, v in chosen.items()}, args.steps, args.threads, len(images))
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n", encoding="utf-8")
    finish(began)


if __name__ == "__main__":
    main()
