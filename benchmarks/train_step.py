"""Training-step speed: robbench's DVERGE step vs a reference-style step, and every method vs baseline.

1. DVERGE, 3 ResNet-20 members, CIFAR-sized random batches (32x32, B=128 unless --batch):
   - reference style (zjysteven/DVERGE train_dverge.py + distillation.py): members looped, each
     distillation step recomputes the target features and calls ``loss.backward()`` (weight gradients
     included), NCHW tensors;
   - robbench: ``robbench.train.methods.dverge`` (one batched attack call for all members, target
     features once per batch, input gradients only, channels_last).
   Both start from the same weights and batch with a fixed layer; prints the speed ratio (target >= 1.5x)
   and the largest difference of the per-member losses: 0 for robbench in the reference's layout
   (``iterate = "x"``), float rounding for the fast path.
2. Per-step time of baseline, adp, gal, advt, dverge, dverge_advt relative to baseline, next to the
   paper's Table 1 ratios (App. A, TITAN XP GPU, 200 epochs: baseline 1.0 h, ADP 2.0, GAL 7.5,
   AdvT 11.5, DVERGE 10.5), and peak memory (CUDA max allocated, or the CPU max RSS growth).

Ratios are measured in one process, interleaved, best of ``--reps`` (robust to other load). Run:
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/train_step.py [--batch 128] [--reps 3] [--size 32]
"""
from __future__ import annotations

import argparse
import copy
import resource
import sys
import time
from pathlib import Path

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

# distillation.py Linf_distillation as written (x_adv updated in place), shared with the tests
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from dverge_reference import linf_distillation  # noqa: E402

PAPER_TABLE1 = {"baseline": 1.0, "adp": 2.0, "gal": 7.5, "advt": 11.5, "dverge": 10.5}


# ---------------------------------------------------------------------------------------------- reference style
def ref_dverge_step(members, optimizers, si, sl, ti, layer, eps=0.07, alpha=0.007, steps=10):
    """train_dverge.py DVERGE_Trainer.train, one batch (all-pairs, per-member backward and step)."""
    distilled = [linf_distillation(m, si, ti, eps, alpha, steps, layer) for m in members]
    losses = []
    for i, m in enumerate(members):
        loss = 0
        for j, d in enumerate(distilled):
            if i != j:
                loss = loss + F.cross_entropy(m(d), sl)
        losses.append(float(loss.detach()))
        optimizers[i].zero_grad()
        loss.backward()
        optimizers[i].step()
    return losses


# ---------------------------------------------------------------------------------------------- robbench
def make_ctx(entry, model, device, mf):
    opts = build_optimizers(model, list(model.members), entry.train.optimizer)
    return TrainContext(entry=entry, model=model, optimizers=opts, device=device, dist=DistEnv(), seed=0,
                        num_classes=10, memory_format=mf)


def entry_for(method: str, members: int, size: int):
    """The CIFAR zoo entry of ``method`` (synthetic data of the same shape: CIFAR is not needed)."""
    name = {"baseline": "baseline_resnet20_x3", "adp": "adp_resnet20_x3", "gal": "gal_resnet20_x3",
            "advt": "advt_resnet20_x3", "dverge": "dverge_resnet20_x3",
            "dverge_advt": "dverge_advt_resnet20_x3"}[method]
    return load_entry(name, [f"model.members={members}", "model.normalization=dataset", "data.dataset=synthetic",
                             f"data.options={{ image_size = {size}, channels = 3 }}", "train.init_from=\"\""])


def timed(fn, reps: int) -> float:
    """Best of ``reps`` after a warm-up (the minimum is the least disturbed by other processes)."""
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return min(ts)


def timed_pair(fa, fb, reps: int) -> tuple[float, float]:
    """Interleaved best-of-``reps`` of two functions (load changes hit both alike)."""
    fa(), fb()
    ta, tb = [], []
    for _ in range(reps):
        for f, ts in ((fa, ta), (fb, tb)):
            t0 = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t0)
    return min(ta), min(tb)


