"""Core benchmarks: what the token DSL costs at run time and at check time.

1. Forward + backward of a DSL-built VAE against a hand-written twin (plain nn.Conv2d,
   nn.GroupNorm, nn.Linear with its own residual and attention code) holding the same
   weights. Runs alternate (A B A B ...) after a warm-up; the medians and their ratio
   (DSL / hand, goal <= 1.02) are printed.
2. Parse and meta-device check (plan_vae) of a 1,000-token structure (goal < 1 s).

    python bench/bench_core.py [--threads N] [--reps N]

Prints only; nothing is asserted except that the twins compute the same outputs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import finish, interleaved, load_text, ratio_of_medians, seconds, start
from flexvae.build import plan_vae
from flexvae.dsl import parse_structure

STRUCTURES = Path(__file__).resolve().parents[1] / "structures"
KL_WEIGHT = 1e-4


# ----------------------------------------------------------------- hand-written twin
class HandResidual(nn.Module):
    """GroupNorm, SiLU, conv3x3, GroupNorm, SiLU, conv3x3, plus the (projected) input."""

    def __init__(self, in_channels: int, out_channels: int, groups: int = 32):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.shortcut is None else self.shortcut(x)) + h


class HandAttention(nn.Module):
    """GroupNorm, single-head attention over all H*W positions, projection, plus the input."""

    def __init__(self, channels: int, groups: int = 32):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels)
        self.query = nn.Linear(channels, channels)
        self.key = nn.Linear(channels, channels)
        self.value = nn.Linear(channels, channels)
        self.proj = nn.Linear(channels, channels)

    def forward(self, x):
        batch, channels, height, width = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, C, H*W) -> (B, H*W, C)
        h = F.scaled_dot_product_attention(self.query(tokens), self.key(tokens), self.value(tokens))
        return x + self.proj(h).transpose(1, 2).reshape(batch, channels, height, width)


class Upsample(nn.Module):
    def __init__(self, scale: int):
        super().__init__()
        self.scale = scale

    def forward(self, x):
        return F.interpolate(x, scale_factor=float(self.scale), mode="nearest")


class HandVAE(nn.Module):
    """Encoder -> (mean, clamped log-variance) -> sample -> decoder, written out by hand."""

    def __init__(self, encoder: list[nn.Module], decoder: list[nn.Module]):
        super().__init__()
        self.encoder = nn.ModuleList(encoder)
        self.decoder = nn.ModuleList(decoder)

    def forward(self, x, generator):
        h = x
        for layer in self.encoder:
            h = layer(h)
        mean, logvar = h.chunk(2, dim=1)
        logvar = logvar.clamp(-30.0, 20.0)
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)
        z = mean + torch.exp(0.5 * logvar) * noise
        for layer in self.decoder:
            z = layer(z)
        return z, mean, logvar


def hand_small() -> HandVAE:
    """structures/small_encoder.json and small_decoder.json, by hand."""
    encoder = [
        nn.Conv2d(3, 32, 3, 1, 1), HandResidual(32, 32),
        nn.Conv2d(32, 64, 3, 2, 1), HandResidual(64, 64),
        nn.Conv2d(64, 64, 3, 2, 1), HandResidual(64, 64), HandAttention(64),
        nn.GroupNorm(32, 64), nn.SiLU(), nn.Conv2d(64, 8, 3, 1, 1),
    ]
    decoder = [
        nn.Conv2d(4, 64, 3, 1, 1), HandResidual(64, 64), HandAttention(64),
        Upsample(2), nn.Conv2d(64, 64, 3, 1, 1), HandResidual(64, 32),
        Upsample(2), nn.Conv2d(32, 32, 3, 1, 1), HandResidual(32, 32),
        nn.GroupNorm(32, 32), nn.SiLU(), nn.Conv2d(32, 3, 3, 1, 1),
    ]
    return HandVAE(encoder, decoder)


def hand_fixed256() -> HandVAE:
    """structures/fixed256_encoder.json and fixed256_decoder.json, by hand."""
    encoder = [
        nn.Conv2d(3, 128, 3, 1, 1), HandResidual(128, 128), HandResidual(128, 128),
        nn.Conv2d(128, 128, 4, 4, 0), HandResidual(128, 256), HandResidual(256, 256),
        nn.Conv2d(256, 256, 4, 4, 0), *[HandResidual(256, 256) for _ in range(3)],
        HandAttention(256), HandResidual(256, 256),
        nn.GroupNorm(32, 256), nn.SiLU(), nn.Conv2d(256, 8, 3, 1, 1), nn.Conv2d(8, 8, 1, 1, 0),
    ]
    decoder = [
        nn.Conv2d(4, 4, 1, 1, 0), nn.Conv2d(4, 512, 3, 1, 1), HandResidual(512, 512), HandAttention(512),
        *[HandResidual(512, 512) for _ in range(4)],
        Upsample(4), nn.Conv2d(512, 512, 3, 1, 1), HandResidual(512, 256),
        HandResidual(256, 256), HandResidual(256, 256),
        Upsample(4), nn.Conv2d(256, 256, 3, 1, 1), HandResidual(256, 128),
        HandResidual(128, 128), HandResidual(128, 128),
        nn.GroupNorm(32, 128), nn.SiLU(), nn.Conv2d(128, 3, 3, 1, 1),
    ]
    return HandVAE(encoder, decoder)


def copy_weights(source: nn.Module, target: nn.Module) -> None:
    """Copy tensors in registration order; both models register layers in structure order."""
    sources, targets = list(source.state_dict().values()), list(target.state_dict().values())
    if len(sources) != len(targets) or any(a.shape != b.shape for a, b in zip(sources, targets)):
        raise RuntimeError("the hand-written model does not mirror the DSL model")
    with torch.no_grad():
        for a, b in zip(sources, targets):
            b.copy_(a)


# ----------------------------------------------------------------- timing
def loss_of(recon, x, mean, logvar):
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)
    return F.mse_loss(recon, x) + KL_WEIGHT * kl.mean()


def dsl_step(model, x):
    model.zero_grad(set_to_none=True)
    out = model(x, generator=torch.Generator(device=x.device).manual_seed(0))
    loss = loss_of(out.recon, x, out.posterior.mean, out.posterior.logvar)
    loss.backward()
    return out.recon


def hand_step(model, x):
    model.zero_grad(set_to_none=True)
    recon, mean, logvar = model(x, torch.Generator(device=x.device).manual_seed(0))
    loss = loss_of(recon, x, mean, logvar)
    loss.backward()
    return recon


def compare(name: str, preset: str, hand: HandVAE, image_size: int, batch: int, reps: int, warmup: int,
            device="cpu") -> dict:
    """Time the DSL model against its hand-written twin on ``device``; prints and returns the figures."""
    torch.manual_seed(0)
    data_shape = (3, image_size, image_size)
    dsl = plan_vae(STRUCTURES / f"{preset}_encoder.json", STRUCTURES / f"{preset}_decoder.json", data_shape).build()
    copy_weights(dsl, hand)
    dsl, hand = dsl.to(device), hand.to(device)
    x = (torch.rand((batch, *data_shape), generator=torch.Generator().manual_seed(1)) * 2 - 1).to(device)

    # Same weights, same noise: the same reconstruction and the same gradients.
    recon_dsl, recon_hand = dsl_step(dsl, x), hand_step(hand, x)
    if not torch.allclose(recon_dsl, recon_hand, atol=1e-5, rtol=1e-4):
        raise RuntimeError(f"{name}: outputs differ by {(recon_dsl - recon_hand).abs().max():.3g}")
    grads_dsl = [p.grad for p in dsl.parameters()]
    grads_hand = [p.grad for p in hand.parameters()]
    if not all(torch.allclose(a, b, atol=1e-4, rtol=1e-3) for a, b in zip(grads_dsl, grads_hand)):
        raise RuntimeError(f"{name}: gradients differ")

    for _ in range(warmup):
        dsl_step(dsl, x)
        hand_step(hand, x)
    found = interleaved({"dsl": lambda: dsl_step(dsl, x), "hand": lambda: hand_step(hand, x)}, reps, device)
    dsl_times, hand_times = found["dsl"].all, found["hand"].all
    ratio = ratio_of_medians(found["dsl"], found["hand"])
    params = sum(p.numel() for p in dsl.parameters())
    print(f"{name}: batch {batch}, {data_shape}, {params:,} parameters, {reps} interleaved reps (A B B A) after "
          f"{warmup} warm-up; {load_text()}")
    print(f"  DSL  median {found['dsl'].median * 1e3:9.1f} ms   (min {min(dsl_times) * 1e3:.1f})")
    print(f"  hand median {found['hand'].median * 1e3:9.1f} ms   (min {min(hand_times) * 1e3:.1f})")
    print(f"  ratio DSL / hand = {ratio}   (goal <= 1.02; ratio of minima {min(dsl_times) / min(hand_times):.3f})")
    return {"batch": batch, "data_shape": data_shape, "params": params, "reps": reps,
            "dsl_median": found["dsl"].median, "hand_median": found["hand"].median, "ratio": ratio.value,
            "ratio_of_minima": min(dsl_times) / min(hand_times)}


def one_step_seconds(hand: HandVAE, image_size: int) -> float:
    """Seconds for one hand-written forward + backward (used to pick the benchmark size)."""
    x = torch.zeros(1, 3, image_size, image_size)
    hand_step(hand, x)  # first call pays one-time costs
    return seconds(lambda: hand_step(hand, x))


# ----------------------------------------------------------------- structure checking
def long_structure(count: int = 1000) -> list[str]:
    pattern = ["VAERB_?_64", "SiLU", "C2d_?_64_3_1_1"]
    return [pattern[i % len(pattern)] for i in range(count - 1)] + ["C2d_?_8_3_1_1"]


def check_structure(text: str, decoder: list[str], data_shape) -> tuple[float, float]:
    start = time.perf_counter()
    specs = parse_structure(json.loads(text), source="long_encoder.json")
    parsed = time.perf_counter()
    plan_vae(specs, decoder, data_shape)
    return parsed - start, time.perf_counter() - parsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--reps", type=int, default=15, help="timed repetitions per model (small preset)")
    args = parser.parse_args()
    began = time.perf_counter()
    start("bench_core", args.threads)

    # The first meta-device trace in a process pays torch's one-time lazy imports; time it
    # now, before section 1 traces anything.
    tokens = long_structure()
    text = json.dumps(tokens)
    decoder, data_shape = ["C2d_4_3_3_1_1"], (3, 16, 16)
    cold_parse, cold_trace = check_structure(text, decoder, data_shape)

    print("\n1. DSL-built model vs hand-written twin, forward + backward, CPU fp32")
    compare("small", "small", hand_small(), image_size=32, batch=16, reps=args.reps, warmup=3)

    # At most about a minute for this comparison: 256 px if that fits, else 64 px.
    hand = hand_fixed256()
    step_64 = one_step_seconds(hand, 64)
    step_256 = step_64 * 16  # convolution cost grows with the pixel count
    reps, warmup, size = 3, 1, 256
    if step_256 * 2 * (reps + warmup + 1) >= 60:
        print(f"(fixed256 at 256 px: about {step_256:.1f} s per step, too slow here; using 64 px)")
        reps, warmup, size = max(3, min(9, int(60 / (2 * step_64)) - 2)), 1, 64
    compare(f"fixed256 at {size} px", "fixed256", hand, image_size=size, batch=1, reps=reps, warmup=warmup)

    print(f"\n2. Parse + check (plan_vae, meta-device trace) of a {len(tokens)}-token encoder at 16x16")
    warm = [check_structure(text, decoder, data_shape) for _ in range(5)]
    parse_median = statistics.median(p for p, _ in warm)
    trace_median = statistics.median(t for _, t in warm)
    print(f"  first in process: parse {cold_parse:.4f} s, trace {cold_trace:.3f} s, "
          f"total {cold_parse + cold_trace:.3f} s  (includes torch's one-time lazy imports)")
    print(f"  median of 5:      parse {parse_median:.4f} s, trace {trace_median:.3f} s, "
          f"total {parse_median + trace_median:.3f} s  (goal < 1 s)")
    specs = parse_structure(tokens, source="long_encoder.json")
    plan = plan_vae(specs, decoder, data_shape)
    print(f"  real build of its {plan.encoder.params + plan.decoder.params:,} parameters: "
          f"{seconds(plan.build):.3f} s")
    finish(began)


if __name__ == "__main__":
    main()
