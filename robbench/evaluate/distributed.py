"""Sharding an evaluation over processes with torch.distributed (``torchrun``; gloo on CPU, NCCL on GPU).

Sample batches are dealt round-robin (batch b goes to rank ``b % world``), so every batch is computed
exactly as in a one-process run (same members, same seeds): outcomes do not depend on the world size.
Rank 0 alone reads and writes the results store; other ranks send their rows to it after each round
(``gather``) and receive what they need (done batch keys, committed rows) by ``broadcast``.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from robbench.distributed import DistEnv, dist_env_from_environment, join_process_group

# the handle is robbench.distributed.DistEnv (shared with training); ``Dist`` is this module's name for it
Dist = DistEnv


def init_distributed(device: str | None = None) -> tuple[Dist, str | None]:
    """Join the process group when run under torchrun (``WORLD_SIZE`` > 1) or when the caller already
    initialized one; returns the handle and the device for this rank (``cuda:LOCAL_RANK`` on GPUs)."""
    if not (dist.is_available() and (dist.is_initialized() or dist_env_from_environment().enabled)):
        return Dist(), device
    backend = "nccl" if torch.cuda.is_available() and (device is None or device.startswith("cuda")) else "gloo"
    d = join_process_group(backend)  # no-op join when the caller already initialized the group
    if d.enabled and torch.cuda.is_available() and (device is None or device == "cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', d.rank % max(1, torch.cuda.device_count())))}"
    return d, device
