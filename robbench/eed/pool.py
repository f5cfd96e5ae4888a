"""The pool's per-sample attack failures computed in process (PGD-20 as eed-suite's, through the shared
attack core) and the RD selection record written beside the results.

The results-store path is :func:`robbench.eed.diversity.failures_from_store` (after ``robbench
evaluate --protocol eed-suite`` of the pool); this module is the in-process equivalent for tests and the
digits demo.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from robbench.eed.diversity import RD_THRESHOLD, Selection, select_team


def attack_failures(models: Sequence[nn.Module], x: torch.Tensor, y: torch.Tensor, *, eps: float, step: float,
                    steps: int = 20, seed: int = 0, batch_size: int = 500) -> torch.Tensor:
    """``fail[S, N]``: model s misclassifies its own PGD example of sample n (uniform start, CE, last iterate)."""
    from robbench.attacks.core import iterative_attack

    rows = []
    for model in models:
        model.eval()
        out = []
        for i in range(0, len(x), batch_size):
            res = iterative_attack(model, x[i:i + batch_size], y[i:i + batch_size], eps, norm="linf", steps=steps,
                                   step_size=step, loss="ce", init="uniform", seed=seed + i)
            out.append(res.fooled.cpu())
        rows.append(torch.cat(out))
    return torch.stack(rows)


def selection_path(db: str | Path, prefix: str) -> Path:
    """Where the selection record of pool ``prefix`` lives: beside the results store it was computed from."""
    return Path(db).parent / f"{prefix}_selection.json"


def write_selection(path: str | Path, selection: Selection, meta: dict[str, Any] | None = None) -> Path:
    """The choice, every team's RD and the threshold as JSON (atomic write)."""
    from robbench.checkpoint import atomic_write_json

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(p, {**selection.as_record(), "meta": meta or {}})
    return p


def read_selection(path: str | Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def select_from_store(db: Any, entries: Sequence[str], attack: str = "pgd20", threshold: float = RD_THRESHOLD,
                      protocol: str | None = None) -> Selection:
    from robbench.eed.diversity import failures_from_store

    return select_team(failures_from_store(db, entries, attack=attack, protocol=protocol), list(entries), threshold)
