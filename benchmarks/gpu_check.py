"""GPU readiness check: prove robbench's CUDA paths and measure what the full-scale runs will cost.

One command, no install step, no network, no dataset (CIFAR-shaped synthetic data), run from the
repository root on a machine with torch:

    python benchmarks/gpu_check.py --out DIR               # on a GPU: full sizes, <= --budget-s (420 s)
    python benchmarks/gpu_check.py --device cpu --quick --out DIR   # tiny sizes, any machine, < 3 min

It writes DIR/gpu_check.json (every number, every section's status) and DIR/gpu_check.md (the summary),
rewritten after every section. Sections, in order (docs/gpu.md explains how to read them):

  env                 versions, device, which of robbench's dependencies import here
  memformat           robbench.memformat.choose_memory_format on this device (ResNet-20, EIO RGN, VGG-16)
  vmap_equivalence    members batched with vmap vs looped: logits, input and weight gradients; DVERGE step
  cuda_vs_cpu         logits, input gradients, PGD-10 and one baseline / DVERGE step, CUDA vs CPU (CUDA only)
  torchrun            torchrun --nproc_per_node 1: NCCL (gloo on CPU) training, all-reduce step, evaluation
  method_throughput   images/s of a training step of every method in robbench.registry.METHODS
  loop_vs_vmap        attack step and forward of ResNet-20 x3/x5/x8, members looped vs vmap
  memory_formats      channels_last vs contiguous, training and attack step
  pgd_whitebox        DVERGE's PGD-50 x 5 restarts through robbench.evaluate (no early stop)
  transfer_set        one DVERGE black-box transfer set (M-PGD-100, every eps) through robbench.evaluate
  compile             eager vs torch.compile, training and attack step (a subprocess)
  projection_costs    the per-step / per-image costs the papers' work needs (measured, else estimated)
  projection          GPU-hours per paper table (DVERGE Tables 1, 3-8; EIO; EED; Xie) beside the papers' times

Every section runs in its own try (a failure is recorded as "failed: <traceback tail>", a tolerance
miss as "failed: tolerance: <checks>", a section that cannot run as "skipped: <reason>"), within its own
time budget and the overall --budget-s; a watchdog ends the run 45 s past the overall budget, keeping the
files written so far. On 8 minutes of a GPU: the default budget is 420 s plus the watchdog's 45 s.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))  # the gpucheck package beside this file
sys.path.insert(0, str(REPO))  # robbench from the checkout: the GPU machine cannot pip-install it

import torch  # noqa: E402

from gpucheck.fixtures import CIFAR, Geometry  # noqa: E402
from gpucheck.runner import Runner  # noqa: E402

DEFAULT_BUDGET_S = 420.0

# modules a section imports beyond torch (import names); a missing one skips the section with a line
ENGINE = ("numpy", "pandas", "click", "safetensors", "tqdm")
SECTION_NEEDS: dict[str, tuple[str, ...]] = {
    "env": (), "memformat": (), "vmap_equivalence": ("numpy",), "cuda_vs_cpu": ("numpy",),
    "torchrun": ENGINE, "method_throughput": ("numpy",), "loop_vs_vmap": (), "memory_formats": ("numpy",),
    "pgd_whitebox": ENGINE, "transfer_set": ENGINE, "compile": ("numpy",), "projection_costs": ENGINE,
    "projection": ENGINE,
}
# (section, budget s full, budget s quick, CUDA only)
SECTIONS: list[tuple[str, float, float, bool]] = [
    ("env", 20, 10, False),
    ("memformat", 30, 20, False),
    ("vmap_equivalence", 25, 10, False),
    ("cuda_vs_cpu", 40, 10, True),
    ("torchrun", 60, 45, False),
    ("method_throughput", 75, 45, False),
    ("loop_vs_vmap", 20, 6, False),
    ("memory_formats", 20, 6, False),
    ("pgd_whitebox", 25, 15, False),
    ("transfer_set", 30, 15, False),
    ("compile", 75, 30, False),
    ("projection_costs", 60, 20, False),
    ("projection", 15, 10, False),
]
# seconds kept for the last two sections whatever the earlier ones take
RESERVE_S = {"compile": 35.0, "projection_costs": 12.0}


@dataclass
class Options:
    device: torch.device
    quick: bool
    out: Path
    tmp: Path
    geometry: Geometry
    batch: int            # training-step batch (DVERGE: 128)
    reps: int             # timed repetitions
    check_n: int          # samples of the vmap checks
    device_check_n: int   # samples / batch of the CUDA vs CPU checks (the CPU side must stay quick)
    dist_batch: int
    pgd_n: int            # white-box samples (DVERGE: 1000)
    pgd_batch: int        # engine batch (DVERGE eval: 200)
    transfer_n: int
    cost_batch: int       # batch of the per-image cost measurements
    compile_backend: str


def make_options(a: argparse.Namespace, device: torch.device, tmp: Path) -> Options:
    if a.quick:
        return Options(device, True, a.out, tmp, Geometry(8, 3, 10), batch=16, reps=2, check_n=8, device_check_n=8,
                       dist_batch=16, pgd_n=8, pgd_batch=8, transfer_n=8, cost_batch=16,
                       compile_backend=a.compile_backend)
    return Options(device, False, a.out, tmp, CIFAR, batch=128, reps=5, check_n=64, device_check_n=32, dist_batch=64,
                   pgd_n=1000, pgd_batch=200, transfer_n=200, cost_batch=200, compile_backend=a.compile_backend)


def write_outputs(out: Path, results: dict[str, Any]) -> None:
    from gpucheck.summary import render

    out.mkdir(parents=True, exist_ok=True)
    for name, text in (("gpu_check.json", json.dumps(results, indent=1, default=str, allow_nan=True)),
                       ("gpu_check.md", render(results))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out / name)


SECTION_FUNCTIONS = {
    "env": "envinfo.env", "memformat": "correctness.memformat", "vmap_equivalence": "correctness.vmap_equivalence",
    "cuda_vs_cpu": "correctness.cuda_vs_cpu", "torchrun": "subproc.torchrun",
    "method_throughput": "speed.method_throughput", "loop_vs_vmap": "speed.loop_vs_vmap",
    "memory_formats": "speed.memory_formats", "pgd_whitebox": "speed.pgd_whitebox",
    "transfer_set": "speed.transfer_set", "compile": "subproc.compile_check",
    "projection_costs": "costs.projection_costs", "projection": "costs.projection",
}


def section_function(name: str) -> Any:
    """The section's function, imported when it runs: a module that fails to import (robbench being
    edited, a missing package) fails that section only."""
    def run(sec: Any) -> Any:
        import importlib

        mod, fn = SECTION_FUNCTIONS[name].rsplit(".", 1)
        return getattr(importlib.import_module(f"gpucheck.{mod}"), fn)(sec)
    return run


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "reports" / "_tmp" / "gpu-check",
                    help="folder for gpu_check.json and gpu_check.md (default: reports/_tmp/gpu-check)")
    ap.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    ap.add_argument("--quick", "--tiny", action="store_true", dest="quick",
                    help="tiny sizes (8x8 images, batch 16, few steps): exercises every code path in minutes on a "
                         "CPU; its numbers are not representative")
    ap.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                    help="overall time budget; sections that would start after it are skipped (default 420)")
    ap.add_argument("--sections", default="", help="comma-separated subset of sections to run (default: all)")
    ap.add_argument("--compile-backend", default="inductor", help="torch.compile backend for the compile section")
    a = ap.parse_args(argv)
    # robbench.device.pick_device's rule, without importing robbench here (a failing import must cost
    # the sections that need it, not the files)
    device = torch.device(a.device) if a.device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    known = [s[0] for s in SECTIONS]
    chosen = [s.strip() for s in a.sections.split(",") if s.strip()]
    bad = [s for s in chosen if s not in known]
    if bad:
        print(f"gpu_check: --sections: unknown {', '.join(bad)}; allowed: {', '.join(known)}", file=sys.stderr)
        return 2
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: --device: CUDA is not available here; allowed: cpu (with --quick for a short run)",
              file=sys.stderr)
        return 2
    has_cuda = device.type == "cuda"
    with tempfile.TemporaryDirectory(prefix="robbench-gpu-check-") as tmp:
        opts = make_options(a, device, Path(tmp))
        runner = Runner(a.out, a.budget_s, opts, write_outputs)
        runner.results["meta"].update(command=" ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
                                      quick=opts.quick, device=str(device),
                                      started=time.strftime("%Y-%m-%d %H:%M:%S"))
        try:
            for name, full_s, quick_s, cuda_only in SECTIONS:
                budget = quick_s if opts.quick else full_s
                if name in RESERVE_S:  # keep time for the projection whatever came before
                    budget = min(budget, max(0.0, runner.deadline - time.monotonic() - RESERVE_S[name]))
                runner.run(name, section_function(name), budget, selected=not chosen or name in chosen,
                           cuda_only=cuda_only, has_cuda=has_cuda, needs=SECTION_NEEDS[name])
            runner.write()
        finally:
            runner.close()
    statuses = [v["status"] for v in runner.results["sections"].values()]
    failed = [s for s in statuses if s.startswith("failed")]
    print(f"[gpu-check] wrote {a.out / 'gpu_check.json'} and {a.out / 'gpu_check.md'}: "
          f"{sum(s == 'ok' for s in statuses)} ok, {len(failed)} failed, "
          f"{sum(s.startswith('skipped') for s in statuses)} skipped", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
