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

import contextlib
import copy
import ctypes
import ctypes.util
import dataclasses
import functools
import gc
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from ..config import config_from_dict, config_to_dict, resolve_device
from ..errors import FlexVAEError
from ..loading import model_from_config
from ..losses import check_loss_config
from .runtime import prepare
from .trainer import make_optimizer, train_step

MiB = 2**20
CPU_CONFIRM_SECONDS = 10.0  # longest CPU confirmation step we are willing to run
CPU_CONFIRM_SAFETY = 1.25  # the CPU confirmation step must fit even if the fit is 25% low
BACKOFF = 0.9  # after an out-of-memory error, retry at 90% of the size


# ------------------------------------------------------------------ pure arithmetic
def fit_linear(sizes, peaks) -> tuple[float, float]:
    """Least-squares line peak = fixed + per_sample * size; returns (fixed, per_sample)."""
    if len(sizes) != len(peaks) or len(set(sizes)) < 2:
        raise FlexVAEError(f"a memory fit needs at least two different batch sizes, got {list(sizes)}")
    n = len(sizes)
    mean_size, mean_peak = sum(sizes) / n, sum(peaks) / n
    spread = sum((s - mean_size) ** 2 for s in sizes)
    per_sample = sum((s - mean_size) * (p - mean_peak) for s, p in zip(sizes, peaks)) / spread
    return mean_peak - per_sample * mean_size, per_sample


def predict_batch(fixed: float, per_sample: float, budget: float, max_batch: int) -> int:
    """Largest batch with fixed + per_sample * batch <= budget, at most max_batch."""
    if per_sample <= 0:
        raise ValueError(f"per-sample memory must be positive, got {per_sample}")
    if fixed + per_sample > budget:
        raise FlexVAEError(
            f"even batch size 1 does not fit: a training step needs about {(fixed + per_sample) / MiB:,.1f} MiB, "
            f"the budget is {budget / MiB:,.1f} MiB. Use a smaller model or image size, or another device")
    return max(1, min(max_batch, math.floor((budget - fixed) / per_sample)))


# ------------------------------------------------------------------ result
@dataclass
class MemResult:
    device: str
    probe_sizes: list[int]
    probe_peaks_bytes: list[int]
    fixed_bytes: float
    per_sample_bytes: float
    budget_bytes: int
    predicted: int
    confirmed: int | None
    confirm_note: str
    probes: int  # training steps run, warm-up and confirmation included
    budget_note: str = ""
    notes: list[str] = field(default_factory=list)
    capped: bool = False  # the confirmation step ran below the prediction (CPU time or RAM safety)

    @property
    def recommended(self) -> int:
        """The size to train with: the confirmed one, or the prediction when only a smaller step was run."""
        return self.predicted if self.capped or self.confirmed is None else self.confirmed

    def format(self) -> str:
        peaks = ", ".join(f"{s}: {p / MiB:,.1f}" for s, p in zip(self.probe_sizes, self.probe_peaks_bytes))
        confirmed = f"{self.confirmed:,}" if self.confirmed is not None else "none"
        lines = [
            f"batch-size search on {self.device} (whole training steps: forward, loss, backward, AdamW step)",
            f"  probe peaks (batch: MiB): {peaks}",
            f"  per-sample memory:       {self.per_sample_bytes / MiB:,.2f} MiB",
            f"  fixed memory:            {self.fixed_bytes / MiB:,.1f} MiB "
            f"(runtime, weights, gradients, optimizer state)",
            f"  budget:                  {self.budget_bytes / MiB:,.1f} MiB {self.budget_note}".rstrip(),
            f"  predicted batch size:    {self.predicted:,}",
            f"  confirmed batch size:    {confirmed} ({self.confirm_note})",
            f"  recommended batch size:  {self.recommended:,}",
            f"  training steps run:      {self.probes}",
        ]
        return "\n".join(lines + [f"  note: {note}" for note in self.notes])


# ------------------------------------------------------------------ CPU memory readings
def _proc_status_bytes(key: str) -> int:
    with open("/proc/self/status") as fh:
        return int(re.search(rf"^{key}:\s+(\d+) kB", fh.read(), re.M).group(1)) * 1024


@functools.cache
def _glibc_malloc_trim():
    """glibc's malloc_trim, or None on other C libraries."""
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    except OSError:
        return None


def _trim_heap() -> None:
    """Hand freed heap pages back to the system, so an earlier probe's memory does not count."""
    gc.collect()
    malloc_trim = _glibc_malloc_trim()
    if malloc_trim is not None:
        malloc_trim(0)


def _reset_high_water_mark() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        _proc_status_bytes("VmHWM")
        return True
    except (OSError, AttributeError):
        return False


def _own_rss() -> int:
    try:
        return _proc_status_bytes("VmRSS")
    except (OSError, AttributeError):
        import resource  # peak, not current: an overestimate that errs on the safe side

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss if sys.platform == "darwin" else rss * 1024


