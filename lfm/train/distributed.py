"""Scale-out on torch.distributed: one process per device, launched by `torchrun`, parameters sharded with FSDP2.

A single process (no torchrun) is the world of size 1 and uses the same code path minus the sharding, so every
checkpoint and loss curve means the same thing at any world size.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class World:
    rank: int = 0
    size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.size > 1

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place (a no-op alone)."""
        if self.sharded:
            dist.all_reduce(t)
        return t

    def barrier(self) -> None:
        if self.sharded:
            dist.barrier()


def init_world() -> World:
    """Join the process group torchrun describes in the environment (gloo on CPU, nccl on CUDA)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device, backend = torch.device("cuda", local), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return World(rank=dist.get_rank(), size=dist.get_world_size(), device=device)


def close_world(world: World) -> None:
    if world.sharded and dist.is_initialized():
        dist.destroy_process_group()


def shard_model(model: nn.Module) -> None:
    """FSDP2: each block is one unit (gathered just for its forward/backward); the root unit holds the rest, so the
    tied embedding and LM head live in the same unit and stay one parameter."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
