"""The GPU figures in one prepared script, for a machine with a CUDA device.

1. The 256 px preset (structures/fixed256_*.json): bf16 + channels_last + compile against
   fp32 eager, timed in interleaved rounds (goal >= 2x), and the model FLOP utilisation
   against the GPU's dense bf16 peak (goal >= 30%) - bench_speed's run_case.
2. The SD autoencoder structure against diffusers' AutoencoderKL with the same weights:
   inference and a training step, fp32 and bf16 autocast, ABBA (goal <= 1.00) -
   bench_sd_vae's compare.
3. -mem on the preset (bf16 + channels_last), then 50 training steps at the confirmed batch
   size without running out of memory - bench_speed's mem_check.

    python bench/bench_gpu.py [--sd-size 256] [--reps 10] [--peak-tflops T]

Without a CUDA device it says so and exits with status 2: nothing here runs on the CPU.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import load_text, start

sys.path.insert(0, str(Path(__file__).resolve().parent))
REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sd-size", type=int, default=256, help="input side for the SD comparison")
    parser.add_argument("--reps", type=int, default=10, help="timed runs per model in the SD comparison")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak, if not in the table")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (data work only)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_gpu: PyTorch sees no CUDA device on this machine; nothing measured")
        return 2
    start("bench_gpu", args.threads)
    os.chdir(REPO)
    import bench_sd_vae
    import bench_speed
    from flexvae.config import apply_overrides, load_config

    began = time.perf_counter()
    device = torch.device("cuda", torch.cuda.current_device())
    machine = bench_speed.describe_machine(device, args.peak_tflops, "from --threads")
    print("\n".join(machine.lines))
    base = load_config(bench_speed.CONFIG)
    options = argparse.Namespace(all=False, steps=None, quick=False, preset_batch=None)
    peaks = bench_speed.measure_peaks(device, quick=False)
    print("practical peak measured now (TFLOP/s): " + ", ".join(f"{k} {v:.1f}" for k, v in peaks.items() if k != "size"))
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(tmp / "inductor")
        preset_case = [c for c in bench_speed.plan_cases(base, machine, options) if c.goals][0]
        outcome = bench_speed.run_case(preset_case, base, machine, options, tmp, peaks)

        print(f"\n== SD structure vs diffusers AutoencoderKL, 1x3x{args.sd_size}x{args.sd_size}")
        with tempfile.TemporaryDirectory() as folder:
            reference, model = bench_sd_vae.make_models(Path(folder))
        x = torch.rand(1, 3, args.sd_size, args.sd_size, generator=torch.Generator().manual_seed(1)) * 2 - 1
        sd = {}
        for dtype in (None, torch.bfloat16):
            for train in (False, True):
                sd[(dtype, train)] = bench_sd_vae.compare(reference, model, x, device, args.reps, 3, dtype=dtype,
                                                          train=train)
        print("largest |bf16 autocast - fp32| of the decoder output: " + ", ".join(
            f"{k} {v:.3e}" for k, v in bench_sd_vae.bf16_errors(reference, model, x, device).items()))
        reference = model = None

        preset = apply_overrides(base, bench_speed.PRESET + ["data.image_size=256", "train.precision=bf16",
                                                             "train.channels_last=true"])
        mem = bench_speed.mem_check("the 256 preset at 256 px (bf16 + channels_last)", preset, machine, tmp)

    print("\n== goals")
    results = outcome["results"]
    fast, base_timing = results.get(bench_speed.FASTEST), results.get(bench_speed.BASELINE)
    if fast is not None and fast.ratio:
        print(f"   bf16 + channels_last + compile over fp32 eager: {fast.ratio:.2f}x (goal >= 2x: "
              f"{'met' if fast.ratio >= 2 else 'NOT met'})")
    else:
        print(f"   bf16 + channels_last + compile: {getattr(fast, 'error', None) or 'not measured'}")
    if machine.peak_tflops:
        rates = {k: t.images_per_s for k, t in results.items() if t.images_per_s}
        mfu = max(outcome["flops"]["train"] * r for r in rates.values()) / (machine.peak_tflops * 1e12)
        print(f"   model FLOP utilisation: {mfu:.1%} of {machine.peak_tflops:g} TFLOPS (goal >= 30%: "
              f"{'met' if mfu >= 0.30 else 'NOT met'})")
    for (dtype, train), ratio in sd.items():
        label = f"{'bf16' if dtype else 'fp32'} {'training step' if train else 'inference'}"
        print(f"   SD structure / diffusers, {label}: {ratio:.3f} (goal <= 1.00: {'met' if ratio <= 1.0 else 'NOT met'})")
    check = mem.get("check")
    if check is not None:
        print(f"   {bench_speed.MEM_CHECK_STEPS} steps at -mem's confirmed batch size: "
              + (f"FAILED ({check.error})" if check.error else "OK, no out-of-memory"))
    print(f"   base fp32 eager step {base_timing.step_s * 1e3:.1f} ms" if base_timing and base_timing.step_s else "")
    print(f"   total {time.perf_counter() - began:.0f} s; {load_text()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
