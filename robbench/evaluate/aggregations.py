"""Aggregation rules named by protocols (``aggregation = "..."``), registered in ``AGGREGATIONS``.

An aggregation maps a run's outcome rows (``Store.outcomes``) and the protocol's and-groups (attack id ->
group; attacks in one group are AND-ed) to a table with columns ``attack, eps, member, n, correct,
accuracy, ci_low, ci_high``. The arithmetic lives in the store's query helpers; this module only decides
which attacks are AND-ed together.
"""
from __future__ import annotations

from typing import Mapping

import pandas as pd

from robbench.registry import AGGREGATIONS
from robbench.store import all_or_nothing as _aon
from robbench.store import per_attack_accuracy

COLUMNS = ["attack", "eps", "member", "n", "correct", "accuracy", "ci_low", "ci_high"]


def _clean(df: pd.DataFrame) -> pd.DataFrame:
    return per_attack_accuracy(df[df["attack"] == "clean"].drop(columns=["run_id"], errors="ignore"))


def _finish(parts: list[pd.DataFrame]) -> pd.DataFrame:
    parts = [p for p in parts if len(p)]
    if not parts:
        return pd.DataFrame(columns=COLUMNS)
    out = pd.concat(parts, ignore_index=True)[COLUMNS]
    return out.sort_values(["attack", "member", "eps"], kind="stable").reset_index(drop=True)


def groups_of(attacks: list[str], and_groups: Mapping[str, str] | None) -> dict[str, list[str]]:
    """Group name -> attack ids (an attack without a group is its own group), in first-seen order."""
    out: dict[str, list[str]] = {}
    for a in attacks:
        g = (and_groups or {}).get(a, a)
        out.setdefault(g, []).append(a)
    return out


@AGGREGATIONS.register("all_or_nothing")
def all_or_nothing(df: pd.DataFrame, and_groups: Mapping[str, str] | None = None) -> pd.DataFrame:
    """A sample counts as correct at an eps only if it is correct under every attack at that eps
    (DVERGE eval_wbox.py / eval_bbox.py "all"). Clean accuracy is reported beside it, not AND-ed in."""
    d = df.drop(columns=["run_id"], errors="ignore")
    adv = d[d["attack"] != "clean"]
    parts = [_clean(d)]
    if len(adv):
        a = _aon(adv, attacks=None, members=sorted(adv["member"].unique()))
        a.insert(0, "attack", "all")
        parts.append(a)
    return _finish(parts)


@AGGREGATIONS.register("per_attack")
def per_attack(df: pd.DataFrame, and_groups: Mapping[str, str] | None = None) -> pd.DataFrame:
    """One accuracy per attack, or per and-group (e.g. DVERGE's 3 M-PGD restarts AND-ed into one source;
    Table 8's 30-set suite per step count), each all-or-nothing within the group."""
    d = df.drop(columns=["run_id"], errors="ignore")
    adv = d[d["attack"] != "clean"]
    parts = [_clean(d)]
    for group, attacks in groups_of(list(dict.fromkeys(adv["attack"])), and_groups).items():
        sub = adv[adv["attack"].isin(attacks)]
        for eps, sub_e in sub.groupby("eps"):
            present = sorted(sub_e["attack"].unique())
            a = _aon(sub_e, attacks=present, members=sorted(sub_e["member"].unique()))
            a.insert(0, "attack", group)
            parts.append(a)
    return _finish(parts)


def aggregate(name: str, df: pd.DataFrame, and_groups: Mapping[str, str] | None = None) -> pd.DataFrame:
    return AGGREGATIONS.get(name)(df, and_groups)
