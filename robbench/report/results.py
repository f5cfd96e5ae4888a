"""What the report reads: the latest finished run of each (entry, protocol) in the results store, its
per-sample outcomes, and what ``runs/<entry>/`` says about the entry (manifest, weights, log)."""
from __future__ import annotations

import fnmatch
import json
import struct
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from safetensors import safe_open

from robbench.checkpoint import LOG, MANIFEST, WEIGHTS
from robbench.config import load_entry
from robbench.pruning.measure import TRAINING_ONLY
from robbench.store import Store, all_or_nothing, latest_runs

EPS_TOL = 1e-9


# State-dict leaves that are not deployed parameters: BN statistics, and a pruned layer's training-only
# scores / rates and its mask buffer (what robbench.pruning.measure.footprint leaves out too).
NOT_PARAMETERS = ("running_mean", "running_var", "num_batches_tracked", *TRAINING_ONLY, "mask")


def _mask_nonzeros(path: Path, keys: list[str]) -> dict[str, int]:
    """Non-zero count of each named tensor of a safetensors file (an unreadable file counts nothing)."""
    out: dict[str, int] = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            for k in keys:
                out[k] = int(f.get_tensor(k).count_nonzero())
    except (OSError, ValueError, RuntimeError):
        return {}
    return out


@dataclass(frozen=True)
class RunInfo:
    run_id: Any
    entry: str
    protocol: str
    seed: int | None
    finished: str
    checkpoint_sha256: str
    overrides: list[str]
    meta: dict[str, Any]
    role: str = "target"
    protocol_sha256: str = ""
    versions: dict[str, Any] | None = None

    @property
    def label(self) -> str:
        """The protocol as tables and flags name the run (a source's own-accuracy run says so)."""
        return self.protocol if self.role == "target" else f"{self.protocol} ({self.role} role)"


def _loads(v: Any, default: Any) -> Any:
    if v is None or (isinstance(v, float) and v != v):
        return default
    if isinstance(v, (dict, list)):
        return v
    try:
        return json.loads(v)
    except (TypeError, ValueError):
        return default


def select_outcomes(df: pd.DataFrame, attacks: list[str], eps: float | None, member: int | None = -1,
                    steps: int | None = None) -> pd.DataFrame:
    """The outcome rows of the listed attacks for ``member`` (None: every member's; ``steps``: only those
    recorded after that many iterations; ``eps``: only that eps, within EPS_TOL)."""
    sub = df[df["attack"].isin(attacks)]
    if member is not None:
        sub = sub[sub["member"] == member]
    if steps is not None:
        sub = sub[sub["steps"] == steps]
    if eps is not None:
        sub = sub[np.isclose(sub["eps"].astype(float), eps, rtol=0, atol=EPS_TOL)]
    return sub


def all_or_nothing_counts(df: pd.DataFrame, attacks: list[str], eps: float | None, member: int = -1,
                          steps: int | None = None) -> tuple[int, int] | None:
    """(correct under every outcome key of the listed attacks, samples) at ``eps`` (``steps``: only the
    keys recorded after that many iterations); ``None`` if no outcome matches. Callers with a run use
    :meth:`Results.aon_counts`, which memoizes this."""
    sub = select_outcomes(df, attacks, eps, member, steps)
    if sub.empty:
        return None
    res = all_or_nothing(sub, attacks=None, members=[member])
    if res.empty:
        return None
    if len(res) != 1:  # several eps matched (eps=None over a multi-eps run): not one cell
        raise ValueError(f"measure spans {len(res)} eps values; give eps in the view")
    return int(res["correct"].iloc[0]), int(res["n"].iloc[0])


