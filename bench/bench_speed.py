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
import contextlib
import gc
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch._dynamo

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_core, bench_train

CONFIG = "configs/config.toml"
PRESET = ["model.encoder=structures/fixed256_encoder.json", "model.decoder=structures/fixed256_decoder.json"]
GiB = 2**30
MEM_CHECK_STEPS = 50

# Dense (no sparsity) bf16 tensor-core peaks in TFLOPS, from the vendors' data sheets. The
# first name contained in the device name wins, so longer names come before their prefixes.
BF16_PEAK_TFLOPS = [
    ("GH200", 989.0), ("H200 NVL", 835.0), ("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0),
    ("H100", 989.0), ("H800", 989.0), ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0),
    ("A10G", 70.0), ("A30", 165.0), ("A10", 125.0), ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0),
    ("RTX 6000 Ada", 364.0), ("RTX A6000", 155.0), ("RTX 4090", 165.0), ("RTX 3090", 71.0),
    ("MI300X", 1307.0), ("MI250X", 383.0),
]

# (label, precision, channels_last, compile), in the order printed
SETTINGS = [
    ("fp32 eager", "fp32", False, False),
    ("bf16", "bf16", False, False),
    ("bf16 + channels_last", "bf16", True, False),
    ("bf16 + channels_last + compile", "bf16", True, True),
    ("fp16 + grad scaler", "fp16", False, False),
    ("fp32 + compile", "fp32", False, True),
]
BASELINE = "fp32 eager"
FASTEST = "bf16 + channels_last + compile"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------ the machine
def cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def cpu_features() -> list[str]:
    """The instruction-set extensions that decide CPU bf16/fp16 speed, where /proc tells."""
    wanted = ["avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_fp16"]
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                return [f for f in wanted if f in flags]
    return []


def usable_cpus() -> int:
    with contextlib.suppress(AttributeError, OSError):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def ram_gib() -> float | None:
    with contextlib.suppress(OSError, ValueError, AttributeError):
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / GiB
    return None


def load_average() -> tuple[float, float, float] | None:
    with contextlib.suppress(OSError, AttributeError):
        return os.getloadavg()
    return None


def choose_threads(requested: int | None) -> tuple[int, str]:
    """torch's intra-op threads: as asked, else the usable CPUs not already kept busy by other
    processes (1-minute load average): threads competing for a busy core make every step slower."""
    if requested:
        return requested, "from --threads"
    cpus, load = usable_cpus(), load_average()
    if load is None or load[0] < 0.5:
        return cpus, "every usable CPU"
    idle = max(1, min(cpus, cpus - round(load[0])))
    if idle == cpus:
        return cpus, "every usable CPU"
    return idle, (f"{cpus} usable CPUs, 1-minute load average {load[0]:.2f} before starting: the busy ones are "
                  f"left to the other processes (--threads to choose)")


def bf16_peak(name: str, override: float | None) -> tuple[float | None, str]:
    if override:
        return override, "from --peak-tflops"
    for key, tflops in BF16_PEAK_TFLOPS:
        if key.lower() in name.lower():
            return tflops, f"table entry '{key}'"
    return None, "not in the table; pass --peak-tflops for MFU"


@dataclass
class Machine:
    device: torch.device
    lines: list[str]
    tag: str  # a short description printed beside every table
    peak_tflops: float | None = None
    start_load: float | None = None  # 1-minute load average before the bench started


def describe_machine(device: torch.device, peak_override: float | None, threads_reason: str) -> Machine:
    cpu = cpu_model()
    features = cpu_features()
    ram = ram_gib()
    load = load_average()
    lines = [
        f"CPU: {cpu}; {os.cpu_count()} logical CPUs, {usable_cpus()} usable by this process"
        + (f"; {ram:.0f} GiB RAM" if ram else "") + (f"; {', '.join(features)}" if features else ""),
        (f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}), python {platform.python_version()}, "
         f"intra-op threads {torch.get_num_threads()} ({threads_reason}), inter-op threads "
         f"{torch.get_num_interop_threads()}"),
    ]
    if load is not None:
        lines.append(f"load average at start: {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1 / 5 / 15 min)")
    peak = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        peak, source = bf16_peak(props.name, peak_override)
        lines.append(f"GPU: {props.name}, {props.total_memory / GiB:.1f} GiB, compute capability "
                     f"{props.major}.{props.minor}, {props.multi_processor_count} SMs; dense bf16 peak "
                     + (f"{peak:g} TFLOPS ({source})" if peak else source))
        tag = f"{props.name}, torch {torch.__version__}"
    else:
        why = ("CUDA is available but --device cpu was asked for" if torch.cuda.is_available()
               else "PyTorch sees no CUDA device")
        lines.append(f"GPU: none used ({why}): everything below runs on the CPU")
        threads = torch.get_num_threads()
        tag = f"CPU {cpu}, {threads} thread{'s' if threads != 1 else ''}, torch {torch.__version__}"
    return Machine(device, lines, tag, peak, load[0] if load is not None else None)


