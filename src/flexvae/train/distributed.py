"""torchrun + DistributedDataParallel plumbing.

``torchrun --nproc_per_node=N train.py -t`` sets RANK, LOCAL_RANK and WORLD_SIZE; every
process trains a replica on its share of each global batch and DDP averages gradients, so
all replicas take the same step. Only rank 0 logs, writes samples and checkpoints.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def from_environment() -> DistInfo:
    """The process's place in a torchrun launch (a single process when not launched so)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    return DistInfo(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0")), world)


def setup(info: DistInfo, device: torch.device) -> torch.device:
    """Join the process group; on CUDA each process takes the GPU of its local rank."""
    if not info.enabled:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return device


def barrier(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.barrier()


def broadcast_parameters(info: DistInfo, model) -> None:
    """Every process takes rank 0's parameters and buffers (after a change made outside the
    optimizer, which DDP only synchronised when it wrapped the model)."""
    if not info.enabled or not dist.is_initialized():
        return
    for tensor in [*model.parameters(), *model.buffers()]:
        dist.broadcast(tensor.data, src=0)


def mean_across(info: DistInfo, values: dict[str, float], device) -> dict[str, float]:
    """Average logged scalars over processes, so rank 0 logs the global batch's values."""
    if not info.enabled or not values:
        return values
    keys = list(values)
    tensor = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return {k: v / info.world_size for k, v in zip(keys, tensor.tolist())}


def sum_across(info: DistInfo, values: list[float], device) -> list[float]:
    """Element-wise sum of a list of numbers over processes (the list itself when alone)."""
    if not info.enabled:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
