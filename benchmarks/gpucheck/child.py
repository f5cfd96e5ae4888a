"""What the GPU check runs in subprocesses, so a hang or a crash there costs a timeout, not the run.

``dist`` (launched by ``python -m torch.distributed.run --standalone --nproc_per_node 1``): join the
process group (NCCL on CUDA, gloo on CPU) through ``robbench.distributed.join_process_group``; train a
tiny synthetic entry with ``robbench.train.run.train_entry``; one training step whose gradient all-reduce
and buffer broadcast really go through the backend (a one-rank group normally skips them: ``DistEnv``
is only "enabled" for world size > 1, so the check forces it) and must leave the weights bit-identical to
a plain step; the ``DistEnv`` object collectives the evaluation shards use (broadcast, gather, any); and an
evaluation of the trained run through ``robbench.evaluate.evaluate_protocol``.

``compile``: a baseline training step and an attack step of ResNet-20 x3, eager vs ``torch.compile``d
members (compile time and steady-state speed, and the first step's losses compared).

Each mode writes its JSON record (``--out``) after every phase, so a timeout keeps what finished.
``--memory-format`` is what robbench is asked for: ``auto`` (checked) except in quick mode on a CPU, where the
main script passes ``contiguous`` (a fresh process would repeat the CPU probe, which runs in a child process
of its own, for seconds; the main process's memformat section covers that check).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))           # benchmarks/ (the gpucheck package)
sys.path.insert(0, str(HERE.parent.parent))    # the repository root (robbench, without installing it)

import torch  # noqa: E402

from gpucheck import fixtures as fx  # noqa: E402
from gpucheck.numerics import cpu_state, rel_diff  # noqa: E402
from gpucheck.timing import sync, timed  # noqa: E402


def _save(path: Path, rec: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(rec, indent=1, default=str))
    os.replace(tmp, path)


def _tail(e: BaseException) -> str:
    import traceback

    return "\n".join("".join(traceback.format_exception(type(e), e, e.__traceback__)).rstrip().splitlines()[-8:])


class _Opts:
    """The attributes of the main script's options that gpucheck.speed._engine_protocol reads."""

    def __init__(self, quick: bool) -> None:
        self.quick = quick


