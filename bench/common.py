"""What every bench script shares: the machine it ran on, the load beside the figures, the
thread count, and interleaved timing (A B B A rounds, ratio of medians, min..max per round).

A helper, not a bench: scripts in this folder import it as ``import common`` (the folder of a
script run as ``python bench/x.py`` is first on ``sys.path``).
"""

from __future__ import annotations

import contextlib
import gc
import os
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

GiB = 2**30

# Dense (no sparsity) bf16 tensor-core peaks in TFLOPS, from the vendors' data sheets. The
# first name contained in the device name wins, so longer names come before their prefixes.
BF16_PEAK_TFLOPS = [
    ("GH200", 989.0), ("H200 NVL", 835.0), ("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0),
    ("H100", 989.0), ("H800", 989.0), ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0),
    ("A10G", 70.0), ("A30", 165.0), ("A10", 125.0), ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0),
    ("RTX 6000 Ada", 364.0), ("RTX A6000", 155.0), ("RTX 4090", 165.0), ("RTX 3090", 71.0),
    ("MI300X", 1307.0), ("MI250X", 383.0),
]


# ------------------------------------------------------------------ load and threads
def load_average() -> tuple[float, float, float] | None:
    with contextlib.suppress(OSError, AttributeError):
        return os.getloadavg()
    return None


def load_text() -> str:
    """'load average 1.02 / 0.98 / 0.75 (1 / 5 / 15 min)', or why there is none."""
    load = load_average()
    if load is None:
        return "load average: not available on this system"
    return f"load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1 / 5 / 15 min)"


def usable_cpus() -> int:
    with contextlib.suppress(AttributeError, OSError):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


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


def start(name: str, threads: int | None) -> int:
    """Fix torch's thread count (``threads``; 0 or None: the idle usable CPUs) and print the
    line every bench begins with: the script, the threads, the CPUs and the load now."""
    count, why = choose_threads(threads)
    torch.set_num_threads(count)
    print(f"{name}: torch {torch.__version__}, {count} thread{'s' if count != 1 else ''} ({why}) of "
          f"{usable_cpus()} usable CPUs; {load_text()} at the start")
    return count


def finish(began: float) -> None:
    """The closing line: the bench's time and the load it ran under (itself included)."""
    print(f"bench time {time.perf_counter() - began:.0f} s; {load_text()} at the end (this bench included)")


# ------------------------------------------------------------------ timing
def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def release(device: torch.device | str) -> None:
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def seconds(fn: Callable[[], object], device: torch.device | str = "cpu") -> float:
    """Wall seconds of one call, the device synchronised before and after."""
    sync(device)
    began = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - began


@dataclass
class Series:
    """One run's timings from ``interleaved``: ``samples[r]`` holds round r's seconds."""

    samples: list[list[float]]

    @property
    def rounds(self) -> list[float]:
        """The median of each round."""
        return [statistics.median(one) for one in self.samples]

    @property
    def all(self) -> list[float]:
        return [t for one in self.samples for t in one]

    @property
    def median(self) -> float:
        return statistics.median(self.all)


def interleaved(runs: dict[str, Callable[[], object]], rounds: int, device: torch.device | str = "cpu",
                per_round: int = 1) -> dict[str, Series]:
    """Each run timed ``per_round`` times in every round, the order reversed on every other round
    (A B, B A, ...), so a drift in the machine's load hits every run alike."""
    names = list(runs)
    found = {name: Series([]) for name in names}
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            found[name].samples.append([seconds(runs[name], device) for _ in range(per_round)])
    return found


@dataclass
class Ratio:
    """median(a) / median(b) over interleaved rounds, with the range of the per-round ratios."""

    value: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.value:.3f} (rounds {self.low:.3f}..{self.high:.3f})"


def ratio_of_medians(a: Series, b: Series) -> Ratio:
    """How many times ``a`` takes ``b``'s time: median over median of every sample, and the
    min..max of the ratios of the round medians."""
    per_round = [x / y for x, y in zip(a.rounds, b.rounds)]
    return Ratio(a.median / b.median, min(per_round), max(per_round))


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:160] if text else ''}"


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


def ram_gib() -> float | None:
    with contextlib.suppress(OSError, ValueError, AttributeError):
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / GiB
    return None


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


def describe_machine(device: torch.device, peak_override: float | None = None,
                     threads_reason: str = "") -> Machine:
    """The CPU, memory, torch, threads, load and GPU (with its bf16 peak) as printable lines."""
    cpu, features, ram, load = cpu_model(), cpu_features(), ram_gib(), load_average()
    lines = [
        f"CPU: {cpu}; {os.cpu_count()} logical CPUs, {usable_cpus()} usable by this process"
        + (f"; {ram:.0f} GiB RAM" if ram else "") + (f"; {', '.join(features)}" if features else ""),
        (f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}), python {platform.python_version()}, "
         f"intra-op threads {torch.get_num_threads()}" + (f" ({threads_reason})" if threads_reason else "")
         + f", inter-op threads {torch.get_num_interop_threads()}"),
        f"{load_text()} at the start",
    ]
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
