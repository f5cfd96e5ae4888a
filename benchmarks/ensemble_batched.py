"""Loop vs batched (torch.func vmap) execution of ResNet-20 ensembles.

One process, all configurations warmed up, then interleaved repetitions; the work per step is one
attack step: eval-mode forward of the ensemble (log-mean-softmax) + gradient wrt the input, at
32x32. Prints the time of each path and the ratio loop / batched (> 1 means vmap is faster).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/ensemble_batched.py [--batch 64] [--reps 3] [--size 32]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

from robbench.config import ModelSpec
from robbench.data.info import INFOS
from robbench.device import pick_device
from robbench.models import Ensemble, build_network


def attack_step(ens: Ensemble, x: torch.Tensor, y: torch.Tensor) -> None:
    x = x.clone().requires_grad_(True)
    loss = F.nll_loss(ens(x), y)
    (g,) = torch.autograd.grad(loss, x)
    if g.is_cuda:
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[3, 5, 8], help="ensemble sizes")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--size", type=int, default=32, help="input height/width")
    ap.add_argument("--device", default=None)
    args = ap.parse_args()

    device = pick_device(args.device)
    info = INFOS["cifar10"]
    torch.manual_seed(0)
    x = torch.rand(args.batch, 3, args.size, args.size, device=device)
    y = torch.randint(0, info.num_classes, (args.batch,), device=device)
    print(f"device={device} threads={torch.get_num_threads()} batch={args.batch} input=3x{args.size}x{args.size} "
          f"step=eval forward+input-gradient, reps={args.reps} (median), "
          f"load average {os.getloadavg()[0]:.1f} (other processes on the cores distort the ratio)")

    pairs = {}
    for k in args.sizes:
        members = [build_network(ModelSpec(arch="resnet20"), info) for _ in range(k)]
        loop = Ensemble(members, batched=False).to(device).eval()
        batched = Ensemble(members, batched=True).to(device).eval()
        loop.requires_grad_(False)  # attacks freeze the weights: the batched path caches its stacked state
        assert batched.can_vmap()
        # the two paths agree before we time them
        with torch.no_grad():
            err = (loop.member_logits(x[:8]) - batched.member_logits(x[:8])).abs().max().item()
        assert err < 1e-4, err
        pairs[k] = (loop, batched)
        attack_step(loop, x, y)      # warm-up
        attack_step(batched, x, y)

    times: dict[tuple[int, str], list[float]] = {(k, p): [] for k in args.sizes for p in ("loop", "vmap")}
    for _ in range(args.reps):
        for k, (loop, batched) in pairs.items():
            for name, ens in (("loop", loop), ("vmap", batched)):
                t0 = time.perf_counter()
                attack_step(ens, x, y)
                times[(k, name)].append(time.perf_counter() - t0)

    print(f"{'members':>7} {'loop ms':>9} {'vmap ms':>9} {'loop/vmap':>10}")
    for k in args.sizes:
        lt = statistics.median(times[(k, "loop")]) * 1e3
        vt = statistics.median(times[(k, "vmap")]) * 1e3
        print(f"{k:>7} {lt:>9.1f} {vt:>9.1f} {lt / vt:>10.2f}")


if __name__ == "__main__":
    main()
