"""The largest training batch that fits: measure whole training steps, fit a line, predict, confirm.

A training step's peak memory grows linearly with the batch: the runtime, weights, gradients
and AdamW state are fixed; inputs and activations (SSIM included when it is on) grow per
sample. Each probe runs the real ``train_step`` (forward, loss, backward, clipping, optimizer
step) on random images, after one warm-up step so that AdamW's state already exists. Only one
micro-batch is measured (grad_accum = 1): the micro-batch is what has to fit.

Peaks: on CUDA the allocator's peak (``max_memory_allocated``). On CPU the process's peak
resident memory: in this process through Linux's resettable high-water mark (``VmHWM`` after
writing 5 to ``/proc/self/clear_refs``), else one fresh child process per probe whose own peak
``os.wait4`` reports.
"""

from __future__ import annotations

import math
import os

import torch

from ..device import resolve_device
from ..errors import FlexVAEError
from .memory_fit import MiB, MemResult, fit_linear, predict_batch
from ..sysmem import available_memory
from .memory_probe import ChildRunner, StepRunner, own_rss, reset_high_water_mark, trim_heap

CPU_CONFIRM_SECONDS = 10.0  # longest CPU confirmation step we are willing to run
CPU_CONFIRM_SAFETY = 1.25  # the CPU confirmation step must fit even if the fit is 25% low
BACKOFF = 0.9  # after an out-of-memory error, retry at 90% of the size


# ------------------------------------------------------------------ the search
def _out_of_memory_errors(device) -> tuple:
    return (torch.cuda.OutOfMemoryError,) if device.type == "cuda" else ()


def _probe(runner, sizes, log, device) -> tuple[list[int], list[float], int | None]:
    """Peaks and durations at each size, up to the first size that runs out of memory (returned last)."""
    peaks, timings = [], []
    for size in sizes:
        try:
            peak, seconds = runner.measure(size)
        except _out_of_memory_errors(device):
            peak = None
        if peak is None:
            runner.release()
            log(f"  batch {size}: out of memory")
            return peaks, timings, size
        peaks.append(peak)
        timings.append(seconds)
        log(f"  batch {size}: peak {peak / MiB:,.1f} MiB, {seconds:.2f} s")
    return peaks, timings, None


def _warm_up(runner, sizes, device) -> None:
    """One unmeasured step, at the largest probe size when it fits: AdamW's state and one-off
    allocations (some kernels set up buffers only for batches above 1) exist before measuring."""
    for size in (sizes[-1], sizes[0]):
        try:
            runner.step(size)
            return
        except _out_of_memory_errors(device):
            pass
        runner.release()
    raise FlexVAEError(f"a training step at batch size {sizes[0]} already runs out of memory on {device}")


def _cpu_confirm_cap(sizes, seconds) -> int:
    """Batch whose step should take at most CPU_CONFIRM_SECONDS, charging the largest probe's time
    per sample to every sample (an upper bound on the rate: it includes the per-step overhead)."""
    return max(1, math.floor(CPU_CONFIRM_SECONDS * sizes[-1] / max(seconds[-1], 1e-9)))


def _confirm_cuda(runner, size: int, log) -> tuple[int, str]:
    """Run two real steps at ``size``; on out-of-memory back off by 10% and try again."""
    first = size
    while size >= 1:
        try:
            runner.measure(size)
            peak, _ = runner.measure(size)
        except torch.cuda.OutOfMemoryError:
            peak = None
        if peak is not None:
            backed = f", backed off from {first:,}" if size < first else ""
            return size, f"two training steps ran, peak {peak / MiB:,.1f} MiB{backed}"
        runner.release()
        smaller = min(size - 1, math.floor(size * BACKOFF))
        log(f"  batch {size:,} ran out of memory; trying {smaller:,}")
        size = smaller
    raise FlexVAEError("even batch size 1 ran out of memory in a real training step")


def _confirm_cpu(runner, predicted, sizes, timings, fixed, per_sample, in_process, log) -> tuple[int, str, bool]:
    """One real step at the prediction, or at a smaller size when the full step would take too
    long or could not keep a safety margin of free RAM."""
    time_cap = _cpu_confirm_cap(sizes, timings)
    # RAM the step may add: what is free now, with room for a fit that is 25% low
    room = available_memory() - (fixed - (own_rss() if in_process else 0))
    memory_cap = max(1, math.floor(room / (per_sample * CPU_CONFIRM_SAFETY)))
    size = min(predicted, time_cap, memory_cap)
    peak, seconds = runner.measure(size)
    log(f"  batch {size:,}: peak {peak / MiB:,.1f} MiB, {seconds:.2f} s")
    note = (f"one training step ran in {seconds:.1f} s, peak {peak / MiB:,.1f} MiB; "
            f"the fit expected {(fixed + per_sample * size) / MiB:,.1f} MiB")
    if size < predicted:
        why = "to keep it under ~10 s on this CPU" if size == time_cap else "to keep a safe margin of free RAM"
        note += f"; capped below the prediction {why}, so {predicted:,} itself rests on the fit"
    return size, note, size < predicted