def _cgroup_room() -> int | None:
    """Bytes left under this process's cgroup memory limit (containers), or None without a limit."""
    try:
        with open("/proc/self/cgroup") as fh:
            groups = [line.strip().split(":", 2) for line in fh if line.count(":") >= 2]
    except OSError:
        return None
    files = []
    for _, controllers, path in groups:
        path = path.lstrip("/")
        if controllers == "":
            files += [(f"/sys/fs/cgroup/{p}/memory.max", f"/sys/fs/cgroup/{p}/memory.current") for p in (path, "")]
        elif "memory" in controllers.split(","):
            files += [(f"/sys/fs/cgroup/memory/{p}/memory.limit_in_bytes",
                       f"/sys/fs/cgroup/memory/{p}/memory.usage_in_bytes") for p in (path, "")]
    for limit_file, usage_file in files:
        try:
            limit = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 2**60:
            return max(0, int(limit) - usage)
    return None


def available_memory() -> int:
    """Bytes of RAM that new allocations can still get (MemAvailable, within any cgroup limit)."""
    available = None
    with contextlib.suppress(OSError, AttributeError):
        with open("/proc/meminfo") as fh:
            available = int(re.search(r"^MemAvailable:\s+(\d+) kB", fh.read(), re.M).group(1)) * 1024
    if available is None:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            raise FlexVAEError("cannot tell how much memory is free on this machine") from None
    room = _cgroup_room()
    return available if room is None else min(available, room)


# ------------------------------------------------------------------ measuring steps
class StepRunner:
    """The configured model and its AdamW optimizer on one device, running real training steps
    on random images in [-1, 1]; ``measure`` returns a step's (peak bytes, seconds)."""

    def __init__(self, cfg, config_path=None, device: str | torch.device = "cpu"):
        self.cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, grad_accum=1))
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.model, self.plan = model_from_config(self.cfg, config_path, device=self.device)
        check_loss_config(self.cfg.loss, self.plan.data_shape)
        self.model.train()
        # Precision, channels_last, grad checkpointing and compile as the trainer applies them.
        self.runtime = prepare(self.model, self.cfg, self.device)
        self.optimizer = make_optimizer(self.model, self.cfg.train)
        self.steps = 0
        self.reserved_peak = 0  # CUDA: the caching allocator's peak in the last measured step

    def step(self, batch_size: int) -> None:
        images = torch.empty((batch_size, *self.plan.data_shape), device=self.device).uniform_(-1, 1)
        self.steps += 1
        train_step(self.runtime, [self.runtime.to_input(images)], self.optimizer, self.cfg, self.steps)

    def measure(self, batch_size: int) -> tuple[int, float]:
        cuda = self.device.type == "cuda"
        if cuda:
            gc.collect()
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            _trim_heap()
            if not _reset_high_water_mark():
                raise FlexVAEError("measuring CPU memory in-process needs Linux's /proc/self/clear_refs")
        start = time.perf_counter()
        self.step(batch_size)
        if cuda:
            torch.cuda.synchronize(self.device)
            self.reserved_peak = torch.cuda.max_memory_reserved(self.device)
            return torch.cuda.max_memory_allocated(self.device), time.perf_counter() - start
        return _proc_status_bytes("VmHWM"), time.perf_counter() - start

    def release(self) -> None:
        """Free what a failed step left behind (gradients, cached blocks)."""
        self.optimizer.zero_grad(set_to_none=True)
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


class ChildRunner:
    """CPU probes without /proc: each measurement runs in a fresh child process (warm-up step,
    then the measured step) whose own peak resident memory ``os.wait4`` reports."""

    def __init__(self, cfg, config_path=None):
        self.request = {"config": config_to_dict(cfg),
                        "config_path": None if config_path is None else str(config_path)}
        self.steps = 0

    def measure(self, batch_size: int) -> tuple[int, float]:
        package_root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])))
        code = f"from {__name__} import _child_main; _child_main()"
        files = [tempfile.TemporaryFile("w+") for _ in range(3)]
        with files[0] as stdin, files[1] as out, files[2] as err:
            json.dump({**self.request, "batch_size": batch_size}, stdin)
            stdin.seek(0)
            child = subprocess.Popen([sys.executable, "-c", code], stdin=stdin, stdout=out, stderr=err, env=env)
            _, status, usage = os.wait4(child.pid, 0)  # this child's own peak, unlike RUSAGE_CHILDREN
            child.returncode = os.waitstatus_to_exitcode(status)
            out.seek(0)
            err.seek(0)
            text, errors = out.read(), err.read()
        self.steps += 2
        if child.returncode != 0:
            raise FlexVAEError(f"the probe at batch size {batch_size} failed in its child process:\n"
                               f"{errors.strip()[-2000:]}")
        peak = usage.ru_maxrss if sys.platform == "darwin" else usage.ru_maxrss * 1024  # bytes vs KiB
        return peak, json.loads(text)["seconds"]


