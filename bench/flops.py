"""Counting a model's FLOPs and measuring this machine's practical peak, for bench_speed's
achieved-FLOP/s and MFU columns. A helper, not a bench."""

from __future__ import annotations

import statistics
import time

import torch

from common import sync


def count_flops(cfg, config_path, batch: int) -> dict:
    """FLOPs of one training forward and backward per image, counted on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    from flexvae.assemble import model_from_config

    model, plan = model_from_config(cfg, config_path, device="meta")
    model.train()
    x = torch.empty((batch, *plan.data_shape), device="meta")
    noise = torch.empty((batch, *plan.latent_shape), device="meta") if model.latent.kind == "gaussian" else None
    with FlopCounterMode(display=False) as counter:
        out = model(x, noise=noise, step=0)
        forward = counter.get_total_flops()
        # Elementwise loss terms are not counted anyway; this drives the same backward pass.
        (out.recon.float() - x).pow(2).mean().backward()
        total = counter.get_total_flops()
    params = sum(p.numel() for p in model.parameters())
    return {"forward": forward / batch, "train": total / batch, "params": params,
            "data_shape": tuple(plan.data_shape), "latent_shape": tuple(plan.latent_shape)}


def measure_peaks(device: torch.device, quick: bool) -> dict:
    """Practical peaks measured now: a large fp32 and bf16 matmul, and a model-shaped 3x3
    convolution (64 -> 64 channels, 32 x 32, batch 16) in fp32 and bf16; TFLOP/s, median of 5."""
    n = 4096 if device.type == "cuda" else (1024 if quick else 2048)
    out = {}

    def rate(fn, flops):
        fn()
        times = []
        for _ in range(5):
            sync(device)
            began = time.perf_counter()
            fn()
            sync(device)
            times.append(time.perf_counter() - began)
        return flops / statistics.median(times) / 1e12

    for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        out[f"matmul {name}"] = rate(lambda: a @ b, 2 * n ** 3)
        x = torch.randn(16, 64, 32, 32, device=device, dtype=dtype)
        w = torch.randn(64, 64, 3, 3, device=device, dtype=dtype)
        out[f"conv {name}"] = rate(lambda: torch.nn.functional.conv2d(x, w, padding=1), 2 * 16 * 64 * 64 * 9 * 32 * 32)
    out["size"] = n
    return out


def peak_for(label: str, peaks: dict) -> float:
    """The measured peak a setting is compared with: the bf16 matmul for bf16/fp16, else fp32."""
    return peaks["matmul bf16" if label.startswith(("bf16", "fp16")) else "matmul fp32"] * 1e12
