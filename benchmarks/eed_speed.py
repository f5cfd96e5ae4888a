"""EED speed ratios (issue #10 "Speed"), measured in one process, interleaved, best of ``--reps``:

1. A masked network (``model.transform = 'masked'``, fine-tune phase: weight * mask per layer) against the
   same dense network, forward + backward of a training step (target <= 1.2x); and in the prune phase,
   where the scores change every step (each timed step bumps them, as the optimizer's update does) and
   the top-k mask is recomputed: by selection (``kthvalue``, robbench) and by the references' full sort
   (the same mask, run in the same process for the ratio before/after); and a prune-phase step with a
   PGD-``--attack-steps`` attack first (every attack forward reuses the step's mask; the sort variant
   recomputes on every forward, as before the cache).
2. The exported member (``bake_masks``: mask-multiplied weights loaded into the dense architecture)
   against the dense network (target 1.0x: the same computation).
3. The digits EED team: DIE's and the full mean's wall-time speed-up over the dense AT base, beside their
   FLOP speed-up (MACs from the masks, DIE's members per sample), on the 450 digits test images. Needs
   the trained demo entries (``python -m robbench.eed.pipeline``) under ``--runs-dir``.

Dense-kernel note: masks zero weights but the convolutions stay dense, so a FLOP speed-up is not a wall
speed-up on a CPU or GPU without sparse kernels; item 3 shows by how much they differ.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/eed_speed.py [--runs-dir runs] [--reps 5] [--batch 128]
"""
from __future__ import annotations

import argparse
import copy
import time
from typing import Callable

import torch
import torch.nn.functional as F

from robbench.config import load_entry
from robbench.data import get_info
from robbench.models import build_model
from robbench.pruning import bake_masks, masked_layers, set_phase


def best_time(fn: Callable[[], None], reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def interleaved(fns: dict[str, Callable[[], None]], reps: int) -> dict[str, float]:
    """Best time of each, the candidates alternating so background load hits them alike."""
    for fn in fns.values():
        fn()
    best = {k: float("inf") for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - t)
    return best


def train_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> None:
        for p in params:
            p.grad = None
        F.cross_entropy(model(x), y).backward()
    return step


def bump_scores(model: torch.nn.Module) -> None:
    """What an optimizer step does to the scores' version counters (the mask cache keys on them)."""
    from robbench.pruning import masked_layers

    with torch.no_grad():
        for _, layer in masked_layers(model):
            layer.scores.add_(0.0)


def sort_recompute(model: torch.nn.Module) -> None:
    """Make ``model``'s prune phase compute as before: full sort, mask recomputed on every forward."""
    from robbench.pruning import masked_layers

    def forget(layer: torch.nn.Module, _args: tuple) -> None:
        layer._mask_key = None  # type: ignore[assignment]
    for _, layer in masked_layers(model):
        layer.register_forward_pre_hook(forget)  # type: ignore[attr-defined]


def with_sort(fn: Callable[[], None]) -> Callable[[], None]:
    import importlib

    masked_mod = importlib.import_module("robbench.pruning.masked")  # the package exports a 'masked' name

    def run() -> None:
        fast = masked_mod.topk_mask
        masked_mod.topk_mask = masked_mod.topk_mask_sort
        try:
            fn()
        finally:
            masked_mod.topk_mask = fast
    return run


def prune_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, attack_steps: int) -> Callable[[], None]:
    """A prune-phase training step: scores updated, optional PGD attack (forward + input gradient per
    iterate), then forward + backward of the loss."""
    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> None:
        bump_scores(model)
        xa = x
        for _ in range(attack_steps):
            xa = xa.detach().requires_grad_(True)
            g, = torch.autograd.grad(F.cross_entropy(model(xa), y), [xa])
            xa = (xa + 0.01 * g.sign()).clamp(0, 1)
        for p in params:
            p.grad = None
        F.cross_entropy(model(xa.detach()), y).backward()
    return step


