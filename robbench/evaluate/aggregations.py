"""Aggregation rules named by protocols (``aggregation = "..."``), registered in ``AGGREGATIONS``.

An aggregation maps a run's outcome rows (``Store.outcomes``) and the protocol's and-groups (outcome
key -> group; keys in one group are AND-ed) to a table with columns ``attack, eps, member, n, correct,
accuracy, ci_low, ci_high`` (``attack``: the group's or the key's label). The arithmetic lives in the
store's query helpers; this module only decides which outcome keys are AND-ed together.
"""
from __future__ import annotations

from typing import Mapping

import pandas as pd

from robbench.outcomes import CLEAN_ATTACK, OutcomeKey
from robbench.registry import AGGREGATIONS
from robbench.store import all_or_nothing as _aon
from robbench.store import outcome_keys, per_attack_accuracy, rows_of

COLUMNS = ["attack", "eps", "member", "n", "correct", "accuracy", "ci_low", "ci_high"]
Groups = Mapping["OutcomeKey | str", str]


def _clean(df: pd.DataFrame) -> pd.DataFrame:
    out = per_attack_accuracy(df[df["attack"] == CLEAN_ATTACK].drop(columns=["run_id"], errors="ignore"))
    return out.assign(attack=CLEAN_ATTACK)


def _finish(parts: list[pd.DataFrame]) -> pd.DataFrame:
    parts = [p for p in parts if len(p)]
    if not parts:
        return pd.DataFrame(columns=COLUMNS)
    out = pd.concat(parts, ignore_index=True)[COLUMNS]
    return out.sort_values(["attack", "member", "eps"], kind="stable").reset_index(drop=True)


def groups_of(keys: list[OutcomeKey], and_groups: Groups | None) -> dict[str, list[OutcomeKey]]:
    """Group name -> outcome keys (a key without a group is its own group, under its label), in
    first-seen order. Group keys may be plain attack ids (the final result of that attack)."""
    named = {OutcomeKey.of(k): g for k, g in (and_groups or {}).items()}
    out: dict[str, list[OutcomeKey]] = {}
    for k in keys:
        out.setdefault(named.get(k, k.label()), []).append(k)
    return out


@AGGREGATIONS.register("all_or_nothing")
def all_or_nothing(df: pd.DataFrame, and_groups: Groups | None = None) -> pd.DataFrame:
    """A sample counts as correct at an eps only if it is correct under every attack at that eps
    (DVERGE eval_wbox.py / eval_bbox.py "all"). Clean accuracy is reported beside it, not AND-ed in."""
    d = df.drop(columns=["run_id"], errors="ignore")
    adv = d[d["attack"] != CLEAN_ATTACK]
    parts = [_clean(d)]
    if len(adv):
        a = _aon(adv, attacks=None, members=sorted(adv["member"].unique()))
        a.insert(0, "attack", "all")
        parts.append(a)
    return _finish(parts)


@AGGREGATIONS.register("per_attack")
def per_attack(df: pd.DataFrame, and_groups: Groups | None = None) -> pd.DataFrame:
    """One accuracy per outcome key, or per and-group (e.g. DVERGE's 3 M-PGD restarts AND-ed into one
    source; Table 8's 30-set suite per step count), each all-or-nothing within the group."""
    d = df.drop(columns=["run_id"], errors="ignore")
    adv = d[d["attack"] != CLEAN_ATTACK]
    parts = [_clean(d)]
    for group, keys in groups_of(outcome_keys(adv), and_groups).items():
        sub = adv[rows_of(adv, keys)]
        for _eps, sub_e in sub.groupby("eps"):
            a = _aon(sub_e, attacks=None, members=sorted(sub_e["member"].unique()))
            a.insert(0, "attack", group)
            parts.append(a)
    return _finish(parts)


def aggregate(name: str, df: pd.DataFrame, and_groups: Groups | None = None) -> pd.DataFrame:
    return AGGREGATIONS.get(name)(df, and_groups)


def groups_from_record(record: list[dict[str, object]] | None) -> dict[OutcomeKey, str]:
    """The run meta's ``and_groups`` record back as keys -> group names."""
    out: dict[OutcomeKey, str] = {}
    for r in record or []:
        if isinstance(r, dict):
            d = dict(r)
            g = str(d.pop("group"))
            out[OutcomeKey(**d)] = g  # type: ignore[arg-type]
    return out
