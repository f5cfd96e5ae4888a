"""Device choice: CUDA when present, CPU otherwise; one code path."""
from __future__ import annotations

import re

import torch

from robbench.errors import UserError

_DEVICE = re.compile(r"(cpu|cuda|mps)(?::(\d+))?")


def pick_device(name: str | None = None) -> torch.device:
    """``None`` means CUDA when available, else CPU. A name that is not ``cpu``, ``cuda`` or ``cuda:K``
    (``mps`` where torch has it), or a device this machine lacks, is a one-line :class:`UserError`."""
    if not name:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    m = _DEVICE.fullmatch(name.strip())
    if m is None:
        raise UserError(f"{name!r} is not a device; allowed: cpu, cuda, cuda:K", file="--device", reason="device")
    kind, index = m.group(1), m.group(2)
    if kind == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UserError(f"{name!r}: CUDA is not available on this machine; allowed: cpu", file="--device",
                            reason="device")
        if index is not None and int(index) >= count:
            raise UserError(f"{name!r}: this machine has {count} CUDA device(s); allowed: cuda, "
                            f"cuda:0..cuda:{count - 1}, cpu", file="--device", reason="device")
    if kind == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError(f"{name!r}: MPS is not available on this machine; allowed: cpu", file="--device",
                        reason="device")
    return torch.device(name.strip())


def use_vmap(device: torch.device) -> bool:
    """vmap over ensemble members is slower than a loop on CPU (0.54-1.0x measured); use it on GPU."""
    return device.type == "cuda"
