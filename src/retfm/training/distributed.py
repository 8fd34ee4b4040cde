"""Data-parallel plumbing: one process per device under ``torchrun``, or a single process.

Everything else in training asks this module who it is (rank, world size, device) rather than
reading environment variables itself, so the same loop runs alone on a laptop and as N
processes on N GPUs.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


@dataclass(frozen=True)
class DistContext:
    """Who this process is: rank among ``world_size`` processes, and the device it drives."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None


@contextmanager
def distributed_context() -> Iterator[DistContext]:
    """Yield this process's :class:`DistContext`; under ``torchrun`` (WORLD_SIZE > 1) start the
    process group (NCCL on CUDA, gloo on CPU) and tear it down on exit if we started it."""
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    cuda = torch.cuda.is_available()
    if cuda:
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    started = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if cuda else "gloo", device_id=device if cuda else None
        )
        started = True
    try:
        yield DistContext(rank=rank, local_rank=local_rank, world_size=world, device=device)
    finally:
        if started and dist.is_initialized():
            dist.destroy_process_group()


def shard(indices: np.ndarray, ctx: DistContext) -> np.ndarray:
    """This rank's share of an epoch's permutation (strided, equal length on every rank)."""
    per_rank = len(indices) // ctx.world_size
    return indices[ctx.rank :: ctx.world_size][:per_rank]


def wrap(model: nn.Module, ctx: DistContext) -> nn.Module:
    """DistributedDataParallel when there are several processes, the model itself otherwise."""
    if not ctx.distributed:
        return model
    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def mean_across(value: float, ctx: DistContext) -> float:
    """The mean of a scalar over all ranks (every rank gets the same answer)."""
    if not ctx.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item()) / ctx.world_size


def gather_to_main(obj: Any, ctx: DistContext) -> list[Any] | None:
    """Every rank's ``obj`` as a list on rank 0 (``None`` elsewhere)."""
    if not ctx.distributed:
        return [obj]
    out: list[Any] | None = [None] * ctx.world_size if ctx.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast_from_main(obj: Any, ctx: DistContext) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not ctx.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()
