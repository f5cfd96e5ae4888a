"""Sharding an evaluation over processes with torch.distributed (``torchrun``; gloo on CPU, NCCL on GPU).

Sample batches are dealt round-robin (batch b goes to rank ``b % world``), so every batch is computed
exactly as in a one-process run (same members, same seeds): outcomes do not depend on the world size.
Rank 0 alone reads and writes the results store; other ranks send their rows to it after each round
(``gather``) and receive what they need (done batch keys, committed rows) by ``broadcast``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int = 0
    world: int = 1

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def mine(self, index: int) -> bool:
        """Whether work item ``index`` (a batch) belongs to this rank."""
        return index % self.world == self.rank

    def rounds(self, n_items: int) -> int:
        return (n_items + self.world - 1) // self.world

    def item(self, round_: int) -> int:
        return round_ * self.world + self.rank

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.enabled:
            return obj
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` on every rank (rank order)."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def any(self, flag: bool) -> bool:
        """True on every rank if any rank passed True (e.g. an error, to stop together)."""
        return any(self.gather(bool(flag)))


def init_distributed(device: str | None = None) -> tuple[Dist, str | None]:
    """Join the process group when run under torchrun (``WORLD_SIZE`` > 1) or when the caller already
    initialized one; returns the handle and the device for this rank (``cuda:LOCAL_RANK`` on GPUs)."""
    if dist.is_available() and dist.is_initialized():
        d = Dist(dist.get_rank(), dist.get_world_size())
    elif int(os.environ.get("WORLD_SIZE", "1")) > 1 and dist.is_available():
        backend = "nccl" if torch.cuda.is_available() and (device is None or device.startswith("cuda")) else "gloo"
        dist.init_process_group(backend=backend)
        d = Dist(dist.get_rank(), dist.get_world_size())
    else:
        return Dist(), device
    if d.enabled and torch.cuda.is_available() and (device is None or device == "cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', d.rank % max(1, torch.cuda.device_count())))}"
    return d, device
