"""torchrun/DDP plumbing: gloo on CPU, NCCL on GPU; a no-op wrapper when not launched by torchrun."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as td
from torch import nn


@dataclass
class Dist:
    """This process's place in the job."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @classmethod
    def from_env(cls, device: torch.device = torch.device("cpu")) -> Dist:
        """Join the process group if torchrun set WORLD_SIZE > 1; `device` is the one --device resolved to (each
        rank of a CUDA job takes the GPU of its LOCAL_RANK)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls(device=device)
        rank = int(os.environ["RANK"])
        if device.type == "cuda":
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            device, backend = torch.device("cuda", local), "nccl"
        else:
            device, backend = torch.device("cpu"), "gloo"
        if not td.is_initialized():
            td.init_process_group(backend)
        return cls(rank, world, device)

    @property
    def is_main(self) -> bool:
        """Rank 0 writes files."""
        return self.rank == 0

    def wrap(self, model: nn.Module) -> nn.Module:
        """DDP-wrap `model` when running distributed (unused params allowed: pruned layers have none to gate)."""
        if self.world == 1:
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)

    def barrier(self) -> None:
        """Wait for every rank."""
        if self.world > 1:
            td.barrier()

    def mean(self, value: float) -> float:
        """Average a scalar across ranks (for logging)."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        td.all_reduce(t)
        return float(t) / self.world

    def any(self, flag: bool) -> bool:
        """Whether `flag` is set on any rank (every rank gets the same answer)."""
        if self.world == 1:
            return flag
        t = torch.tensor([float(flag)], device=self.device)
        td.all_reduce(t, op=td.ReduceOp.MAX)
        return bool(t.item())

    def close(self) -> None:
        """Leave the process group."""
        if self.world > 1 and td.is_initialized():
            td.barrier()
            td.destroy_process_group()
