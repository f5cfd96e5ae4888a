"""Ensemble-in-One training cost: per-step time and peak memory of one EIO diversification step (p = 3
paths of one random gated ResNet-20) vs one DVERGE step (3 ResNet-20 members), one AdvT step and one
baseline step of a single ResNet-20, on random CIFAR-shaped batches.

The papers' claims (ICLR App. A.3): "training EIO is closely equivalent to training one individual
model" in memory, and "the training time cost of an EIO network is approximately 2.5x than AdvT".

Times are measured in this process, round-robin over the methods (so CPU contention from other jobs
hits all of them alike); each step is the method's real ``step`` on the training loop's context.
Peak memory, also in this process: the peak bytes of activations autograd keeps for backward during
one step (saved-tensor hooks, each storage once, parameters excluded: exact on any device), and on
CUDA the growth of ``max_memory_allocated`` over the step (all tensors).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/eio_memory.py [--batch 32] [--size 32] [--steps 2]
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

METHODS = ("baseline", "advt", "dverge", "eio", "eio_batched")  # eio_batched: the p paths distilled in one call


def make(method: str, size: int, width: float, batch: int) -> tuple[Any, Any, Any]:
    """(method object, TrainContext, Batch) for one configuration on random data."""
    from robbench.config import load_entry
    from robbench.data import get_info
    from robbench.models import build_model
    from robbench.registry import METHODS as REG
    from robbench.train.loop import DistEnv, TrainContext, build_optimizers
    from robbench.train.methods import Batch

    common = [f"model.width={width}", "data.dataset=cifar10", "model.normalization=dverge"]
    if method.startswith("eio"):  # zoo/eio_resnet20: n = 2, p = 3, eps_d = 0.07, 10 distillation steps
        seq = ["train.params.batched_distillation=true"] if method == "eio_batched" else []
        entry = load_entry("eio_resnet20", [*common, *seq])
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


class ActivationMeter:
    """Peak bytes of the tensors autograd keeps for backward (activations), counted once per storage and
    released when autograd frees them; parameters are excluded. Device-independent and exact, unlike
    CPU RSS (the allocator keeps freed pages resident, so RSS barely moves after the first step)."""

    def __init__(self, params: list[torch.Tensor]) -> None:
        self.exclude = {p.untyped_storage().data_ptr() for p in params}
        self.live: dict[int, list[int]] = {}
        self.current = 0
        self.peak = 0

    def pack(self, t: torch.Tensor) -> Any:
        st = t.untyped_storage()
        key = st.data_ptr()
        if key in self.exclude or key == 0:
            return t
        ent = self.live.get(key)
        if ent is None:
            self.live[key] = [st.nbytes(), 1]
            self.current += st.nbytes()
            self.peak = max(self.peak, self.current)
        else:
            ent[1] += 1
        return _Held(self, key, t)

    @staticmethod
    def unpack(h: Any) -> torch.Tensor:
        return h.t if isinstance(h, _Held) else h

    def release(self, key: int) -> None:
        ent = self.live[key]
        ent[1] -= 1
        if ent[1] == 0:
            self.current -= ent[0]
            del self.live[key]

    def measure(self) -> Any:
        self.peak = self.current
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


class _Held:
    __slots__ = ("meter", "key", "t")

    def __init__(self, meter: ActivationMeter, key: int, t: torch.Tensor) -> None:
        self.meter, self.key, self.t = meter, key, t

    def __del__(self) -> None:
        self.meter.release(self.key)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=32, help="batch size (paper: 128; small for shared CPUs)")
    ap.add_argument("--size", type=int, default=32, help="image side (CIFAR: 32)")
    ap.add_argument("--width", type=float, default=1.0, help="ResNet-20 width multiplier (paper: 1.0)")
    ap.add_argument("--steps", type=int, default=3, help="steps per method after 1 warm-up: all but the last "
                    "timed (the last one measures activations)")
    a = ap.parse_args()

    from robbench.device import pick_device

    dev = pick_device(None)
    setups = {name: make(name, a.size, a.width, a.batch) for name in METHODS}
    if dev.type == "cuda":
        for m, ctx, b in setups.values():
            ctx.model.to(dev)
            ctx.device = dev
    times: dict[str, list[float]] = {n: [] for n in METHODS}
    act: dict[str, float] = {}
    cuda_mem: dict[str, float] = {}
    meters = {n: ActivationMeter(list(ctx.model.parameters())) for n, (_, ctx, _) in setups.items()}
    for i in range(a.steps + 1):  # round-robin; step 0 is the warm-up
        for name, (m, ctx, b) in setups.items():
            if dev.type == "cuda":
                b = type(b)(b.x.to(dev), b.y.to(dev), tuple((u.to(dev), v.to(dev)) for u, v in b.extra))
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats(dev)
                base = torch.cuda.memory_allocated(dev)
            ctx.step, ctx.global_step = i, i
            t0 = time.perf_counter()
            if i == a.steps:  # the last step also measures activations (the hooks cost a little time)
                with meters[name].measure():
                    m.step(ctx, b)
            else:
                m.step(ctx, b)
            if dev.type == "cuda":
                torch.cuda.synchronize()
                cuda_mem[name] = (torch.cuda.max_memory_allocated(dev) - base) / 2**20
            dt = time.perf_counter() - t0
            if 0 < i < a.steps or (a.steps == 1 and i == 1):
                times[name].append(dt)
    act = {n: meters[n].peak / 2**20 for n in METHODS}
    mem = cuda_mem if dev.type == "cuda" else act
    med = {n: statistics.median(v) for n, v in times.items()}
    kind = "CUDA max_memory_allocated growth" if dev.type == "cuda" else "peak activation memory"
    print(f"device {dev}, ResNet-20 width {a.width}, batch {a.batch}, {a.size}x{a.size}, median of "
          f"{len(times['eio'])} step(s); peak MB = {kind} during one step (activations MB: "
          + ", ".join(f"{n} {v:.1f}" for n, v in act.items()) + ")")
    print(f"{'method':12s} {'s/step':>8s} {'time/baseline':>14s} {'time/advt':>10s} {'peak MB':>9s} {'mem/baseline':>13s}")
    for n in METHODS:
        print(f"{n:12s} {med[n]:8.3f} {med[n] / med['baseline']:14.2f} {med[n] / med['advt']:10.2f} "
              f"{mem[n]:9.1f} {mem[n] / max(mem['baseline'], 1e-9):13.2f}")
    print(f"EIO (p=3) vs DVERGE (3 members): time x{med['eio'] / med['dverge']:.2f}, "
          f"memory x{mem['eio'] / max(mem['dverge'], 1e-9):.2f} (paths distilled in one batch: "
          f"time x{med['eio_batched'] / med['dverge']:.2f}, memory x{mem['eio_batched'] / max(mem['dverge'], 1e-9):.2f})")
    print(f"EIO vs AdvT time: x{med['eio'] / med['advt']:.2f} (ICLR App. A.3: ~2.5x); "
          f"EIO vs one model memory: x{mem['eio'] / max(mem['baseline'], 1e-9):.2f}, batched distillation "
          f"x{mem['eio_batched'] / max(mem['baseline'], 1e-9):.2f} (paper: ~1x)")


if __name__ == "__main__":
    main()
