"""Cells: one number of a report table computed from a run's per-sample outcomes, with its sample count,
attack seed and 95% Wilson interval."""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import pandas as pd

from robbench.outcomes import CLEAN_ATTACK
from robbench.report.results import Results, RunInfo, all_or_nothing_counts
from robbench.report.views import Measure
from robbench.store import wilson_interval


@dataclass(frozen=True)
class Cell:
    """k of n samples correct. ``None`` fields: the cell was not run."""
    k: int
    n: int
    lo: float
    hi: float
    run: RunInfo

    @property
    def acc(self) -> float:
        return self.k / self.n if self.n else float("nan")


def wilson(k: int, n: int) -> tuple[float, float]:
    lo, hi = wilson_interval(k, n)
    return float(lo), float(hi)


def select_attacks(attacks: list[str], patterns: list[str]) -> list[str]:
    """Stored attack ids (never 'clean') matching any fnmatch pattern."""
    return [a for a in sorted(set(attacks)) if a != CLEAN_ATTACK and any(fnmatch.fnmatchcase(a, p) for p in patterns)]


def clean_counts(df: pd.DataFrame, member: int = -1) -> tuple[int, int] | None:
    sub = df[(df["attack"] == CLEAN_ATTACK) & (df["member"] == member)]
    if sub.empty:
        return None
    return int(sub["correct"].sum()), int(sub["sample"].nunique())


def compute(results: Results, entry: str, m: Measure) -> Cell | None:
    """The cell of ``entry`` under measure ``m``; ``None`` when not run (or not measurable)."""
    if m.kind == "none" or not entry:
        return None
    run = results.run(entry, m.protocol)
    if run is None:
        return None
    df = results.outcomes(run)
    if m.kind == "clean":
        kn = clean_counts(df, m.member)
    else:
        attacks = select_attacks(df["attack"].unique().tolist(), m.attacks)
        kn = results.aon_counts(run, attacks, m.eps, m.member, m.steps) if attacks else None
    if kn is None or kn[1] == 0:
        return None
    lo, hi = wilson(*kn)
    return Cell(k=kn[0], n=kn[1], lo=lo, hi=hi, run=run)


def eps_values(df: pd.DataFrame) -> list[float]:
    e = df.loc[df["attack"] != CLEAN_ATTACK, "eps"].astype(float)
    return sorted({round(v, 10) for v in e})
