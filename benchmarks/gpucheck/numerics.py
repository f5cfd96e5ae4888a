"""Comparing tensors across execution paths, and switching TF32 off for strict float32 comparisons.

On Ampere and newer GPUs cuDNN convolutions run in TF32 by default (``torch.backends.cudnn.allow_tf32``),
which rounds inputs to a 10-bit mantissa: two paths that pick different kernels then differ by ~1e-3
relative, which is not a bug. Strict checks run under :func:`strict_fp32`; the same comparison with the
default settings is recorded beside it with a looser tolerance.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Any, Iterator, Mapping

import torch


def rel_diff(a: torch.Tensor | None, b: torch.Tensor | None) -> float:
    """max|a - b| / max|a| in float64 on the CPU (inf when one is missing or not finite)."""
    if a is None and b is None:
        return 0.0
    if a is None or b is None:
        return float("inf")
    a = a.detach().to("cpu", torch.float64)
    b = b.detach().to("cpu", torch.float64)
    if a.shape != b.shape:
        return float("inf")
    if a.numel() == 0:
        return 0.0
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return float("inf")
    return float((a - b).abs().max()) / max(float(a.abs().max()), 1e-12)


def max_rel_diff(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> tuple[float, str]:
    """The largest :func:`rel_diff` over the keys of ``a`` and where it occurs."""
    worst, where = 0.0, ""
    for k, v in a.items():
        d = rel_diff(v, b.get(k))
        if d > worst or not where:
            worst, where = d, k
    return worst, where


def update_rel_error(before: Mapping[str, torch.Tensor], a: Mapping[str, torch.Tensor],
                     b: Mapping[str, torch.Tensor]) -> float:
    """||(a - before) - (b - before)|| / ||a - before|| over every floating tensor: how far two paths'
    weight *updates* (one optimizer step) disagree, relative to the update itself."""
    num, den = 0.0, 0.0
    for k, w0 in before.items():
        if not w0.is_floating_point():
            continue
        w0 = w0.detach().to("cpu", torch.float64)
        da = a[k].detach().to("cpu", torch.float64) - w0
        db = b[k].detach().to("cpu", torch.float64) - w0
        num += float((da - db).pow(2).sum())
        den += float(da.pow(2).sum())
    if den == 0.0:
        return 0.0 if num == 0.0 else float("inf")
    return (num / den) ** 0.5


def cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def tf32_settings() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, obj, attr in (("cudnn.allow_tf32", torch.backends.cudnn, "allow_tf32"),
                            ("cuda.matmul.allow_tf32", torch.backends.cuda.matmul, "allow_tf32")):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out[name] = bool(getattr(obj, attr))
        except Exception as e:  # a torch that changed the API: say so, never fail the check for it
            out[name] = f"unreadable: {type(e).__name__}"
    return out


@contextlib.contextmanager
def strict_fp32() -> Iterator[bool]:
    """TF32 off for cuDNN and matmul inside the block (restored after); yields whether it could be set."""
    saved = []
    ok = True
    for obj in (torch.backends.cudnn, torch.backends.cuda.matmul):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                saved.append((obj, obj.allow_tf32))
                obj.allow_tf32 = False
        except Exception:
            ok = False
    try:
        yield ok
    finally:
        for obj, v in saved:
            with contextlib.suppress(Exception), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                obj.allow_tf32 = v
