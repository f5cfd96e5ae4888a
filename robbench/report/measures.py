"""Cells: one number of a report table computed from a run's per-sample outcomes, with its sample count,
attack seed and 95% Wilson interval."""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass

import numpy as np
import pandas as pd

from robbench.report.results import Results, RunInfo
from robbench.report.views import Measure

EPS_TOL = 1e-9


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
    from robbench.store import wilson_interval

    lo, hi = wilson_interval(k, n)
    return float(lo), float(hi)


def base_id(attack: str) -> str:
    return attack.split("@", 1)[0]


_PARAM = re.compile(r"([A-Za-z_]+)=([^@|,]+)")


def attack_params(attack: str) -> dict[str, str]:
    """``'pgd@source_member=2'`` -> ``{'source_member': '2'}`` (the engine's id suffixes)."""
    if "@" not in attack:
        return {}
    return dict(_PARAM.findall(attack.split("@", 1)[1]))


def select_attacks(attacks: list[str], patterns: list[str]) -> list[str]:
    """Stored attack ids (never 'clean') matching any pattern; a pattern without '@' also matches ids
    with a suffix (``pgd`` matches ``pgd@steps=50``)."""
    out = []
    for a in sorted(set(attacks)):
        if a == "clean":
            continue
        if any(fnmatch.fnmatchcase(a, p) or ("@" not in p and fnmatch.fnmatchcase(base_id(a), p))
               for p in patterns):
            out.append(a)
    return out


def all_or_nothing_counts(df: pd.DataFrame, attacks: list[str], eps: float | None, member: int = -1
                          ) -> tuple[int, int] | None:
    """(correct under every listed attack, samples) at ``eps``; ``None`` if no outcome matches.
    Callers with a run use :meth:`Results.aon_counts`, which memoizes this."""
    from robbench.store import all_or_nothing

    sub = df[(df["member"] == member) & df["attack"].isin(attacks)]
    if eps is not None:
        sub = sub[np.isclose(sub["eps"].astype(float), eps, rtol=0, atol=EPS_TOL)]
    if sub.empty:
        return None
    present = sorted(set(sub["attack"]))
    res = all_or_nothing(sub, attacks=present, members=[member])
    if res.empty:
        return None
    if len(res) != 1:  # several eps matched (eps=None over a multi-eps run): not one cell
        raise ValueError(f"measure spans {len(res)} eps values; give eps in the view")
    return int(res["correct"].iloc[0]), int(res["n"].iloc[0])


def clean_counts(df: pd.DataFrame, member: int = -1) -> tuple[int, int] | None:
    sub = df[(df["attack"] == "clean") & (df["member"] == member)]
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
        kn = results.aon_counts(run, attacks, m.eps, m.member) if attacks else None
    if kn is None or kn[1] == 0:
        return None
    lo, hi = wilson(*kn)
    return Cell(k=kn[0], n=kn[1], lo=lo, hi=hi, run=run)


def eps_values(df: pd.DataFrame) -> list[float]:
    e = df.loc[df["attack"] != "clean", "eps"].astype(float)
    return sorted({round(v, 10) for v in e})
