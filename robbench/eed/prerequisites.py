"""The trained runs an EED entry needs before it can train, transitively, and which of them are missing.

EED's entries form a chain (Alg. 1): the AT base (``dense_from`` of a prune run), the prune run
(``train.init_from`` of its fine-tune run), the fine-tuned sub-models (``train.params.team`` of the team
entry). A missing link is reported as the whole list of ``robbench train`` commands still to run, in
training order, so a newcomer does not discover them one error at a time.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any


def direct_prerequisites(entry: Any) -> list[str]:
    """Entries ``entry`` (a ZooEntry) loads trained weights from."""
    names = [entry.train.init_from] if entry.train.init_from else []
    params = entry.method_params
    dense = getattr(params, "dense_from", None)
    if dense and getattr(params, "phase", "prune") == "prune":
        names.append(dense)
    names.extend(getattr(params, "team", None) or [])
    return names


def _complete(name: str, runs_dir: str | Path | None) -> bool:
    from robbench.checkpoint import RunDir
    from robbench.errors import CheckpointError

    run = RunDir(runs_dir, name)
    if not run.exists():
        return False
    try:
        return run.read_manifest().get("status") == "complete"
    except CheckpointError:
        return False


def missing_prerequisites(names: list[str], runs_dir: str | Path | None) -> list[str]:
    """Untrained entries among ``names`` and everything they need, in an order they can be trained in
    (a prerequisite before the entries that need it). Names that are not zoo entries are listed as is."""
    from robbench.config import load_entry
    from robbench.errors import UserError

    order: list[str] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen:
            return
        seen.add(name)
        if _complete(name, runs_dir):
            return
        try:
            needs = direct_prerequisites(load_entry(name))
        except UserError:
            needs = []
        for dep in needs:
            visit(dep)
        order.append(name)

    for n in names:
        visit(n)
    return order


def train_commands(missing: list[str]) -> str:
    """'robbench train zoo/a, then zoo/b, ...' for an error line."""
    return "robbench train " + ", then ".join(f"zoo/{n}" for n in missing)
