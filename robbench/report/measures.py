"""Cells: one number of a report table computed from a run's per-sample outcomes, with its sample count,
attack seed and 95% Wilson interval; a row of several independent runs (seeds) as their mean +- std with
a 95% bootstrap interval over seeds and samples."""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from robbench.outcomes import CLEAN_ATTACK, FINAL
from robbench.report.results import Results, RunInfo, all_or_nothing_counts, select_outcomes
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
    vector: tuple[int, ...] = field(default=(), repr=False, compare=False)  # per sample, 1 = correct

    @property
    def acc(self) -> float:
        return self.k / self.n if self.n else float("nan")


@dataclass(frozen=True)
class ValueCell:
    """A number the evaluation run recorded in its meta (a ``meta`` measure), already scaled, in ``unit``."""
    value: float
    unit: str
    run: RunInfo


@dataclass(frozen=True)
class MeanCell:
    """The mean of a per-sample value (a ``mean`` measure: e.g. a distillation distance), over ``n``
    samples (a sample's value: the mean of its rows, one per member or member pair), with a 95% normal
    interval of the mean (1.96 standard errors over the samples)."""
    value: float
    lo: float
    hi: float
    n: int
    run: RunInfo
    unit: str = ""


BOOTSTRAP_REPS = 2000
BOOTSTRAP_SEED = 0  # fixed: the same store gives the same interval (and the same bytes)


@dataclass(frozen=True)
class SeedCell:
    """One row's cell over its independent runs (seeds): the mean and sample std of the runs'
    accuracies, each run's own Wilson interval, and a 95% bootstrap interval of the mean that resamples
    runs, then samples within each run."""
    cells: tuple[Cell, ...]
    missing: int  # runs of the row not evaluated yet

    @property
    def acc(self) -> float:
        return float(np.mean([c.acc for c in self.cells]))

    @property
    def std(self) -> float:
        return float(np.std([c.acc for c in self.cells], ddof=1)) if len(self.cells) > 1 else float("nan")

    @property
    def interval(self) -> tuple[float, float]:
        return bootstrap_interval([np.asarray(c.vector) for c in self.cells])


def bootstrap_interval(vectors: list[np.ndarray], reps: int = BOOTSTRAP_REPS,
                       seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """95% percentile interval of the mean accuracy over runs: each replicate draws runs with
    replacement, then each drawn run's samples with replacement. One run: samples only."""
    vectors = [v for v in vectors if len(v)]
    if not vectors:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    k = len(vectors)
    n = np.array([len(v) for v in vectors])
    p = np.array([float(v.mean()) for v in vectors])
    picks = rng.integers(0, k, size=(reps, k)) if k > 1 else np.zeros((reps, 1), dtype=int)
    # resampling a run's n 0/1 outcomes with replacement gives Binomial(n, p) correct ones: drawn directly
    means = (rng.binomial(n[picks], p[picks]) / n[picks]).mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


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


def meta_value(meta: dict[str, Any], key: str) -> float | None:
    """The number at dotted path ``key`` of a run's meta; ``None`` when absent or not a number."""
    v: Any = meta
    for part in key.split("."):
        if not isinstance(v, dict) or part not in v:
            return None
        v = v[part]
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def mean_cell(df: pd.DataFrame, m: Measure, run: RunInfo) -> MeanCell | None:
    """The mean value of the outcome rows of the measure's attacks at its eps (final values only)."""
    attacks = select_attacks(df["attack"].unique().tolist(), m.attacks)
    sub = select_outcomes(df, attacks, None if m.eps is None else float(m.eps),
                          None if m.member < 0 else m.member, FINAL)
    sub = sub[sub["margin"].notna()]
    if sub.empty:
        return None
    per_sample = sub.groupby("sample")["margin"].mean().to_numpy(dtype=float)
    mean, n = float(per_sample.mean()), len(per_sample)
    half = 1.959963984540054 * float(per_sample.std(ddof=1)) / np.sqrt(n) if n > 1 else float("nan")
    return MeanCell(value=mean, lo=mean - half, hi=mean + half, n=n, run=run, unit=m.unit)


def compute(results: Results, entry: str, m: Measure) -> Cell | ValueCell | MeanCell | None:
    """The cell of ``entry`` under measure ``m``; ``None`` when not run (or not measurable)."""
    if m.kind == "none" or not entry:
        return None
    run = results.run(entry, m.protocol)
    if run is None:
        return None
    if m.kind == "meta":
        v = meta_value(run.meta, m.key)
        return None if v is None else ValueCell(value=v * m.scale, unit=m.unit, run=run)
    df = results.outcomes(run)
    if m.kind == "mean":
        return mean_cell(df, m, run)
    if m.kind == "clean":
        kn = clean_counts(df, m.member)
        attacks = [CLEAN_ATTACK]
    else:
        attacks = select_attacks(df["attack"].unique().tolist(), m.attacks)
        kn = results.aon_counts(run, attacks, m.eps, m.member, m.steps) if attacks else None
    if kn is None or kn[1] == 0:
        return None
    lo, hi = wilson(*kn)
    vec = results.aon_vector(run, attacks, None if m.kind == "clean" else m.eps, m.member,
                             None if m.kind == "clean" else m.steps)
    return Cell(k=kn[0], n=kn[1], lo=lo, hi=hi, run=run, vector=tuple(int(x) for x in (vec if vec is not None else ())))


def compute_seeds(results: Results, entries: list[str], m: Measure) -> SeedCell | None:
    """The cell of a row with several runs; ``None`` when none of them was run."""
    cells = [compute(results, e, m) for e in entries]
    done = tuple(c for c in cells if isinstance(c, Cell))
    return SeedCell(done, len(cells) - len(done)) if done else None


def eps_values(df: pd.DataFrame) -> list[float]:
    e = df.loc[df["attack"] != CLEAN_ATTACK, "eps"].astype(float)
    return sorted({round(v, 10) for v in e})
