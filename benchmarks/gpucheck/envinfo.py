"""The environment section: versions, the device, which of robbench's dependencies are importable here.

The GPU machine has no package registry, so the check never installs anything: a missing dependency
skips only the sections that import it (``SECTION_NEEDS`` in gpu_check.py), and this section lists them.
"""
from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import torch

from gpucheck.runner import missing_modules

REPO = Path(__file__).resolve().parents[2]
# distribution name -> import name, where they differ
IMPORT_NAMES = {"scikit-learn": "sklearn", "pyautoattack": "pyautoattack"}


def dependencies() -> list[dict[str, Any]]:
    """robbench's runtime and test dependencies (pyproject.toml) with whether each imports here."""
    with open(REPO / "pyproject.toml", "rb") as fh:
        proj = tomllib.load(fh)["project"]
    reqs = [(r, "runtime") for r in proj.get("dependencies", [])]
    for extra, rs in (proj.get("optional-dependencies") or {}).items():
        reqs += [(r, extra) for r in rs]
    out = []
    for req, group in reqs:
        dist = re.split(r"[\s<>=!~\[;]", req, maxsplit=1)[0]
        mod = IMPORT_NAMES.get(dist, dist.replace("-", "_"))
        try:
            version = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            version = None
        out.append({"requirement": req, "group": group, "import": mod, "installed": version,
                    "importable": not missing_modules([mod])})
    return out


def _git_commit() -> str | None:
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=5)
        return r.stdout.strip() or None if r.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def env(sec: Any) -> dict[str, Any]:
    o = sec.options
    d: dict[str, Any] = {"python": sys.version.split()[0], "platform": platform.platform(), "torch": torch.__version__,
                         "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
                         "device": str(o.device), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                         "git_commit": _git_commit(), "quick": o.quick, "dependencies": dependencies(),
                         "triton_importable": not missing_modules(["triton"])}
    if o.device.type == "cuda":
        p = torch.cuda.get_device_properties(o.device)
        d.update(gpu=p.name, capability=f"{p.major}.{p.minor}", gpu_memory_gib=round(p.total_memory / 2**30, 1),
                 cudnn=torch.backends.cudnn.version(), device_count=torch.cuda.device_count())
        try:
            d["nccl"] = ".".join(map(str, torch.cuda.nccl.version())) if isinstance(torch.cuda.nccl.version(), tuple) \
                else str(torch.cuda.nccl.version())
        except Exception as e:  # no NCCL in this build: the torchrun section will say why it fails
            d["nccl"] = f"unavailable: {type(e).__name__}"
        t = time.monotonic()  # CUDA context and cuDNN load, so the first timed section does not pay them
        x = torch.randn(8, 3, 32, 32, device=o.device)
        torch.nn.functional.conv2d(x, torch.randn(4, 3, 3, 3, device=o.device)).sum().item()
        d["cuda_init_s"] = round(time.monotonic() - t, 3)
    try:
        from robbench.registry import METHODS

        d["methods"] = METHODS.names()
    except Exception as e:  # robbench itself does not import: every later section will fail and say why
        d["methods"] = f"failed: {type(e).__name__}: {e}"
        sec.check("robbench imports", False)
    return d
