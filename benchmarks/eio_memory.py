"""Ensemble-in-One training cost: per-step time and peak memory of one EIO diversification step (p = 3
paths of one random gated ResNet-20) vs one DVERGE step (3 ResNet-20 members), one AdvT step and one
baseline step of a single ResNet-20, on random CIFAR-shaped batches.

The papers' claims (ICLR App. A.3): "training EIO is closely equivalent to training one individual
model" in memory, and "the training time cost of an EIO network is approximately 2.5x than AdvT".

Times are measured in this process, round-robin over the methods (so CPU contention from other jobs
hits all of them alike); each step is the method's real ``step`` on the training loop's context.
Peak memory: on CUDA ``max_memory_allocated`` in this process; on CPU each method runs in a child
process (this script with ``--child``) reporting its peak RSS growth over the state after building
model, optimizer and batch and one 2-sample warm-up step (so: activations + gradients of the real
batch), since CPU peaks cannot be reset.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/eio_memory.py [--batch 32] [--size 32] [--steps 2]
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

import torch

METHODS = ("baseline", "advt", "dverge", "eio")


def make(method: str, size: int, width: float, batch: int) -> tuple[Any, Any, Any]:
    """(method object, TrainContext, Batch) for one configuration on random data."""
    from robbench.config import load_entry
    from robbench.data import get_info
    from robbench.models import build_model
    from robbench.registry import METHODS as REG
    from robbench.train.loop import DistEnv, TrainContext, build_optimizers
    from robbench.train.methods import Batch

    common = [f"model.width={width}", "data.dataset=cifar10", "model.normalization=dverge"]
    if method == "eio":  # zoo/eio_resnet20: n = 2, p = 3, eps_d = 0.07, 10 distillation steps
        entry = load_entry("eio_resnet20", common)
    else:  # the DVERGE ResNet-20 recipe: 3 members for DVERGE, 1 for baseline / AdvT
        members = 3 if method == "dverge" else 1
        entry = load_entry("demo_baseline_x3", [*common, f"model.members={members}", f"train.method={method}"])
    info = get_info("cifar10")
    torch.manual_seed(0)
    model = build_model(entry, info).train()
    ctx = TrainContext(entry=entry, model=model, optimizers=build_optimizers(model, list(model.members),
                                                                             entry.train.optimizer),
                       device=torch.device("cpu"), dist=DistEnv(), seed=0, num_classes=info.num_classes)
    m = REG.get(entry.train.method)(entry.method_params)
    m.setup(ctx)
    m.on_epoch_start(ctx, 0)  # DVERGE draws its per-epoch layer here
    g = torch.Generator().manual_seed(1)
    x = torch.rand(batch, 3, size, size, generator=g)
    y = torch.randint(10, (batch,), generator=g)
    extra = tuple((torch.rand(batch, 3, size, size, generator=g), torch.randint(10, (batch,), generator=g))
                  for _ in range(m.streams - 1))
    return m, ctx, Batch(x, y, extra)


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        pages = int(fh.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def child(method: str, size: int, width: float, batch: int, steps: int) -> None:
    m, ctx, b = make(method, size, width, batch)
    # warm-up on 2 samples: the same code paths allocate their one-time buffers (autograd engine,
    # oneDNN workspaces) before the snapshot, so the growth is the real batch's activations and gradients
    small = type(b)(b.x[:2], b.y[:2], tuple((u[:2], v[:2]) for u, v in b.extra))
    m.step(ctx, small)
    before = _rss_mb()
    for i in range(steps):
        ctx.step, ctx.global_step = i, i
        m.step(ctx, b)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"method": method, "peak_growth_mb": max(0.0, peak - before)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=32, help="batch size (paper: 128; small for shared CPUs)")
    ap.add_argument("--size", type=int, default=32, help="image side (CIFAR: 32)")
    ap.add_argument("--width", type=float, default=1.0, help="ResNet-20 width multiplier (paper: 1.0)")
    ap.add_argument("--steps", type=int, default=2, help="timed steps per method (after 1 warm-up)")
    ap.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a.child, a.size, a.width, a.batch, a.steps)
        return

    from robbench.device import pick_device

    dev = pick_device(None)
    setups = {name: make(name, a.size, a.width, a.batch) for name in METHODS}
    if dev.type == "cuda":
        for m, ctx, b in setups.values():
            ctx.model.to(dev)
            ctx.device = dev
    times: dict[str, list[float]] = {n: [] for n in METHODS}
    mem: dict[str, float] = {}
    for i in range(a.steps + 1):  # round-robin; step 0 is the warm-up
        for name, (m, ctx, b) in setups.items():
            if dev.type == "cuda":
                b = type(b)(b.x.to(dev), b.y.to(dev), tuple((u.to(dev), v.to(dev)) for u, v in b.extra))
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats(dev)
                base = torch.cuda.memory_allocated(dev)
            ctx.step, ctx.global_step = i, i
            t0 = time.perf_counter()
            m.step(ctx, b)
            if dev.type == "cuda":
                torch.cuda.synchronize()
                mem[name] = (torch.cuda.max_memory_allocated(dev) - base) / 2**20
            if i > 0:
                times[name].append(time.perf_counter() - t0)
    if dev.type != "cuda":
        for name in METHODS:
            out = subprocess.run([sys.executable, __file__, "--child", name, "--batch", str(a.batch), "--size",
                                  str(a.size), "--width", str(a.width), "--steps", "1"],
                                 check=True, capture_output=True, text=True)
            mem[name] = json.loads(out.stdout.strip().splitlines()[-1])["peak_growth_mb"]
    med = {n: statistics.median(v) for n, v in times.items()}
    kind = "cuda max_memory_allocated growth" if dev.type == "cuda" else "CPU peak RSS growth (child process)"
    print(f"device {dev}, ResNet-20 width {a.width}, batch {a.batch}, {a.size}x{a.size}, median of {a.steps} steps")
    print(f"{'method':10s} {'s/step':>8s} {'time/baseline':>14s} {'time/advt':>10s} {'peak MB':>9s} {'mem/baseline':>13s}")
    for n in METHODS:
        print(f"{n:10s} {med[n]:8.3f} {med[n] / med['baseline']:14.2f} {med[n] / med['advt']:10.2f} "
              f"{mem[n]:9.1f} {mem[n] / max(mem['baseline'], 1e-9):13.2f}")
    print(f"EIO (p=3) vs DVERGE (3 members): time x{med['eio'] / med['dverge']:.2f}, "
          f"memory x{mem['eio'] / max(mem['dverge'], 1e-9):.2f}")
    print(f"EIO vs AdvT time: x{med['eio'] / med['advt']:.2f} (ICLR App. A.3: ~2.5x); "
          f"EIO vs one model memory: x{mem['eio'] / max(mem['baseline'], 1e-9):.2f} (paper: ~1x)")


if __name__ == "__main__":
    main()