# ------------------------------------------------------------------ FLOPs
def count_flops(cfg, batch: int) -> dict:
    """FLOPs of one training forward and backward per image, counted on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    from flexvae.assemble import model_from_config

    model, plan = model_from_config(cfg, CONFIG, device="meta")
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


# ------------------------------------------------------------------ timing training steps
@dataclass
class Timing:
    label: str
    batch: int = 0
    step_s: float | None = None  # median of the timed steps
    steps: int = 0
    spread: tuple[float, float] = (0.0, 0.0)  # fastest and slowest timed step
    compile_s: float | None = None
    peak_bytes: int | None = None
    ratio: float | None = None  # speed-up over fp32 eager (ratio of median step times, interleaved)
    compile_warm_s: float | None = None
    notes: list[str] = field(default_factory=list)
    error: str | None = None
    skipped: str | None = None

    @property
    def images_per_s(self) -> float | None:
        return self.batch / self.step_s if self.step_s else None


def rate_text(rate: float) -> str:
    return f"{rate:.1f}" if rate >= 100 else f"{rate:.2f}" if rate >= 1 else f"{rate:.3f}"


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:160] if text else ''}"


def timed_step(trainer, images: torch.Tensor, device: torch.device) -> float:
    """Seconds of one ``Trainer.step_once`` (what the training loop runs per step, minus reading
    files, logging and checkpoints): flip, sampling noise, the step with its compile fallback,
    the learning-rate schedule and EMA."""
    sync(device)
    began = time.perf_counter()
    trainer.step_once([images])
    sync(device)
    return time.perf_counter() - began

@dataclass
class Prepared:
    """A setting's trainer, warmed up, waiting for its timed blocks."""

    trainer: object
    images: torch.Tensor
    timing: Timing
    times: list = field(default_factory=list)  # every timed step, seconds
    rounds: list = field(default_factory=list)  # median step time per round


def prepare_setting(cfg, device: torch.device, batch: int, label: str, warmup: int) -> Prepared | Timing:
    """A Trainer for one setting after ``warmup`` untimed steps; for a compiled setting the first
    step's time above the steady step time is the cold compile time (the bench runs with an
    empty inductor cache of its own). A Timing with the error when the setting cannot run."""
    from flexvae.train.trainer import Trainer

    timing = Timing(label, batch)
    try:
        trainer = Trainer(cfg, CONFIG, quiet=True, device=str(device))
        generator = torch.Generator().manual_seed(cfg.train.seed)
        images = trainer.runtime.to_input(torch.rand((batch, *trainer.plan.data_shape), generator=generator) * 2 - 1)
        trainer.model.train()
        warm = [timed_step(trainer, images, device) for _ in range(max(2, warmup))]
        if cfg.train.compile and trainer.runtime.compiled:
            timing.compile_s = max(0.0, warm[0] - statistics.median(warm[1:]))
        timing.notes += trainer.runtime.notes
        return Prepared(trainer, images, timing)
    except torch.cuda.OutOfMemoryError:
        timing.error = "out of memory"
    except Exception as exc:  # a setting this machine cannot run (bf16 on an old GPU...): report, go on
        timing.error = first_line(exc)
    release(device)
    return timing


def warm_compile_seconds(cfg, device: torch.device, batch: int) -> float | None:
    """Compile time again after torch._dynamo.reset(), now with inductor's cache filled."""
    from flexvae.train.trainer import Trainer

    torch._dynamo.reset()
    try:
        trainer = Trainer(cfg, CONFIG, quiet=True, device=str(device))
        images = trainer.runtime.to_input(torch.rand((batch, *trainer.plan.data_shape)) * 2 - 1)
        first = timed_step(trainer, images, device)
        steady = statistics.median([timed_step(trainer, images, device) for _ in range(2)])
        return max(0.0, first - steady) if trainer.runtime.compiled else None
    except Exception:  # measured cold already; a failure here only loses the warm figure
        return None
    finally:
        trainer = None
        release(device)


