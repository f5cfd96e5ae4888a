"""Sections that run :mod:`gpucheck.child` in a subprocess: the ``torchrun`` job and ``torch.compile``.

The subprocess gets the section's time left as a hard timeout; whatever JSON it wrote by then is kept.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

CHILD = Path(__file__).resolve().parent / "child.py"
REPO = CHILD.parents[2]


def run_child(cmd: list[str], out_json: Path, timeout: float) -> dict[str, Any]:
    """Run ``cmd``; returns {"rc", "timed_out", "record" (the child's JSON or {}), "output_tail"}."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    timed_out = False
    try:
        proc = subprocess.run(cmd, cwd=str(REPO), env=env, capture_output=True, text=True, timeout=max(1.0, timeout))
        rc, text = proc.returncode, (proc.stdout or "") + (proc.stderr or "")
    except subprocess.TimeoutExpired as e:
        timed_out, rc = True, None
        text = ((e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")) + \
               ((e.stderr or b"").decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or ""))
    rec: dict[str, Any] = {}
    if out_json.is_file():
        try:
            rec = json.loads(out_json.read_text())
        except ValueError:
            rec = {"unreadable": out_json.read_text()[-500:]}
    return {"rc": rc, "timed_out": timed_out, "record": rec, "output_tail": "\n".join(text.splitlines()[-15:])}


def child_memory_format(o: Any) -> str:
    """``auto`` (robbench's check) except quick runs on a CPU, where a fresh process would repeat the CPU
    probe (a child process of its own) for seconds: there the main process's memformat section covers it."""
    return "contiguous" if (o.quick and o.device.type == "cpu") else "auto"


def torchrun(sec: Any) -> dict[str, Any]:
    """``torchrun --standalone --nproc_per_node 1`` (as ``python -m torch.distributed.run``) of the dist
    child: NCCL on CUDA, gloo on the CPU."""
    o = sec.options
    tmp = o.tmp / "torchrun"
    tmp.mkdir(parents=True, exist_ok=True)
    out = tmp / "dist_result.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", str(CHILD),
           "dist", "--out", str(out), "--tmp", str(tmp), "--device", o.device.type, "--side", str(o.geometry.side),
           "--batch", str(o.dist_batch), "--memory-format", child_memory_format(o)] + (["--quick"] if o.quick else [])
    res = run_child(cmd, out, sec.left() - 1)
    rec = res["record"]
    sec.check("torchrun job exited 0", res["rc"] == 0)
    sec.check(f"joined a {rec.get('backend', '?')} process group",
              rec.get("backend") == ("nccl" if o.device.type == "cuda" else "gloo"))
    for name, ph in (rec.get("phases") or {}).items():
        sec.check(f"torchrun {name}", str(ph.get("status", "")).startswith("ok"))
    for name in ("train_entry", "allreduce_step", "object_collectives", "evaluate_protocol"):
        if name not in (rec.get("phases") or {}):
            sec.check(f"torchrun {name} (did not run)", False)
    return {"command": " ".join(cmd[1:]), **res}


def compile_check(sec: Any) -> dict[str, Any]:
    """Eager vs ``torch.compile`` (inductor on CUDA; on the CPU in quick mode the 'eager' backend, which
    traces with dynamo but generates no code, so the path is exercised in seconds)."""
    o = sec.options
    tmp = o.tmp / "compile"
    tmp.mkdir(parents=True, exist_ok=True)
    out = tmp / "compile_result.json"
    backend = "eager" if (o.quick and o.device.type == "cpu") else o.compile_backend
    cmd = [sys.executable, str(CHILD), "compile", "--out", str(out), "--device", str(o.device),
           "--side", str(o.geometry.side), "--batch", str(o.batch), "--reps", str(o.reps), "--backend", backend,
           "--memory-format", child_memory_format(o)]
    res = run_child(cmd, out, sec.left() - 1)
    if res["timed_out"]:
        res["note"] = "timed out: the record holds the phases that finished (compile time is the first step)"
    sec.check("compile child finished", res["rc"] == 0)
    return {"backend": backend, **res}