def masked_vs_dense(entry_name: str, batch: int, size: int | None, reps: int, attack_steps: int) -> None:
    entry = load_entry(entry_name)
    info = get_info(entry.data.dataset)
    torch.manual_seed(0)
    masked = build_model(entry, info).train()
    # the dense twin: the same architecture without the transform, same weights
    from dataclasses import replace

    dense_spec = replace(entry, model=replace(entry.model, transform=None, transform_options={}))
    dense = build_model(dense_spec, info).train()
    dense.load_state_dict(bake_masks(masked), strict=True)
    exported = copy.deepcopy(dense)
    s = size or info.image_size
    x = torch.rand(batch, info.in_channels, s, s)
    y = torch.randint(0, info.num_classes, (batch,))
    set_phase(masked, "finetune")
    fine = train_step(masked, x, y)
    prune_model = copy.deepcopy(masked)
    set_phase(prune_model, "prune")
    prune_sort = copy.deepcopy(prune_model)
    sort_recompute(prune_sort)
    dense_step = train_step(dense, x, y)
    t = interleaved({"dense": dense_step, "masked_finetune": fine,
                     "masked_prune": prune_step(prune_model, x, y, 0),
                     "masked_prune_sort": with_sort(prune_step(prune_sort, x, y, 0)),
                     "exported": train_step(exported, x, y)}, reps)
    print(f"[1] {entry_name} ({entry.model.arch} width {entry.model.width}), fwd+bwd, batch {batch}, {s}x{s}:")
    print(f"    dense {t['dense'] * 1e3:.1f} ms; masked fine-tune {t['masked_finetune'] / t['dense']:.3f}x "
          f"(target <= 1.2x); masked prune phase (scores changed, top-k by selection) "
          f"{t['masked_prune'] / t['dense']:.3f}x, by full sort {t['masked_prune_sort'] / t['dense']:.3f}x")
    if attack_steps:
        ta = interleaved({"dense": prune_step(dense, x, y, attack_steps),
                          "masked_prune": prune_step(prune_model, x, y, attack_steps),
                          "masked_prune_sort": with_sort(prune_step(prune_sort, x, y, attack_steps))},
                         max(1, reps // 2))
        print(f"    with a PGD-{attack_steps} attack per step: dense {ta['dense'] * 1e3:.1f} ms; masked prune "
              f"phase (mask cached across the attack) {ta['masked_prune'] / ta['dense']:.3f}x, sort "
              f"recomputed every forward {ta['masked_prune_sort'] / ta['dense']:.3f}x")
    for (_, a), (_, b) in zip(masked_layers(prune_model), masked_layers(prune_sort)):
        assert torch.equal(a.mask, b.mask), "selection and sort masks differ"
    print(f"[2] exported member (mask baked into dense weights) {t['exported'] / t['dense']:.3f}x dense (target 1.0x)")
    with torch.no_grad():
        masked.eval(), exported.eval()
        diff = (masked(x) - exported(x)).abs().max().item()
    print(f"    exported output = masked output to {diff:.2e}")


def die_speed(runs_dir: str | None, reps: int) -> None:
    from robbench.checkpoint import load_trained
    from robbench.data import load_split
    from robbench.eed.cost import network_cost, speedup, team_cost

    try:
        base = load_trained("demo_eed_at", runs_dir, "cpu")[0]
        die = load_trained("demo_eed_team", runs_dir, "cpu")[0]
        mean = load_trained("demo_eed_team_mean", runs_dir, "cpu")[0]
    except Exception as e:  # a benchmark, not the CLI: say what is missing and skip this part
        print(f"[3] skipped: {e} (run: python -m robbench.eed.pipeline)")
        return
    test = load_split("digits", "test")
    x, _ = test.get(list(range(len(test))))
    shape = tuple(x.shape[1:])
    dense_macs = network_cost(base.members[0], shape)["macs_per_sample"]
    cost = {"die": team_cost(die, x, shape), "mean": team_cost(mean, x, shape)}

    def fwd(m: torch.nn.Module) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad():
                m(x)
        return run
    t = interleaved({"dense": fwd(base), "die": fwd(die), "mean": fwd(mean)}, reps)
    print(f"[3] digits EED team ({cost['die']['size']} members), 450 test images, forward: dense AT "
          f"{t['dense'] * 1e3:.1f} ms")
    for k in ("die", "mean"):
        c = cost[k]
        print(f"    {k}: {c['members_per_sample']:.3f} members/sample; FLOP speed-up "
              f"{speedup(dense_macs, c['macs_per_sample']):.2f}x, wall speed-up {t['dense'] / t[k]:.2f}x "
              f"({t[k] * 1e3:.1f} ms)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs-dir", default=None)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--attack-steps", type=int, default=10, help="PGD iterates of the prune step with an attack "
                    "(0: skip; HARP's training attack: 10)")
    ap.add_argument("--skip-cifar", action="store_true", help="only the digits network in [1]-[2]")
    a = ap.parse_args()
    torch.set_grad_enabled(True)
    masked_vs_dense("demo_eed_nis_0", a.batch, None, a.reps, a.attack_steps)
    if not a.skip_cifar:
        masked_vs_dense("eed_resnet18_cifar10_nis_0", 32, None, max(2, a.reps // 2), a.attack_steps)
    die_speed(a.runs_dir, a.reps)


if __name__ == "__main__":
    main()