class Results:
    """Read-only view of the store for the report (one cache of outcomes per run)."""

    def __init__(self, db: str | Path, runs_dir: str | Path) -> None:
        self.db = Path(db)
        self.runs_dir = Path(runs_dir)
        # no store yet: report the published numbers with every cell 'not run' (and create no file)
        self.store = Store(self.db if self.db.exists() else ":memory:")
        self._outcomes: dict[Any, pd.DataFrame] = {}
        self._aon: dict[tuple[Any, ...], tuple[int, int] | None] = {}

    # ------------------------------------------------------------------------------------------ runs
    @cached_property
    def runs(self) -> dict[tuple[str, str, str], RunInfo]:
        """(entry, protocol, role) -> the latest finished run."""
        done = self.store.runs(status="done")
        out: dict[tuple[str, str, str], RunInfo] = {}
        for protocol, role in sorted(set(zip(done["protocol"], done["role"]))):
            df = latest_runs(self.store, protocol, role)
            for r in df.itertuples(index=False):
                meta = dict(_loads(r.meta, {}))
                meta.update(self.store.get_meta(int(r.run_id)) or {})  # run_meta extras (AutoAttack checks, EOT)
                info = RunInfo(run_id=int(r.run_id), entry=r.entry, protocol=r.protocol,
                               seed=None if pd.isna(r.seed) else int(r.seed), finished=str(r.finished or ""),
                               checkpoint_sha256=str(r.checkpoint_sha256 or ""),
                               overrides=list(_loads(r.overrides, [])), meta=meta, role=r.role,
                               protocol_sha256=str(getattr(r, "protocol_sha256", "") or ""),
                               versions=dict(_loads(getattr(r, "versions", None), {})))
                out[(info.entry, info.protocol, info.role)] = info
        return dict(sorted(out.items()))

    def run(self, entry: str, protocol: str) -> RunInfo | None:
        """The latest finished evaluation of ``entry`` under ``protocol``."""
        return self.runs.get((entry, protocol, "target"))

    def runs_of(self, protocol_pattern: str) -> list[RunInfo]:
        """Latest finished evaluations (not source runs) of the protocols matching the pattern."""
        return [r for (e, p, role), r in sorted(self.runs.items())
                if role == "target" and fnmatch.fnmatch(p, protocol_pattern)]

    def outcomes(self, run: RunInfo) -> pd.DataFrame:
        if run.run_id not in self._outcomes:
            df = self.store.outcomes(int(run.run_id))
            self._outcomes[run.run_id] = df.sort_values(["attack", "source", "source_member", "steps", "eps", "sample", "member"]).reset_index(drop=True)
        return self._outcomes[run.run_id]

    def aon_counts(self, run: RunInfo, attacks: list[str], eps: float | None, member: int = -1,
                   steps: int | None = None) -> tuple[int, int] | None:
        """Memoized all-or-nothing (correct, n): tables, curves, flags and the leaderboard ask alike."""
        key = (run.run_id, tuple(attacks), None if eps is None else round(float(eps), 10), member, steps)
        if key not in self._aon:
            self._aon[key] = all_or_nothing_counts(self.outcomes(run), attacks, eps, member, steps)
        return self._aon[key]

    def aon_vector(self, run: RunInfo, attacks: list[str], eps: float | None, member: int = -1,
                   steps: int | None = None) -> np.ndarray | None:
        """Per sample (sorted by sample id): 1 if correct under every outcome key of ``attacks`` at ``eps``
        (the samples :meth:`aon_counts` counts); ``None`` if no outcome matches. ``attacks = ['clean']``
        gives the clean outcomes."""
        if self.aon_counts(run, attacks, eps, member, steps) is None and attacks != ["clean"]:
            return None
        sub = select_outcomes(self.outcomes(run), attacks, eps, member, steps)
        if sub.empty:
            return None
        return sub.groupby("sample")["correct"].min().sort_index().to_numpy(dtype=np.int8)

    def sample_set(self, run: RunInfo) -> dict[str, Any]:
        """The run's sample set as the engine recorded it (``sha256``, ``n``, ``selection``, ``seed``,
        ``split``, ``dataset``); empty for a run from before the record."""
        s = run.meta.get("samples")
        return dict(s) if isinstance(s, dict) else {}

    def origin(self, run: RunInfo) -> str:
        """``imported`` (a model brought in with its weights) or ``trained`` (by robbench): the store
        run's record, else the run folder's manifest; absent means trained."""
        o = run.meta.get("origin") or self.manifest(run.entry).get("origin") or "trained"
        return str(o)

    # ------------------------------------------------------------------------------------ run dirs
    def manifest(self, entry: str) -> dict[str, Any]:
        p = self.runs_dir / entry / MANIFEST
        try:
            return json.loads(p.read_text())
        except (FileNotFoundError, ValueError):
            return {}

    def resolved_entry(self, entry: str) -> dict[str, Any]:
        """The resolved zoo entry: from the run's manifest, else from zoo/ (may be empty)."""
        man = self.manifest(entry)
        for key in ("entry", "resolved", "config"):
            if isinstance(man.get(key), dict):
                return man[key]
        try:
            return load_entry(entry).resolved()
        except Exception:  # an entry no longer in zoo/ (or invalid now): the report still renders
            return {}

    def log(self, entry: str) -> list[dict[str, Any]]:
        p = self.runs_dir / entry / LOG
        if not p.exists():
            return []
        out = []
        for line in p.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a torn last line of a killed run
            if isinstance(rec, dict):
                out.append(rec)
        return out

    def param_count(self, entry: str) -> int | None:
        """Parameters the model deploys, read from model.safetensors: the header gives shapes (no tensor
        is loaded) except for pruned layers, whose ``mask`` buffers are read to count the weights kept.
        BN statistics, pruning scores and masks are not parameters."""
        p = self.runs_dir / entry / WEIGHTS
        try:
            with open(p, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(n))
        except (FileNotFoundError, ValueError, struct.error):
            return None
        shapes = {k: v.get("shape", []) for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)}
        masked = {k[:-len(".mask")] + ".weight": k for k in shapes
                  if k.endswith(".mask") and k[:-len(".mask")] + ".weight" in shapes}
        kept = _mask_nonzeros(p, list(masked.values())) if masked else {}
        total = 0
        for k, shape in shapes.items():
            name = k.rsplit(".", 1)[-1]
            if name in NOT_PARAMETERS:
                continue
            if k in masked and masked[k] in kept:
                total += kept[masked[k]]
                continue
            numel = 1
            for d in shape:
                numel *= int(d)
            total += numel
        return total
