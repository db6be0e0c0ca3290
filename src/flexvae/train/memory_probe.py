"""Measuring one training step's peak memory: in this process (CUDA, or Linux's resettable
CPU high-water mark) or in a fresh child process per probe whose own peak ``os.wait4`` reports."""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import functools
import gc
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from ..config import config_from_dict, config_to_dict
from ..errors import FlexVAEError
from ..assemble import model_from_config
from ..objective import Objective, check_loss_config
from .runtime import prepare
from .step import make_optimizer, train_step


# ------------------------------------------------------------------ CPU memory readings
def proc_status_bytes(key: str) -> int:
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


def trim_heap() -> None:
    """Hand freed heap pages back to the system, so an earlier probe's memory does not count."""
    gc.collect()
    malloc_trim = _glibc_malloc_trim()
    if malloc_trim is not None:
        malloc_trim(0)


def reset_high_water_mark() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        proc_status_bytes("VmHWM")
        return True
    except (OSError, AttributeError):
        return False


def own_rss() -> int:
    try:
        return proc_status_bytes("VmRSS")
    except (OSError, AttributeError):
        import resource  # peak, not current: an overestimate that errs on the safe side

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss if sys.platform == "darwin" else rss * 1024


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
        check_loss_config(self.cfg, self.plan.data_shape)
        self.model.train()
        # Precision, channels_last, grad checkpointing and compile as the trainer applies them.
        self.runtime = prepare(self.model, self.cfg, self.device)
        self.optimizer = make_optimizer(self.model, self.cfg.train)
        # LPIPS and the discriminator (from step 0) count towards a step's memory too.
        probe_cfg = dataclasses.replace(self.cfg, adversarial=dataclasses.replace(self.cfg.adversarial, start=0))
        self.objective = Objective.from_config(probe_cfg, self.plan.data_shape, config_path, self.device)
        # every term on from the first step: the heaviest step of the run
        self.objective.schedules = [dataclasses.replace(s, start=0, stop=0) for s in self.objective.schedules]
        self.steps = 0
        self.reserved_peak = 0  # CUDA: the caching allocator's peak in the last measured step

    def step(self, batch_size: int) -> None:
        images = torch.empty((batch_size, *self.plan.data_shape), device=self.device).uniform_(-1, 1)
        self.steps += 1
        train_step(self.runtime, [self.runtime.to_input(images)], self.optimizer, self.cfg, self.steps,
                   objective=self.objective)

    def measure(self, batch_size: int) -> tuple[int, float]:
        cuda = self.device.type == "cuda"
        if cuda:
            gc.collect()
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            trim_heap()
            if not reset_high_water_mark():
                raise FlexVAEError("measuring CPU memory in-process needs Linux's /proc/self/clear_refs")
        start = time.perf_counter()
        self.step(batch_size)
        if cuda:
            torch.cuda.synchronize(self.device)
            self.reserved_peak = torch.cuda.max_memory_reserved(self.device)
            return torch.cuda.max_memory_allocated(self.device), time.perf_counter() - start
        return proc_status_bytes("VmHWM"), time.perf_counter() - start

    def release(self) -> None:
        """Free what a failed step left behind (gradients, cached blocks)."""
        self.optimizer.zero_grad(set_to_none=True)
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


class ChildRunner:
    """CPU probes without a resettable peak: each measurement runs in a fresh child process
    (warm-up step, then the measured step) whose own peak resident memory it reports (VmHWM where
    /proc exists, else what ``os.wait4`` says)."""

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
        result = json.loads(text)
        peak = usage.ru_maxrss if sys.platform == "darwin" else usage.ru_maxrss * 1024  # bytes vs KiB
        # Linux carries a process's peak across fork and exec: a child of a large process reports at
        # least its parent's peak in ru_maxrss. Its own VmHWM (a fresh address space's) does not.
        return result.get("peak") or peak, result["seconds"]


def _child_main() -> None:
    request = json.load(sys.stdin)
    runner = StepRunner(config_from_dict(request["config"], "<probe request>"), request["config_path"], "cpu")
    runner.step(request["batch_size"])  # warm-up: AdamW's state is allocated here
    start = time.perf_counter()
    runner.step(request["batch_size"])
    seconds = time.perf_counter() - start
    peak = proc_status_bytes("VmHWM") if os.path.exists("/proc/self/status") else None
    print(json.dumps({"seconds": seconds, "peak": peak}))