def _child_main() -> None:
    request = json.load(sys.stdin)
    runner = StepRunner(config_from_dict(request["config"], "<probe request>"), request["config_path"], "cpu")
    runner.step(request["batch_size"])  # warm-up: AdamW's state is allocated here
    start = time.perf_counter()
    runner.step(request["batch_size"])
    print(json.dumps({"seconds": time.perf_counter() - start}))


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
    room = available_memory() - (fixed - (_own_rss() if in_process else 0))
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
    _trim_heap()
    available, baseline = available_memory(), _own_rss()
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
        cpu_method = "proc" if _reset_high_water_mark() else "child"
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
    return MemResult(str(device), sizes, peaks, fixed, per_sample, budget, predicted, confirmed, confirm_note,
                     runner.steps, budget_note, notes, capped)


# ------------------------------------------------------------------ writing the result
_HEADER = re.compile(r"^\s*\[(\[?)([^\[\]]*)\]\]?\s*(#.*)?$")
# (key and "="), (the value: an integer has no "#"), (spaces and comment)
_ASSIGN = r"""\s*(?:batch_size|"batch_size"|'batch_size')\s*=\s*)([^#\r\n]*?)(\s*(?:#.*)?)$"""
_KEY = re.compile(r"^(\s*" + _ASSIGN)
_ROOT_KEY = re.compile(r"^(\s*train\s*\.\s*" + _ASSIGN)  # train.batch_size = ... before any header


def _table_name(line: str) -> str | None:
    """'train' for a ``[train]`` header line; '[x]' style for ``[[x]]``; None for other lines."""
    match = _HEADER.match(line.rstrip("\r\n"))
    if not match:
        return None
    name = ".".join(part.strip().strip("\"'") for part in match.group(2).split("."))
    return f"[{name}]" if match.group(1) else name


def set_batch_size_text(text: str, batch_size: int) -> str:
    """The TOML text with ``[train] batch_size`` set, every other line kept as it was."""
    lines = text.splitlines(keepends=True)
    newline = "\r\n" if lines and lines[0].endswith("\r\n") else "\n"
    tables = [(i, _table_name(line)) for i, line in enumerate(lines)]
    headers = [i for i, name in tables if name is not None]
    root_end = headers[0] if headers else len(lines)
    starts = [i for i, name in tables if name == "train"]
    ranges = [(s + 1, next((h for h in headers if h > s), len(lines))) for s in starts]
    for first, end, pattern in [(0, root_end, _ROOT_KEY)] + [(a, b, _KEY) for a, b in ranges]:
        for i in range(first, end):
            body = lines[i].rstrip("\r\n")
            match = pattern.match(body)
            if match:
                lines[i] = f"{match.group(1)}{batch_size}{match.group(3)}{lines[i][len(body):]}"
                return "".join(lines)
    if ranges:  # [train] without the key: add it after the table's last key line
        first, end = ranges[0]
        keyed = [i for i in range(first, end) if lines[i].strip() and not lines[i].lstrip().startswith("#")]
        at, line = (keyed[-1] + 1 if keyed else first), f"batch_size = {batch_size}{newline}"
    else:
        at, line = len(lines), f"{newline if lines else ''}[train]{newline}batch_size = {batch_size}{newline}"
    if at > 0 and not lines[at - 1].endswith(("\n", "\r")):
        lines[at - 1] += newline
    lines.insert(at, line)
    return "".join(lines)


def write_batch_size(config_path, batch_size: int) -> None:
    """Set ``batch_size`` in the ``[train]`` table of a TOML config in place, keeping comments,
    order and every other value; written atomically and checked by parsing it back."""
    if config_path is None:
        raise FlexVAEError("--write needs a config file to update: pass it with -c/--config")
    path = Path(os.path.realpath(config_path))
    try:
        text = path.read_bytes().decode("utf-8")
        before = tomllib.loads(text)
    except FileNotFoundError:
        raise FlexVAEError(f"config file not found: {config_path}") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise FlexVAEError(f"cannot update {config_path}: {exc}") from None
    if not isinstance(before.get("train", {}), dict):
        raise FlexVAEError(f"{config_path}: 'train' must be a table ([train] header)")
    new_text = set_batch_size_text(text, int(batch_size))
    expected = copy.deepcopy(before)
    expected.setdefault("train", {})["batch_size"] = int(batch_size)
    try:
        after = tomllib.loads(new_text)
    except tomllib.TOMLDecodeError:
        after = None
    if after != expected:
        raise FlexVAEError(f"could not update {config_path} safely; set batch_size = {batch_size} "
                           f"under [train] by hand")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(new_text.encode("utf-8"))
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, path.stat().st_mode & 0o7777)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
