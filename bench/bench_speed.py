"""Speed benchmark: training throughput per precision / memory layout / compile setting, and more.

One command prints, beside a description of the machine:

1. Training images/s of the default config (configs/config.toml at its image size and batch)
   and of the 256x256 preset (structures/fixed256_*.json) for fp32 eager, bf16,
   bf16 + channels_last, bf16 + channels_last + compile, fp16 (with the gradient scaler; on
   the CPU only with --all) and fp32 + compile. Each setting builds its own Trainer (so
   ``prepare``, the compile fallback and ``train_step`` are exactly what training runs), is
   warmed up, and then all settings are timed in interleaved rounds (blocks of steps, the
   order reversed every other round): speed-ups are ratios of median step times with the
   min..max of the per-round ratios, so load drifting during the run hits every setting
   alike. Compile time is reported cold (an empty inductor cache of the bench's own) and
   warm (after torch._dynamo.reset(), with that cache filled). FLOPs are counted with torch's
   FlopCounterMode on the meta device; achieved FLOP/s are compared with this machine's
   practical peak measured in the same run (large fp32 and bf16 matmuls, a model-shaped
   convolution), and on a GPU also with its data-sheet bf16 peak (MFU).
2. DSL-built model vs hand-written twin, forward + backward (bench_core.compare).
3. ``-e`` throughput: encode_folder on assets/photos vs the model alone on the same images in
   memory (bench_train.encode_comparison; random weights).
4. ``-mem`` (find_max_batch) on the default config: predicted, confirmed and recommended batch
   size. On a GPU also on the 256 preset (bf16 + channels_last), and each confirmed size then
   trains 50 steps to show that it does not run out of memory.

On a machine without a GPU everything runs on the CPU (and says so): the 256 preset then
trains at batch 1 for very few steps, CPU-hopeless settings are skipped with the reason
printed (--all runs them anyway), and with --quick the preset runs at 64 px.

    python bench/bench_speed.py [--device auto|cpu|cuda] [--quick] [--steps N] [--threads N]
                                [--peak-tflops T] [--preset-batch N] [--all]

Prints only; nothing about speed is asserted.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch._dynamo

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # common, flops, speed_settings, bench_core, bench_train

from common import GiB, Machine, describe_machine, first_line, load_text, release, start  # noqa: E402
from flops import measure_peaks  # noqa: E402
from speed_settings import (BASELINE, CONFIG, FASTEST, PRESET, Timing, plan_cases, prepare_setting,  # noqa: E402
                            rate_text, run_case, timed_step)

MEM_CHECK_STEPS = 50


# ------------------------------------------------------------------ the other sections
def dsl_ratio(device: torch.device, quick: bool) -> dict | None:
    import bench_core

    reps, warmup = (5, 2) if quick else (15, 3)
    print(f"\n== DSL-built model vs hand-written twin (bench_core.compare), forward + backward, fp32, "
          f"on {device.type}")
    try:
        return bench_core.compare("small", "small", bench_core.hand_small(), image_size=32, batch=16,
                                  reps=reps, warmup=warmup, device=device)
    except Exception as exc:  # e.g. the twins disagree on this device: say so, run the other sections
        print(f"   failed: {first_line(exc)}")
        return None
    finally:
        release(device)


def encode_speed(base_cfg, device: torch.device, quick: bool, tmp: Path) -> list[dict]:
    from bench_train import encode_comparison

    from flexvae.config import apply_overrides

    cfg = apply_overrides(base_cfg, [f"train.device={device.type}"])
    reps = 2 if quick else 5
    workers = [0] if quick else sorted({0, cfg.data.num_workers})
    print(f"\n== -e throughput: encode_folder on {cfg.data.path} (files in, latent files out) vs the model alone "
          f"on the same images in memory; default model, random weights, batch {cfg.encode.batch_size}, "
          f"median of {reps}")
    try:
        results = encode_comparison(cfg, reps, workers, tmp)
    except Exception as exc:  # report and run the other sections
        print(f"   failed: {first_line(exc)}")
        return []
    finally:
        release(device)
    for r in results:
        print(f"   num_workers={r['workers']}: encode_folder {r['files']:8.1f} img/s | model only {r['model']:8.1f} "
              f"img/s | ratio {r['ratio']:.3f} ({r['images']} images)")
    return results


def train_steps(cfg, device: torch.device, batch: int, steps: int) -> Timing:
    """``steps`` training steps at ``batch``: their median time and the peak memory."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    item = prepare_setting(cfg, device, batch, "mem check", 0)
    if isinstance(item, Timing):
        return item
    timing = item.timing
    try:
        times = [timed_step(item.trainer, item.images, device) for _ in range(steps)]
        timing.step_s, timing.steps = statistics.median(times), len(times) + 2  # and 2 warm-up steps
        if device.type == "cuda":
            timing.peak_bytes = torch.cuda.max_memory_allocated(device)
    except torch.cuda.OutOfMemoryError:
        timing.error = "out of memory"
    finally:
        item = None
        release(device)
    return timing