def peak_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=128, help="DVERGE reference batch size 128")
    ap.add_argument("--size", type=int, default=32, help="image side (32 = CIFAR)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--layer", type=int, default=10, help="fixed distillation layer for the comparison")
    ap.add_argument("--device", default=None)
    ap.add_argument("--skip-methods", action="store_true", help="only the DVERGE comparison")
    args = ap.parse_args()
    device = pick_device(args.device)
    torch.manual_seed(0)
    b, s = args.batch, args.size
    si, ti = torch.rand(b, 3, s, s, device=device), torch.rand(b, 3, s, s, device=device)
    sl = torch.randint(0, 10, (b,), device=device)

    # ---- 1. DVERGE: reference style vs robbench
    entry = entry_for("dverge", 3, s)
    entry = load_entry(entry.name, entry.overrides + [f"train.params.layer={args.layer}"])
    base = build_model(entry, get_info("synthetic", entry.data.options)).to(device).train()
    # the format robbench trains in: checked per model (robbench.memformat), never assumed
    choice = choose_memory_format(base, (3, s, s), device, what="ResNet-20 x3")
    cl = choice.format
    print(f"memory format: {choice.name}" + (f" ({choice.reason})" if choice.reason else ""))
    init_state = copy.deepcopy(base.state_dict())

    ref_model = copy.deepcopy(base)
    ref_members = list(ref_model.members)
    ref_opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4) for m in ref_members]

    rb_model = copy.deepcopy(base).to(memory_format=cl)
    ctx = make_ctx(entry, rb_model, device, cl)
    method = METHODS.get("dverge")(entry.method_params)
    method.setup(ctx)
    method.on_epoch_start(ctx, 0)
    rb_batch = Batch(si.contiguous(memory_format=cl), sl, ((ti.contiguous(memory_format=cl), sl),))

    # loss equality on the first step from identical weights: robbench in the reference's layout (NCHW,
    # one attack per member, iterate "x" = the dverge default) must give the reference's losses to the
    # bit; the fast path differs only by float rounding (channels_last kernels) that can flip the sign of
    # a near-zero momentum component.
    ref_losses = ref_dverge_step(ref_members, ref_opts, si, sl, ti, args.layer)
    par_model = copy.deepcopy(base)
    par_entry = load_entry(entry.name, entry.overrides + ["train.params.batched_distillation=false"])
    par_ctx = make_ctx(par_entry, par_model, device, torch.contiguous_format)
    par = METHODS.get("dverge")(par_entry.method_params)
    par.setup(par_ctx)
    par.on_epoch_start(par_ctx, 0)
    par_out = par.step(par_ctx, Batch(si, sl, ((ti, sl),)))
    par_losses = [par_out[f"loss/{i}"] for i in range(3)]
    rb_out = method.step(ctx, rb_batch)
    rb_losses = [rb_out[f"loss/{i}"] for i in range(3)]
    diff = max(abs(a - c) for a, c in zip(ref_losses, rb_losses))
    par_diff = max(abs(a - c) for a, c in zip(ref_losses, par_losses))

    ref_model.load_state_dict(init_state)
    rb_model.load_state_dict(init_state)
    t_ref, t_rb = timed_pair(lambda: ref_dverge_step(ref_members, ref_opts, si, sl, ti, args.layer),
                             lambda: method.step(ctx, rb_batch), args.reps)
    print(f"DVERGE step, 3 x ResNet-20, batch {b}, {s}x{s}, layer {args.layer}, device {device.type}, "
          f"threads {torch.get_num_threads()}")
    print(f"  reference-style {t_ref * 1000:8.0f} ms   robbench {t_rb * 1000:8.0f} ms   "
          f"speed-up {t_ref / t_rb:.2f}x (target >= 1.5x)", flush=True)
    print(f"  first-step losses: reference as written (Linf_distillation) {[round(v, 6) for v in ref_losses]}")
    print(f"    robbench, reference layout (NCHW, per-member attacks) {[round(v, 6) for v in par_losses]} "
          f"max |diff| {par_diff:.2e} (0 expected)")
    print(f"    robbench, fast path ({choice.name + ', batched':21s})    {[round(v, 6) for v in rb_losses]} "
          f"max |diff| {diff:.2e}", flush=True)

    if args.skip_methods:
        return
    # ---- 2. every method vs baseline (robbench implementations)
    print(f"\nPer-step time relative to baseline (3 members, batch {b}, {s}x{s}); paper Table 1 on a GPU:")
    print(f"  {'method':12s} {'ms/step':>9s} {'ratio':>7s} {'paper':>6s} {'peak MB':>8s}")
    times = {}
    for name in ("baseline", "adp", "gal", "advt", "dverge", "dverge_advt"):
        e = entry_for(name, 3, s)
        model = build_model(e, get_info("synthetic", e.data.options)).to(device).to(memory_format=cl).train()
        c = make_ctx(e, model, device, cl)
        m = METHODS.get(name)(e.method_params)
        m.setup(c)
        m.on_epoch_start(c, 0)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        before = peak_mb(device)
        times[name] = timed(lambda: m.step(c, rb_batch), max(1, args.reps - 1))
        mem = peak_mb(device) - (0 if device.type == "cuda" else before)
        paper = PAPER_TABLE1.get(name)
        print(f"  {name:12s} {times[name] * 1000:9.0f} {times[name] / times['baseline']:7.2f} "
              f"{'' if paper is None else f'{paper:.1f}':>6s} {mem:8.0f}", flush=True)
    print("  (CPU peak MB = growth of the process max RSS during that method's steps; 0 = no new peak)")


if __name__ == "__main__":
    main()
