"""The Stable Diffusion autoencoder in flexvae against diffusers' AutoencoderKL, same weights.

A randomly initialised AutoencoderKL with the SD 1.x/2.x config is saved as a diffusers
folder and imported with flexvae's converter. Both models then encode (posterior mean) and
decode the same input; runs alternate (diffusers, flexvae, diffusers, ...) after a warm-up,
and the medians, their ratio (flexvae / diffusers, goal <= 1.0) and the largest absolute
differences of mean, log-variance and decoder output are printed. CPU fp32 always; on a
CUDA device also fp32 and bf16 autocast there.

    python bench/bench_sd_vae.py [--size 256] [--reps 5] [--threads 2]

CPU bf16 autocast is compared too (inference and a training step: L1 loss, backward), with
each model's bf16 error against its own fp32 output.

Needs diffusers (a test-only dependency). No network access: nothing is downloaded.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from common import finish, interleaved, load_text, ratio_of_medians, start

SD = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
          up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4,
          norm_num_groups=32, sample_size=512, scaling_factor=0.18215)


def make_models(folder: Path):
    from diffusers import AutoencoderKL

    from flexvae.convert_sd import load_sd_vae

    torch.manual_seed(0)
    reference = AutoencoderKL(**SD).eval()
    with torch.no_grad():  # move norms and biases off their 1/0 initial values
        for p in reference.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    reference.save_pretrained(folder, safe_serialization=True)
    model = load_sd_vae(folder)[0]
    return reference, model


def step_diffusers(vae, x):
    mean = vae.encode(x).latent_dist.mean
    return vae.decode(mean).sample


def step_flexvae(vae, x):
    return vae.decode(vae.encode(x).mean)


def train_diffusers(vae, x):
    posterior = vae.encode(x).latent_dist
    (vae.decode(posterior.mean).sample.float() - x).abs().mean().backward()


def train_flexvae(vae, x):
    posterior = vae.encode(x)
    (vae.decode(posterior.mean).float() - x).abs().mean().backward()


def run(fn, model, x, autocast):
    """One call of ``fn`` as timed: inference without autograd, a training step with it."""
    grad = fn in (train_diffusers, train_flexvae)
    with (nullcontext() if grad else torch.inference_mode()), autocast:
        fn(model, x)
    if grad:
        model.zero_grad(set_to_none=True)


@torch.inference_mode()
def bf16_errors(reference, model, x, device):
    """Largest |bf16 autocast - fp32| of each model's decoder output on the same input."""
    out = {}
    for name, fn, vae in (("diffusers", step_diffusers, reference), ("flexvae", step_flexvae, model)):
        exact = fn(vae, x.to(device)).float()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            approx = fn(vae, x.to(device)).float()
        out[name] = (exact - approx).abs().max().item()
    return out


@torch.inference_mode()
def differences(reference, model, x):
    ref, post = reference.encode(x).latent_dist, model.encode(x)
    return {
        "mean": (ref.mean - post.mean).abs().max().item(),
        "logvar": (ref.logvar - post.logvar).abs().max().item(),
        "decoder": (reference.decode(ref.mean).sample - model.decode(ref.mean)).abs().max().item(),
    }


def compare(reference, model, x, device, reps, warmup, dtype=None, train=False):
    reference, model, x = reference.to(device), model.to(device), x.to(device)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()
    ref_fn, flex_fn = (train_diffusers, train_flexvae) if train else (step_diffusers, step_flexvae)
    runs = {"diffusers": lambda: run(ref_fn, reference, x, autocast), "flexvae": lambda: run(flex_fn, model, x, autocast)}
    interleaved(runs, warmup, device)
    times = interleaved(runs, reps, device)  # A B B A, so drifts in machine load hit both alike
    ratio = ratio_of_medians(times["flexvae"], times["diffusers"])
    label = (f"{device.type} {'fp32' if dtype is None else str(dtype).replace('torch.', '') + ' autocast'} "
             f"{'training step' if train else 'inference'}")
    print(f"{label}: diffusers {times['diffusers'].median * 1e3:.1f} ms, flexvae {times['flexvae'].median * 1e3:.1f} "
          f"ms (median of {reps}), ratio of medians flexvae/diffusers {ratio} (goal <= 1.0); {load_text()}")
    return ratio.value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=256, help="input side length (a multiple of 8)")
    parser.add_argument("--reps", type=int, default=5, help="timed runs per model")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per model first")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    args = parser.parse_args()
    began = time.perf_counter()
    start("bench_sd_vae", args.threads)
    print(f"{platform.processor() or platform.machine()}; input 1x3x{args.size}x{args.size}")
    with tempfile.TemporaryDirectory() as tmp:
        reference, model = make_models(Path(tmp))
    x = torch.rand(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(1)) * 2 - 1
    cpu = torch.device("cpu")
    diffs = differences(reference, model, x)
    print("largest absolute difference (cpu fp32): "
          + ", ".join(f"{name} {value:.2e}" for name, value in diffs.items()))
    compare(reference, model, x, cpu, args.reps, args.warmup)
    errors = bf16_errors(reference, model, x, cpu)
    print("largest |bf16 autocast - fp32| of the decoder output (cpu): "
          + ", ".join(f"{name} {value:.3e}" for name, value in errors.items()))
    compare(reference, model, x, cpu, args.reps, args.warmup, dtype=torch.bfloat16)
    compare(reference, model, x, cpu, args.reps, args.warmup, dtype=torch.bfloat16, train=True)
    if torch.cuda.is_available():
        cuda = torch.device("cuda")
        compare(reference, model, x, cuda, max(args.reps, 10), max(args.warmup, 3))
        compare(reference, model, x, cuda, max(args.reps, 10), max(args.warmup, 3), dtype=torch.bfloat16)
    finish(began)


if __name__ == "__main__":
    main()