def mem_check(title: str, cfg, machine: Machine, tmp: Path) -> dict:
    from flexvae.config import apply_overrides
    from flexvae.train.memory import find_max_batch

    device = machine.device
    cfg = apply_overrides(cfg, [f"train.device={device.type}", "train.grad_accum=1",
                                f"train.out_dir={(tmp / 'mem').as_posix()}"])
    print(f"\n== -mem (find_max_batch) on {title}: precision {cfg.train.precision}, channels_last "
          f"{cfg.train.channels_last}, compile {cfg.train.compile}  [{machine.tag}]")
    began = time.perf_counter()
    try:
        found = find_max_batch(cfg, CONFIG, str(device), log=lambda text: print(f"   {text}"))
    except Exception as exc:  # report and run the other sections
        print(f"   failed: {first_line(exc)}")
        return {"title": title, "error": first_line(exc)}
    finally:
        release(device)
    print("\n".join(f"   {line}" for line in found.format().splitlines()))
    print(f"   ({time.perf_counter() - began:.0f} s)")
    outcome = {"title": title, "result": found}
    if device.type == "cuda" and found.confirmed:
        size = found.confirmed
        print(f"   training {MEM_CHECK_STEPS} steps at the confirmed batch size {size:,} ...")
        timing = train_steps(apply_overrides(cfg, [f"train.batch_size={size}"]), device, size, MEM_CHECK_STEPS)
        outcome["check"] = timing
        if timing.error:
            print(f"   {MEM_CHECK_STEPS} steps at batch {size:,}: FAILED ({timing.error})")
        else:
            total = torch.cuda.get_device_properties(device).total_memory
            print(f"   {MEM_CHECK_STEPS} steps at batch {size:,}: OK, no out-of-memory; peak allocated "
                  f"{timing.peak_bytes / GiB:.2f} of {total / GiB:.1f} GiB; {timing.images_per_s:,.1f} img/s")
    return outcome


# ------------------------------------------------------------------ summary
def summary(machine: Machine, cases: list[dict], ratio: dict | None, encode: list[dict], mems: list[dict],
            elapsed: float) -> None:
    gpu = machine.device.type == "cuda"
    print(f"\n== summary  [{machine.tag}]")
    if not gpu:
        print("   no GPU: everything ran on the CPU. The GPU goals (bf16 + channels_last + compile >= 2x fp32 eager "
              "and MFU >= 30% on the 256 preset, 50 steps at -mem's batch size) are not judged here; the CPU "
              "figures are for reference")
    for case in cases:
        results = case["results"]
        base, fast = results.get(BASELINE), results.get(FASTEST)
        rates = {k: t.images_per_s for k, t in results.items() if t.images_per_s}
        if not rates:
            continue
        best = max(rates, key=rates.get)
        line = f"   {case['title']}: fastest {best} {rate_text(rates[best])} img/s"
        if base is not None and base.images_per_s:
            line += f" ({rates[best] / base.images_per_s:.2f}x fp32 eager)"
        print(line)
        if base is not None and base.images_per_s and fast is not None and fast.images_per_s:
            speedup = fast.images_per_s / base.images_per_s
            goal = f" (goal >= 2x: {'met' if speedup >= 2 else 'NOT met'})" if gpu and case["goals"] else ""
            print(f"     {FASTEST} over fp32 eager: {speedup:.2f}x{goal}")
        elif fast is not None:
            print(f"     {FASTEST}: {fast.skipped or fast.error or 'not measured'}")
        if gpu and machine.peak_tflops:
            flops = case["flops"]["train"]
            mfu = {k: flops * r / (machine.peak_tflops * 1e12) for k, r in rates.items()}
            top = max(mfu, key=mfu.get)
            goal = f" (goal >= 30%: {'met' if mfu[top] >= 0.30 else 'NOT met'})" if case["goals"] else ""
            print(f"     model FLOP utilisation: best {mfu[top]:.1%} ({top}) of {machine.peak_tflops:g} "
                  f"bf16 TFLOPS{goal}")
        elif gpu:
            print("     model FLOP utilisation: unknown GPU peak; pass --peak-tflops")
        else:
            flops = case["flops"]["train"]
            print(f"     achieved: best {max(flops * r for r in rates.values()) / 1e9:,.1f} GFLOPS "
                  "(counted model FLOPs; no MFU on the CPU)")
    if ratio:
        print(f"   DSL / hand-written step time: {ratio['ratio']:.3f} (goal <= 1.02; ratio of minima "
              f"{ratio['ratio_of_minima']:.3f})")
    for r in encode:
        print(f"   encode (num_workers={r['workers']}): {r['files']:,.1f} img/s end to end, {r['model']:,.1f} img/s "
              f"model only (ratio {r['ratio']:.3f})")
    for m in mems:
        if "result" not in m:
            print(f"   -mem on {m['title']}: failed ({m['error']})")
            continue
        res = m["result"]
        confirmed = f"{res.confirmed:,}" if res.confirmed is not None else "none"
        line = (f"   -mem on {m['title']}: predicted {res.predicted:,}, confirmed {confirmed}, "
                f"recommended {res.recommended:,}")
        check = m.get("check")
        if check is not None:
            line += (f"; {MEM_CHECK_STEPS} steps at the confirmed size: "
                     + (f"FAILED ({check.error})" if check.error else "OK, no out-of-memory"))
        elif not gpu:
            line += f" (the {MEM_CHECK_STEPS}-step check at the confirmed size runs on a GPU only)"
        print(line)
    print(f"   {load_text()} at the end (this bench included)")
    if machine.start_load is not None and machine.start_load >= 0.5:
        print(f"   other processes kept about {machine.start_load:.1f} CPUs busy when the bench started: "
              f"the figures are noisy and CPU ones may be low")
    print(f"   total bench time {elapsed:.0f} s")


