"""This process's place in a torchrun job, shared by training (``robbench.train``) and evaluation
(``robbench.evaluate.commit``): one handle, one reading of torchrun's environment, one way to join
the process group (gloo on CPU, NCCL on GPU). ``world_size`` 1 = a plain single process.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    """Rank, world size and local rank, with the collectives both users need (no-ops in one process)."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def world(self) -> int:
        """Alias of ``world_size`` (the evaluation engine's name)."""
        return self.world_size

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    # round-robin work items (evaluation: batch b goes to rank b % world)
    def rounds(self, n_items: int) -> int:
        return (n_items + self.world_size - 1) // self.world_size

    def item(self, round_: int) -> int:
        return round_ * self.world_size + self.rank

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
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def any(self, flag: bool) -> bool:
        """True on every rank if any rank passed True (e.g. an error, to stop together)."""
        return any(self.gather(bool(flag)))


def dist_env_from_environment() -> DistEnv:
    """torchrun sets WORLD_SIZE, RANK and LOCAL_RANK."""
    ws = int(os.environ.get("WORLD_SIZE", "1"))
    if ws <= 1:
        return DistEnv()
    return DistEnv(ws, int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")))


def join_process_group(backend: str) -> DistEnv:
    """Join the default process group (torchrun's env:// rendezvous) unless the caller already did;
    returns the handle as the group sees it."""
    if not dist.is_initialized():
        dist.init_process_group(backend)
    rank = dist.get_rank()
    return DistEnv(dist.get_world_size(), rank, int(os.environ.get("LOCAL_RANK", str(rank))))