# ---------------------------------------------------------------------------------------------- dist
def dist_main(a: argparse.Namespace) -> int:
    import torch.distributed as dist

    from robbench.distributed import DistEnv, join_process_group

    class ForcedDist(DistEnv):
        """A one-rank group that still runs every collective (DistEnv skips them below two ranks)."""

        @property
        def enabled(self) -> bool:  # type: ignore[override]
            return True

    out = Path(a.out)
    rec: dict[str, Any] = {"phases": {}}
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if a.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    t = time.monotonic()
    env = join_process_group(backend)
    rec.update(backend=str(dist.get_backend()), world_size=env.world_size, rank=env.rank,
               torchrun_env={k: os.environ.get(k) for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_PORT")},
               join_s=round(time.monotonic() - t, 3))
    _save(out, rec)
    g = fx.Geometry(a.side, 3, 10)
    tmp = Path(a.tmp)
    ok = True

    def phase(name: str, fn: Any) -> None:
        nonlocal ok
        t0 = time.monotonic()
        try:
            rec["phases"][name] = {"status": "ok", **(fn() or {})}
        except Exception as e:  # each phase isolated, like the sections of the main script
            rec["phases"][name] = {"status": "failed: " + _tail(e)}
            ok = False
        rec["phases"][name]["seconds"] = round(time.monotonic() - t0, 3)
        _save(out, rec)

    name = "baseline_resnet20_x3"
    overrides = fx.synthetic_overrides(g, batch=a.batch, n_train=4 * a.batch, n_test=a.batch) + ["train.epochs=1"]

    def train() -> dict[str, Any]:
        from robbench.train.run import train_entry

        m = train_entry(name, overrides, device=str(device), runs_dir=tmp / "runs", progress=False,
                        memory_format=a.memory_format)
        return {"manifest_status": m.get("status"), "epochs_done": m.get("epochs_done"),
                "final_test_acc": (m.get("extra") or {}).get("final_test_acc"), "device": str(device)}

    def collective_step() -> dict[str, Any]:
        entry = fx.synthetic_entry(name, g, batch=a.batch)
        model, fmt = fx.build(entry, device, a.memory_format)
        twin = copy.deepcopy(model)
        before = cpu_state(model)
        states = []
        for m, d in ((model, ForcedDist(1, 0, local)), (twin, DistEnv())):
            ctx, method = fx.method_context(entry, m, device, fmt, dist=d)
            method.step(ctx, fx.random_batch(g, a.batch, method.streams, device, fmt, seed=11))
            states.append(cpu_state(m))
        sync(device)
        worst = max(float((states[0][k].double() - states[1][k].double()).abs().max()) for k in states[0]
                    if states[0][k].is_floating_point())
        moved = max(float((states[0][k].double() - before[k].double()).abs().max()) for k in before
                    if before[k].is_floating_point())
        if worst != 0.0 or moved == 0.0:
            raise AssertionError(f"all-reduced step differs from the plain step by {worst} (moved {moved})")
        return {"max_abs_diff_vs_plain_step": worst, "weights_moved": moved}

    def object_collectives() -> dict[str, Any]:
        d = ForcedDist(1, 0, local)
        got = (d.broadcast({"x": 1}), d.gather(7), d.any(False), d.any(True))
        d.barrier()
        if got != ({"x": 1}, [7], False, True):
            raise AssertionError(f"object collectives returned {got}")
        return {"broadcast_gather_any": "ok", "shard_rounds_for_5_batches": d.rounds(5)}

    def evaluate() -> dict[str, Any]:
        from gpucheck.speed import _engine_protocol
        from robbench.evaluate.engine import evaluate_protocol

        proto = _engine_protocol("dverge-whitebox", _Opts(a.quick), a.batch, [0.03], max(1, a.batch // 2))
        t0 = time.monotonic()
        ids = evaluate_protocol(proto, [name], device=str(device), runs_dir=tmp / "runs", db=tmp / "results.db",
                                cache_root=tmp / "cache", data_root=tmp / "data", quiet=True,
                                memory_format=a.memory_format)
        sync(device)
        return {"run_ids": ids, "batches": 2, "evaluate_s": round(time.monotonic() - t0, 3)}

    phase("train_entry", train)
    phase("allreduce_step", collective_step)
    phase("object_collectives", object_collectives)
    phase("evaluate_protocol", evaluate)
    rec["ok"] = ok
    _save(out, rec)
    dist.destroy_process_group()
    return 0 if ok else 1


# ---------------------------------------------------------------------------------------------- compile
def compile_main(a: argparse.Namespace) -> int:
    from robbench.models import Ensemble

    out = Path(a.out)
    device = torch.device(a.device)
    g = fx.Geometry(a.side, 3, 10)
    rec: dict[str, Any] = {"backend": a.backend, "batch": a.batch, "torch": torch.__version__}
    entry = fx.synthetic_entry("baseline_resnet20_x3", g, batch=a.batch)
    eager, fmt = fx.build(entry, device, a.memory_format)
    comp = copy.deepcopy(eager)
    for m in comp.members:  # the methods call members directly: compile each member in place
        m.compile(backend=a.backend)
    batch_seed = 12
    runs = {}
    for label, model in (("eager", eager), ("compiled", comp)):
        ctx, method = fx.method_context(entry, model, device, fmt)
        b = fx.random_batch(g, a.batch, method.streams, device, fmt, seed=batch_seed)
        t0 = time.monotonic()
        first = method.step(ctx, b)
        sync(device)
        first_s = time.monotonic() - t0
        t = timed(fx.step_fn(ctx, method, b), device, reps=a.reps, warmup=1)
        runs[label] = first
        rec[f"train_{label}"] = {"first_step_s": round(first_s, 3), "img_per_s": a.batch / t["median_s"],
                                 "seconds_per_step": t["median_s"]}
        _save(out, rec)
    keys = sorted(set(runs["eager"]) & set(runs["compiled"]))
    rec["first_step_loss_rel_diff"] = max((abs(runs["eager"][k] - runs["compiled"][k]) / max(abs(runs["eager"][k]), 1e-12)
                                           for k in keys), default=None)
    rec["train_speedup"] = rec["train_compiled"]["img_per_s"] / rec["train_eager"]["img_per_s"]
    _save(out, rec)

    # attack step: eval mode (a recompile), members looped so each compiled member runs as compiled
    x, y = fx.random_images(g, a.batch, seed=13)
    x, y = fmt.prepare(x.to(device)), y.to(device)
    for label, model in (("eager", eager), ("compiled", comp)):
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        ens = Ensemble(model.members, combine=model.combine, batched=False)

        def step(ens: Any = ens) -> torch.Tensor:
            xx = x.detach().clone().requires_grad_(True)
            return torch.autograd.grad(torch.nn.functional.nll_loss(ens(xx), y), xx)[0]

        t0 = time.monotonic()
        grad = step()
        sync(device)
        first_s = time.monotonic() - t0
        t = timed(step, device, reps=a.reps, warmup=1)
        rec[f"attack_{label}"] = {"first_step_s": round(first_s, 3), "img_per_s": a.batch / t["median_s"]}
        runs[f"grad_{label}"] = grad
        _save(out, rec)
    rec["attack_grad_rel_diff"] = rel_diff(runs["grad_eager"], runs["grad_compiled"])
    rec["attack_speedup"] = rec["attack_compiled"]["img_per_s"] / rec["attack_eager"]["img_per_s"]
    rec["ok"] = True
    _save(out, rec)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=("dist", "compile"))
    ap.add_argument("--out", required=True)
    ap.add_argument("--tmp", default=".")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--side", type=int, default=32)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--backend", default="inductor")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--memory-format", default="auto", help="what robbench is asked for (auto = checked)")
    a = ap.parse_args()
    return dist_main(a) if a.mode == "dist" else compile_main(a)


if __name__ == "__main__":
    sys.exit(main())