# ------------------------------------------------------------------ main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="where to run (auto: the GPU when there is one)")
    parser.add_argument("--quick", action="store_true", help="fewer steps and repetitions; on the CPU the "
                        "preset runs at 64 px and compiles only the default model")
    parser.add_argument("--steps", type=int, default=None,
                        help="timed training steps per setting (default: as many as fit a short time budget)")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch intra-op CPU threads (default 2; 0: the usable CPUs that other processes leave idle)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the GPU's dense bf16 peak in TFLOPS, for GPUs missing from the table")
    parser.add_argument("--preset-batch", type=int, default=None,
                        help="batch size of the 256 preset (default: 16 on a GPU with 40 GiB or more, 1 on CPU)")
    parser.add_argument("--all", action="store_true", help="also run the settings skipped on the CPU as too slow")
    args = parser.parse_args()
    if args.steps is not None and args.steps < 1:
        parser.error("--steps must be at least 1")

    os.chdir(REPO)  # the config names its structures and images relative to the repository
    warnings.filterwarnings("ignore", message="skipping unreadable image")
    start("bench_speed", args.threads)
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "No CUDA runtime" on CPU compiles
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: this PyTorch sees no CUDA device")
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())

    from flexvae.config import apply_overrides, load_config

    began = time.perf_counter()
    machine = describe_machine(device, args.peak_tflops)
    print(f"bench_speed on {device}" + (" (--quick)" if args.quick else ""))
    print("\n".join(f"  {line}" for line in machine.lines))
    print("  training steps run the real Trainer path (prepare + train_step + scheduler) on one synthetic "
          "in-memory batch; images/s from the median timed step of interleaved rounds; warm-up steps not timed; "
          "compile seconds: the first step above the steady step time, cold (empty inductor cache) / warm")

    base_cfg = load_config(CONFIG)
    cases = []
    peaks = measure_peaks(device, args.quick)
    print("  practical peak measured now (TFLOP/s, median of 5): " + ", ".join(
        f"{name} {value:.3f}" for name, value in peaks.items() if name != "size")
        + f" (matmuls {peaks['size']} x {peaks['size']}; conv 64 -> 64 ch 3x3 on 16 x 32 x 32)")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        # an inductor cache of this run's own: the first compile of each setting is cold, the second warm
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(tmp / "inductor")
        for case in plan_cases(base_cfg, machine, args):
            cases.append(run_case(case, base_cfg, machine, args, tmp, peaks))
        ratio = dsl_ratio(device, args.quick)
        encode = encode_speed(base_cfg, device, args.quick, tmp)
        mems = [mem_check(f"the default config ({CONFIG})", base_cfg, machine, tmp)]
        if device.type == "cuda":
            preset = apply_overrides(base_cfg, PRESET + ["data.image_size=256", "train.precision=bf16",
                                                         "train.channels_last=true"])
            mems.append(mem_check("the 256 preset at 256 px (bf16 + channels_last)", preset, machine, tmp))
    summary(machine, cases, ratio, encode, mems, time.perf_counter() - began)


if __name__ == "__main__":
    main()
