"""Xie & Yuille training-step cost (issue #11 "Speed"): one ``xie`` step (targeted PGD-N on the model,
then the update) against N + 1 plain forward+backward passes of the same model, and what mixture BN's
routing adds to a step.

1. Step vs passes. A ``xie`` step with ``clean_ratio = 0`` runs N attack iterations (a forward and an
   input-gradient backward each, BN in eval mode) and one training forward+backward+update, so its floor
   is N + 1 passes. Target: step <= 1.1 x (N + 1) plain passes. "Plain pass" = train-mode forward, CE,
   ``backward()`` with parameter gradients, on the same model, batch and device.
2. MBN routing. The same step on the same network with ``model.norm_layer = "mbn"`` (every BN replaced by
   a BN_clean/BN_adv pair and routed per image type) vs ``"bn"``; at ``clean_ratio = 0`` (one route, the
   pure cost of the routing) and at ``clean_ratio = 1`` (MBN's two forwards of B images vs BN's one of 2B).
   Target: <= 5%.

Everything is measured in this process, round-robin over the configurations (CPU contention from other
jobs hits all alike), median of ``--reps`` after one warm-up. Random CIFAR-shaped batches, ResNet-20
(the CIFAR variant's network; ``--arch``/``--width`` change it); the memory format is chosen by
robbench.memformat for each model (contiguous on CPUs whose channels_last gradients are wrong).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/xie_step.py [--steps 10] [--batch 64] [--reps 5]

On a CPU shared with other jobs use one thread: with 2 threads on 2 busy cores every pass ran ~10x slower
and the MBN comparison swung from -14% to +20% between configurations.
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F

from robbench.config import load_entry
from robbench.data import get_info
from robbench.device import pick_device
from robbench.memformat import choose_memory_format
from robbench.models import build_model
from robbench.registry import METHODS
from robbench.train.loop import DistEnv, TrainContext, build_optimizers
from robbench.train.methods import Batch


def make_step(norm: str, ratio: float, a: argparse.Namespace, dev: torch.device) -> tuple[Callable[[], Any], Any]:
    """(one xie training step as a closure, the model) for one configuration."""
    entry = load_entry("xie_cifar10_resnet20_r0", [
        f"model.arch={a.arch}", f"model.width={a.width}", f"model.norm_layer={norm}",
        f"train.params.adv_steps={a.steps}", f"train.params.clean_ratio={ratio}",
        f"train.params.adv_target=random", f"data.batch_size={a.batch}"])
    info = get_info("cifar10")
    torch.manual_seed(0)
    model = build_model(entry, info).to(dev).train()
    fmt = choose_memory_format(model, (info.in_channels, info.image_size, info.image_size), dev, "auto",
                               what=f"{norm} r={ratio}", batch_size=a.batch).format
    model.to(memory_format=fmt)
    ctx = TrainContext(entry=entry, model=model, optimizers=build_optimizers(model, list(model.members),
                                                                             entry.train.optimizer),
                       device=dev, dist=DistEnv(), seed=0, num_classes=info.num_classes, memory_format=fmt)
    method = METHODS.get("xie")(entry.method_params)
    method.setup(ctx)
    g = torch.Generator().manual_seed(1)
    x = ctx.prepare(torch.rand(a.batch, 3, 32, 32, generator=g))
    y = torch.randint(10, (a.batch,), generator=g).to(dev)
    batch = Batch(x, y, ())
    return (lambda: method.step(ctx, batch)), (model, x, y)


def make_plain(model: Any, x: torch.Tensor, y: torch.Tensor) -> Callable[[], Any]:
    """One plain train-mode forward + CE + backward (parameter gradients) of ``model``."""
    def run() -> None:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
    return run


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=10, help="N, the training attack's iterations (paper: 30)")
    ap.add_argument("--batch", type=int, default=64, help="images per step (reference: 32 per GPU)")
    ap.add_argument("--arch", default="resnet20")
    ap.add_argument("--width", type=float, default=1.0)
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions per configuration (median)")
    ap.add_argument("--device", default=None)
    a = ap.parse_args()
    dev = pick_device(a.device)

    configs: dict[str, Callable[[], Any]] = {}
    for norm in ("bn", "mbn"):
        for ratio in (0.0, 1.0):
            step, (model, x, y) = make_step(norm, ratio, a, dev)
            configs[f"xie {norm} r={ratio:g}"] = step
            if norm == "bn" and ratio == 0.0:
                configs["plain fwd+bwd"] = make_plain(model, x, y)
    times: dict[str, list[float]] = {k: [] for k in configs}
    for rep in range(a.reps + 1):  # rep 0 warms up
        for name, fn in configs.items():
            sync(dev)
            t0 = time.perf_counter()
            fn()
            sync(dev)
            if rep:
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    n = a.steps
    print(f"device {dev}, {a.arch} width {a.width}, batch {a.batch}, 32x32, N = {n}, median of {a.reps} "
          f"(torch {torch.__version__}, {torch.get_num_threads()} threads)")
    for k, v in med.items():
        print(f"  {k:18s} {v * 1000:9.1f} ms")
    plain = med["plain fwd+bwd"]
    ratio = med["xie bn r=0"] / ((n + 1) * plain)
    print(f"xie step (BN, r=0) / ((N+1) x plain fwd+bwd) = {ratio:.3f}  (target <= 1.1: "
          f"{'met' if ratio <= 1.1 else 'NOT met'})")
    for r in ("0", "1"):
        over = med[f"xie mbn r={r}"] / med[f"xie bn r={r}"] - 1
        print(f"MBN routing overhead at clean_ratio {r}: {100 * over:+.1f}%  (target <= 5%: "
              f"{'met' if over <= 0.05 else 'NOT met'})")


if __name__ == "__main__":
    main()