def _budget(device, runner, margin) -> tuple[int, str]:
    if device.type == "cuda":
        runner.release()
        free, total = torch.cuda.mem_get_info(device)
        usable = free + torch.cuda.memory_reserved(device)  # blocks this process holds are reused
        return int(usable * margin), (f"({margin:.0%} of {usable / MiB:,.1f} MiB: free device memory plus "
                                      f"what this process holds; device total {total / MiB:,.1f} MiB)")
    trim_heap()
    available, baseline = available_memory(), own_rss()
    return int((available + baseline) * margin), (f"({margin:.0%} of {available / MiB:,.1f} MiB available "
                                                  f"RAM plus this process's {baseline / MiB:,.1f} MiB)")


def find_max_batch(cfg, config_path=None, device=None, log=print, *, cpu_method: str = "auto") -> MemResult:
    """Measure whole training steps at ``mem.probe_sizes`` and predict the largest batch that fits.

    ``cpu_method``: 'proc' (in this process, Linux), 'child' (a child process per probe) or 'auto'.
    """
    device = torch.device(resolve_device(device or cfg.train.device))
    if device.type not in ("cuda", "cpu"):
        raise FlexVAEError(f"-mem measures memory on cuda or cpu, not {device.type}; pass --device cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FlexVAEError(f"device {device} was asked for, but this PyTorch sees no CUDA device")
    sizes = sorted(set(cfg.mem.probe_sizes))
    if len(sizes) < 2:
        raise FlexVAEError(f"mem.probe_sizes needs at least two different batch sizes, got {cfg.mem.probe_sizes}")
    notes = []
    if device.type == "cpu" and cpu_method == "auto":
        cpu_method = "proc" if reset_high_water_mark() else "child"
    in_process = device.type == "cuda" or cpu_method == "proc"
    if not in_process and not hasattr(os, "wait4"):
        raise FlexVAEError("measuring CPU memory needs Linux or macOS (a process's own peak memory)")
    if not in_process and sizes[0] == 1:
        # on CPU a batch of 1 skips kernels that set up extra buffers for larger batches (oneDNN
        # convolutions); in-process the warm-up hides this, a fresh child per probe cannot
        sizes = [s for s in sizes if s > 1] if len(sizes) > 2 else [2 * s for s in sizes]
        notes.append("batch 1 left out of the probes in child processes: it takes other CPU kernels")
    if not in_process:
        notes.append("CPU peaks measured in one fresh child process per probe (no resettable peak in /proc)")
    runner = StepRunner(cfg, config_path, device) if in_process else ChildRunner(cfg, config_path)
    log(f"probing whole training steps on {device} at batch sizes {sizes}")
    if in_process:
        _warm_up(runner, sizes, device)
    for attempt in range(2):
        peaks, timings, failed = _probe(runner, sizes, log, device)
        sizes = sizes[:len(peaks)]
        if len(sizes) < 2:
            raise FlexVAEError(f"batch size {failed} runs out of memory on {device} before two probes were "
                               f"measured; set mem.probe_sizes to smaller sizes, e.g. [1, 2]")
        fixed, per_sample = fit_linear(sizes, peaks)
        if per_sample > 0:
            break
        if attempt == 0:
            log(f"  measurements too noisy (per-sample memory came out {per_sample / MiB:,.3f} MiB); "
                f"probing again at doubled sizes")
            sizes = [2 * s for s in sizes]
    else:
        raise FlexVAEError(
            f"the per-sample memory is too small to measure against noise (fit gave {per_sample / MiB:,.3f} MiB); "
            f"set mem.probe_sizes to larger batch sizes, e.g. [16, 32, 64]")

    scatter = max(abs(p - fixed - per_sample * s) for s, p in zip(sizes, peaks))
    if scatter > 0.25 * per_sample * (sizes[-1] - sizes[0]):
        notes.append(f"the probes scatter by up to {scatter / MiB:,.1f} MiB around the fitted line; "
                     f"larger mem.probe_sizes give a steadier fit")
    budget, budget_note = _budget(device, runner, cfg.mem.margin)
    if device.type == "cuda":
        notes.append(f"allocator reserved up to {runner.reserved_peak / MiB:,.1f} MiB at batch {sizes[-1]} "
                     f"(allocated {peaks[-1] / MiB:,.1f} MiB)")
    predicted = predict_batch(fixed, per_sample, budget, cfg.mem.max_batch)
    if failed is not None and predicted >= failed:
        predicted = failed - 1
        notes.append(f"kept below batch {failed}, which ran out of memory while probing")
    elif predicted == cfg.mem.max_batch:
        notes.append(f"capped at mem.max_batch = {cfg.mem.max_batch:,}")
    log(f"predicted batch size {predicted:,}; confirming with a real training step")

    if device.type == "cuda":
        confirmed, confirm_note = _confirm_cuda(runner, predicted, log)
        capped = False
    else:
        confirmed, confirm_note, capped = _confirm_cpu(runner, predicted, sizes, timings, fixed, per_sample,
                                                       in_process, log)
    result = MemResult(str(device), sizes, peaks, fixed, per_sample, budget, predicted, confirmed, confirm_note,
                       runner.steps, budget_note, notes, capped)
    if device.type == "cpu":  # a batch that fits in RAM can still take minutes a step on a CPU
        result.limit_to(_cpu_confirm_cap(sizes, timings),
                        f"a training step of a larger batch takes over ~{CPU_CONFIRM_SECONDS:.0f} s on this CPU "
                        f"(memory alone allows {predicted:,}; run -mem on the GPU you will train on)")
    return result
