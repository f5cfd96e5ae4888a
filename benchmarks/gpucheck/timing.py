"""Device-synchronised timers that stop at a deadline.

CUDA calls are asynchronous: every timed call is followed by ``torch.cuda.synchronize`` so a time is the
work's, not the launch's. Reported: the median of the timed repetitions (robust to one slow call) and
every repetition, plus the warm-up time (the first call includes cuDNN autotuning and lazy init).
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, *, reps: int, warmup: int = 1,
          deadline: float | None = None) -> dict[str, Any]:
    """Run ``fn`` ``warmup`` times, then up to ``reps`` timed times (fewer when ``deadline``, a
    ``time.monotonic()`` value, passes; at least one timed call always runs)."""
    t0 = time.perf_counter()
    for _ in range(warmup):
        fn()
    sync(device)
    warm = time.perf_counter() - t0
    times: list[float] = []
    for _ in range(max(1, reps)):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
        if deadline is not None and time.monotonic() > deadline:
            break
    return {"median_s": statistics.median(times), "times_s": [round(v, 6) for v in times],
            "warmup_s": round(warm, 4), "reps": len(times)}


def timed_interleaved(fns: dict[str, Callable[[], Any]], device: torch.device, *, reps: int,
                      deadline: float | None = None) -> dict[str, dict[str, Any]]:
    """Time several variants in alternation (one warm-up each first), so a load change on a shared
    machine hits them alike. Returns ``{name: timed-record}``."""
    warm: dict[str, float] = {}
    for name, fn in fns.items():
        t = time.perf_counter()
        fn()
        sync(device)
        warm[name] = time.perf_counter() - t
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(max(1, reps)):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t)
        if deadline is not None and time.monotonic() > deadline:
            break
    return {k: {"median_s": statistics.median(v), "times_s": [round(x, 6) for x in v],
                "warmup_s": round(warm[k], 4), "reps": len(v)} for k, v in times.items()}
