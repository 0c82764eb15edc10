"""Multi-process training under torchrun: the process group (NCCL on GPUs, gloo on CPU), sharding
of the training data, DistributedDataParallel wrapping and the few collectives the driver needs.
A run without WORLD_SIZE > 1 in its environment is a single process and none of this is active."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, SequentialSampler


@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    world_size: int = 1
    created_group: bool = False  # this run initialized the process group and tears it down

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def setup(device: str | torch.device | None) -> tuple[Distributed, torch.device]:
    """Join (or start) the process group torchrun describes, and pick this process's device."""
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if not launched and not active():
        chosen = torch.device(device) if device is not None else _default_device()
        return Distributed(), chosen
    created = False
    if not dist.is_initialized():
        wants_cuda = torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda")
        dist.init_process_group("nccl" if wants_cuda else "gloo")
        created = True
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = f"cuda:{local_rank}" if dist.get_backend() == "nccl" else "cpu"
    chosen = torch.device(device)
    if chosen.type == "cuda":
        torch.cuda.set_device(chosen)
    return Distributed(dist.get_rank(), dist.get_world_size(), created), chosen


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def shard(data: Iterable[Any], group: Distributed, seed: int) -> Iterable[Any]:
    """Give each rank its share of a DataLoader over a map-style dataset with a default sampler
    (rebuilt with a DistributedSampler, as Lightning does); other data is taken as already sharded:
    every rank must then yield the same number of batches."""
    if not group.enabled or not isinstance(data, DataLoader):
        return data
    if isinstance(data.sampler, DistributedSampler) or not isinstance(data.sampler, (RandomSampler, SequentialSampler)):
        return data
    sampler = DistributedSampler(
        data.dataset,
        num_replicas=group.world_size,
        rank=group.rank,
        shuffle=isinstance(data.sampler, RandomSampler),
        seed=seed,
    )
    return DataLoader(
        data.dataset,
        batch_size=data.batch_size,
        sampler=sampler,
        num_workers=data.num_workers,
        collate_fn=data.collate_fn,
        pin_memory=data.pin_memory,
        drop_last=data.drop_last,
        worker_init_fn=data.worker_init_fn,
        persistent_workers=data.persistent_workers,
    )


def wrap(model: nn.Module, group: Distributed, device: torch.device) -> nn.Module:
    """DistributedDataParallel around `model` (it broadcasts rank 0's state on construction)."""
    if not group.enabled:
        return model
    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)


def broadcast_(tensors: Sequence[torch.Tensor]) -> None:
    """Overwrite `tensors` on every rank with rank 0's values."""
    if active():
        for tensor in tensors:
            dist.broadcast(tensor, src=0)


def sum_over_ranks(values: Sequence[float], device: torch.device) -> list[float]:
    if not active():
        return list(values)
    total = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return total.tolist()


def teardown(group: Distributed) -> None:
    if group.created_group and dist.is_initialized():
        dist.destroy_process_group()
