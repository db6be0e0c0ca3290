"""bench_speed's first section: one training setup timed in every precision, memory layout
and compile setting (SETTINGS), each by its own Trainer, in interleaved rounds. A helper, not
a bench."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch._dynamo

from common import GiB, Machine, Series, first_line, interleaved, ratio_of_medians, release, seconds
from flops import count_flops, peak_for

CONFIG = "configs/config.toml"
PRESET = ["model.encoder=structures/fixed256_encoder.json", "model.decoder=structures/fixed256_decoder.json"]

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


def timed_step(trainer, images: torch.Tensor, device: torch.device) -> float:
    """Seconds of one ``Trainer.step_once`` (what the training loop runs per step, minus reading
    files, logging and checkpoints): flip, sampling noise, the step with its compile fallback,
    the learning-rate schedule and EMA."""
    return seconds(lambda: trainer.step_once([images]), device)


@dataclass
class Prepared:
    """A setting's trainer, warmed up, waiting for its timed blocks."""

    trainer: object
    images: torch.Tensor
    timing: Timing
    series: Series | None = None  # the timed steps, by round


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
    flops = count_flops(cfg, CONFIG, case.batch)
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
    steps = {label: (lambda item=item: item.trainer.step_once([item.images])) for label, item in prepared.items()}
    for label, series in interleaved(steps, case.rounds, device, per_round=block).items():
        item, timing = prepared[label], prepared[label].timing
        item.series = series
        timing.step_s, timing.steps = series.median, len(series.all)
        timing.spread = (min(series.all), max(series.all))
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
            speedup = ratio_of_medians(base.series, item.series)
            timing.ratio = speedup.value
            ratio = f"{speedup.value:.2f}x ({speedup.low:.2f}..{speedup.high:.2f})"
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
