"""Store writes and the distributed ranks of an evaluation.

Sharding (``torchrun``; gloo on CPU, NCCL on GPU): sample batches are dealt round-robin (batch b goes
to rank ``b % world``), so every batch is computed exactly as in a one-process run (same seeds):
outcomes do not depend on the world size. Rank 0 alone reads and writes the results store; other ranks
send their rows to it after each round (:meth:`Committer.flush`) and receive what they need (done
batch keys, committed rows) by broadcast.
"""
from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist

from robbench.distributed import DistEnv, dist_env_from_environment, join_process_group
from robbench.outcomes import BatchKey
from robbench.store import Row, Store


def init_distributed(device: str | None = None) -> tuple[DistEnv, str | None]:
    """Join the process group when run under torchrun (``WORLD_SIZE`` > 1) or when the caller already
    initialized one; returns the handle and the device for this rank (``cuda:LOCAL_RANK`` on GPUs)."""
    if not (dist.is_available() and (dist.is_initialized() or dist_env_from_environment().enabled)):
        return DistEnv(), device
    backend = "nccl" if torch.cuda.is_available() and (device is None or device.startswith("cuda")) else "gloo"
    d = join_process_group(backend)  # no-op join when the caller already initialized the group
    if d.enabled and torch.cuda.is_available() and (device is None or device == "cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', d.rank % max(1, torch.cuda.device_count())))}"
    return d, device


class Committer:
    """Commits each unit's rows with its key in one transaction (rank 0; other ranks buffer and send)."""

    def __init__(self, store: Store | None, run_id: int, dist_env: DistEnv) -> None:
        self.store, self.run_id, self.dist = store, run_id, dist_env
        self.buffer: list[tuple[BatchKey, list[Row]]] = []
        self.computed: list[BatchKey] = []

    def commit(self, key: BatchKey, rows: list[Row]) -> None:
        self.computed.append(key)
        if self.dist.enabled:
            self.buffer.append((key, rows))
        else:
            assert self.store is not None
            self.store.write_batch(self.run_id, key, rows)

    def flush(self) -> None:
        """End of a round: every rank's buffered units reach rank 0's store."""
        if not self.dist.enabled:
            return
        gathered = self.dist.gather(self.buffer)
        self.buffer = []
        if self.dist.is_main:
            assert self.store is not None
            for part in gathered:
                for key, rows in part:
                    self.store.write_batch(self.run_id, key, rows)


class RunRecord:
    """One target's run in the store: started (or resumed) on rank 0 and shared with every rank."""

    def __init__(self, store: Store | None, dist_env: DistEnv) -> None:
        self.store, self.dist = store, dist_env
        self.run_id: int = -1
        self.status: str = ""
        self.meta: dict[str, Any] = {}

    def start(self, identity: dict[str, Any], meta: dict[str, Any], force: bool) -> None:
        """Start or resume the run; ``self.meta`` is the meta it was started with (a resumed run keeps
        its own, e.g. its ``unit_samples``, so the plan's keys are those already committed)."""
        run_id = status = stored = None
        if self.dist.is_main:
            assert self.store is not None
            run_id = self.store.start_run(**identity, meta=meta, force=force)
            row = self.store.run(run_id)
            status, stored = row["status"], row["meta"]
        self.run_id, self.status, self.meta = self.dist.broadcast((run_id, status, stored))
        self.run_id = int(self.run_id)
        self.meta = dict(self.meta or {})

    def unit_samples(self, default: int) -> int:
        """The samples per unit this run was started with (``default`` for runs from before units)."""
        return int(self.meta.get("unit_samples") or default)

    def committed(self) -> tuple[set[BatchKey], Any]:
        """(done batch keys, their outcome rows or None) on every rank."""
        done: set[BatchKey] = set()
        rows = None
        if self.dist.is_main:
            assert self.store is not None
            done = self.store.done_batches(self.run_id)
            rows = self.store.outcomes(self.run_id) if done else None
        return self.dist.broadcast((done, rows))

    def finish(self, meta: dict[str, Any]) -> None:
        if self.dist.is_main:
            assert self.store is not None
            for k, v in meta.items():
                if v:
                    self.store.put_meta(self.run_id, k, v)
            self.store.finish_run(self.run_id)

    def fail(self, error: BaseException) -> None:
        if self.dist.is_main and self.store is not None:
            self.store.fail_run(self.run_id, f"{type(error).__name__}: {error}"[:500])