def interleave(prepared: dict, device: torch.device, rounds: int, block: int) -> None:
    """Timed blocks of ``block`` steps, every setting once per round, the order reversed on every
    other round (ABBA): drifts in machine load hit every setting alike."""
    labels = list(prepared)
    for r in range(rounds):
        for label in (labels if r % 2 == 0 else labels[::-1]):
            item = prepared[label]
            times = [timed_step(item.trainer, item.images, device) for _ in range(block)]
            item.times += times
            item.rounds.append(statistics.median(times))


# ------------------------------------------------------------------ this machine's practical peak
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


@dataclass
class Case:
    title: str
    overrides: list[str]
    batch: int
    warmup: int
    compile_warmup: int
    rounds: int  # interleaved rounds
    block: int  # timed steps per setting and round
    skip: dict = field(default_factory=dict)  # label -> reason
    note: str = ""
    goals: bool = False  # the 256 px preset: the GPU goals (speedup, MFU) are judged on it


def run_case(case: Case, base_cfg, machine: Machine, args, tmp: Path, peaks: dict) -> dict:
    from flexvae.config import apply_overrides

    device = machine.device
    cfg = apply_overrides(base_cfg, case.overrides + [
        f"train.batch_size={case.batch}", "train.grad_accum=1", f"train.device={device.type}",
        f"train.out_dir={(tmp / 'runs').as_posix()}"])
    flops = count_flops(cfg, case.batch)
    shape = "x".join(str(s) for s in flops["data_shape"])
    print(f"\n== {case.title}: {shape}, batch {case.batch}, {flops['params'] / 1e6:.2f}M parameters, latent "
          f"{'x'.join(str(s) for s in flops['latent_shape'])}  [{machine.tag}]")
    print(f"   counted FLOPs per image: forward {flops['forward'] / 1e9:.3f} G, training step (forward + backward) "
          f"{flops['train'] / 1e9:.3f} G (backward / forward = {flops['train'] / flops['forward'] - 1:.2f})")
    if case.note:
        print(f"   {case.note}")
    results, prepared, configs = {}, {}, {}
    for label, precision, channels_last, compiled in SETTINGS:
        if label in case.skip and not args.all:
            results[label] = Timing(label, case.batch, skipped=case.skip[label])
            continue
        configs[label] = apply_overrides(cfg, [f"train.precision={precision}",
                                               f"train.channels_last={str(channels_last).lower()}",
                                               f"train.compile={str(compiled).lower()}"])
        item = prepare_setting(configs[label], device, case.batch, label,
                               case.compile_warmup if compiled else case.warmup)
        if isinstance(item, Timing):
            results[label] = item
        else:
            prepared[label], results[label] = item, item.timing
    block = args.steps or case.block
    began = time.perf_counter()
    interleave(prepared, device, case.rounds, block)
    for label, item in prepared.items():
        timing = item.timing
        timing.step_s, timing.steps = statistics.median(item.times), len(item.times)
        timing.spread = (min(item.times), max(item.times))
        if device.type == "cuda":
            timing.peak_bytes = torch.cuda.max_memory_allocated(device)
    base = prepared.get(BASELINE)
    gpu = device.type == "cuda"
    unit, scale = ("TFLOPS", 1e12) if gpu else ("GFLOPS", 1e9)
    print(f"   {len(prepared)} settings interleaved: {case.rounds} rounds of {block} steps each, order reversed every "
          f"other round ({time.perf_counter() - began:.0f} s); speed-up = ratio of median step times, with the "
          f"min..max of the per-round ratios; peak = this run's {'bf16' if gpu else 'fp32/bf16'} matmul")
    header = f"   {'setting':<31} {'img/s':>9} {'ms/step':>9} {'vs fp32 (rounds)':>20} {unit:>8} {'of peak':>7}"
    if gpu:
        header += f" {'MFU':>6}"
    print(header + f" {'compile s cold/warm':>19}  notes")
    for label, _, _, compiled in SETTINGS:
        timing = results[label]
        if timing.skipped:
            print(f"   {label:<31} {'skipped':>9}  {timing.skipped}")
            continue
        if timing.error:
            print(f"   {label:<31} {'failed':>9}  {timing.error}")
            continue
        item = prepared[label]
        rate = timing.images_per_s
        ratio = "-"
        if base is not None and label != BASELINE:
            per_round = [b / s for b, s in zip(base.rounds, item.rounds)]
            timing.ratio = base.timing.step_s / timing.step_s
            ratio = f"{timing.ratio:.2f}x ({min(per_round):.2f}..{max(per_round):.2f})"
        achieved = flops["train"] * rate
        row = (f"   {label:<31} {rate_text(rate):>9} {timing.step_s * 1e3:9.1f} {ratio:>20} {achieved / scale:8.2f} "
               f"{achieved / peak_for(label, peaks):7.1%}")
        if gpu:
            row += f" {f'{achieved / (machine.peak_tflops * 1e12):.1%}' if machine.peak_tflops else '-':>6}"
        compile_text = "-"
        if compiled and timing.compile_s is not None:
            warm = warm_compile_seconds(configs[label], device, case.batch)
            timing.compile_warm_s = warm
            compile_text = f"{timing.compile_s:.1f}/{warm:.1f}" if warm is not None else f"{timing.compile_s:.1f}/-"
        notes = [f"steps {timing.spread[0] * 1e3:.0f}..{timing.spread[1] * 1e3:.0f} ms"] + timing.notes
        print(row + f" {compile_text:>19}  {'; '.join(notes)}")
    prepared.clear()
    torch._dynamo.reset()
    release(device)
    return {"flops": flops, "results": results, "batch": case.batch, "title": case.title, "goals": case.goals}


def plan_cases(base_cfg, machine: Machine, args) -> list[Case]:
    gpu = machine.device.type == "cuda"
    small_title = (f"default config ({CONFIG}: {Path(str(base_cfg.model.encoder)).name} + "
                   f"{Path(str(base_cfg.model.decoder)).name}, {base_cfg.data.image_size} px)")
    if gpu:
        memory = torch.cuda.get_device_properties(machine.device).total_memory / GiB
        preset_batch = args.preset_batch or (16 if memory >= 40 else 8 if memory >= 16 else 2)
        rounds, block = (4, 5) if args.quick else (6, 10)
        return [
            Case(small_title, [], base_cfg.train.batch_size, 5, 3, rounds, block),
            Case("256x256 preset (structures/fixed256_*.json, 256 px)", PRESET + ["data.image_size=256"],
                 preset_batch, 3, 3, rounds, block, goals=True),
        ]
    # fp16 on the CPU has no fast convolution kernels (tens of times slower): left out unless --all
    fp16 = "fp16 on the CPU: no fast fp16 convolution kernels (--all runs it)"
    small_skip, preset_skip = {"fp16 + grad scaler": fp16}, {"fp16 + grad scaler": fp16}
    if args.quick:
        small_skip["fp32 + compile"] = "--quick: one compiled setting per model"
        preset_skip[FASTEST] = "--quick on the CPU: compiling the preset takes minutes (run without --quick)"
        preset_skip["fp32 + compile"] = "--quick on the CPU: compiling the preset takes minutes"
    size = 64 if args.quick else 256
    note = ("--quick on the CPU: the preset runs at 64 px instead of 256 px, batch 1" if args.quick else
            "on the CPU the preset trains at batch 1 for a few steps (seconds per fp32 step)")
    return [
        Case(small_title, [], base_cfg.train.batch_size, 2, 2, 4 if args.quick else 6, 3 if args.quick else 5,
             small_skip),
        Case(f"256x256 preset (structures/fixed256_*.json) at {size} px", PRESET + [f"data.image_size={size}"],
             args.preset_batch or 1, 1, 2, 4, 1 if args.quick else 2, preset_skip, note, goals=not args.quick),
    ]


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
    load = load_average()
    if load is not None:
        print(f"   load average at the end: {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} on {usable_cpus()} usable "
              f"CPUs (this bench included)")
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
    threads, threads_reason = choose_threads(args.threads)
    torch.set_num_threads(threads)
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "No CUDA runtime" on CPU compiles
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: this PyTorch sees no CUDA device")
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())

    from flexvae.config import apply_overrides, load_config

    began = time.perf_counter()
    machine = describe_machine(device, args.peak_tflops, threads_reason)
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
