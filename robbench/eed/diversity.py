"""Robust diversity (EED Eqs. 12-13) and RD-based team selection (§4.1, Alg. 1 step 3).

RD is the generalised diversity of Partridge & Krzanowski over per-sample attack failures (the form EED
cites, Wu et al. CVPR 2021): with S members and p_i the fraction of adversarial examples on which
*exactly i* members fail,

    p_one = sum_i (i / S) p_i              (a random member fails)
    p_two = sum_i i (i - 1) / (S (S - 1)) p_i   (two random distinct members both fail)
    RD    = 1 - p_two / p_one.

EED's "p_i = the defense failure probability of the i-th model" is a misstatement (notes §B): with
that reading p_two would not be a pair probability. RD = 1 when no example makes two members fail,
0 when every failure is shared by all; with no failure at all it is defined as 1 (nothing to share).

Failures are a bool matrix ``fail[S, N]`` (member s fails on sample n under its own PGD-20 attack):
from the results store after an evaluation of the pool (:func:`failures_from_store`) or computed in
process (:func:`robbench.eed.pool.attack_failures`).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

RD_THRESHOLD = 0.7  # EED §5.1: "the RD threshold is set to 0.7"


def robust_diversity(fail: torch.Tensor) -> float:
    """RD of the members (rows) of ``fail`` [S, N]."""
    s = fail.shape[0]
    if s < 2:
        raise ValueError("robust diversity needs at least two members")
    k = fail.to(torch.float64).sum(0)  # failures per sample
    p_one = (k / s).mean()
    p_two = (k * (k - 1) / (s * (s - 1))).mean()
    if p_one <= 0:
        return 1.0
    return float(1.0 - p_two / p_one)


def team_diversities(fail: torch.Tensor, teams: Sequence[Sequence[int]], chunk: int = 512) -> torch.Tensor:
    """RD of many teams at once (a team-indicator matrix product per chunk)."""
    n_members = fail.shape[0]
    f = fail.to(torch.float64)
    out = torch.empty(len(teams), dtype=torch.float64)
    for start in range(0, len(teams), chunk):
        block = teams[start:start + chunk]
        ind = torch.zeros(len(block), n_members, dtype=torch.float64)
        for r, t in enumerate(block):
            ind[r, list(t)] = 1.0
        size = ind.sum(1, keepdim=True)
        k = ind @ f  # [T, N] failures per sample in each team
        p_one = (k / size).mean(1)
        p_two = (k * (k - 1) / (size * (size - 1))).mean(1)
        rd = torch.where(p_one > 0, 1.0 - p_two / p_one.clamp_min(1e-300), torch.ones_like(p_one))
        out[start:start + len(block)] = rd
    return out


def all_teams(n: int, min_size: int = 2) -> list[tuple[int, ...]]:
    """Every team of at least ``min_size`` members: 2^n - n - 1 for min_size 2 (EED §4.1: 4083 for 12)."""
    return [t for k in range(min_size, n + 1) for t in itertools.combinations(range(n), k)]


@dataclass
class Selection:
    members: list[str]
    team: tuple[int, ...]
    rd: float
    threshold: float
    threshold_met: bool
    robust_acc: float                    # mean robust accuracy of the team's members
    member_robust_acc: dict[str, float]
    teams: list[dict[str, Any]] = field(default_factory=list)  # every team: members, size, rd, robust_acc

    def as_record(self) -> dict[str, Any]:
        return {"members": self.members, "team": list(self.team), "rd": self.rd, "threshold": self.threshold,
                "threshold_met": self.threshold_met, "robust_acc": self.robust_acc,
                "member_robust_acc": self.member_robust_acc, "teams": self.teams}


def select_team(fail: torch.Tensor, names: Sequence[str], threshold: float = RD_THRESHOLD,
                order: str = "robust_acc") -> Selection:
    """The smallest team with RD >= ``threshold`` ("form the smallest ensemble ... with the high RD
    scores", §4.1); among teams of that size the highest mean member robust accuracy, then the higher RD.
    If no team reaches the threshold, the team with the highest RD (``threshold_met`` false).
    The chosen members are listed strongest first (``order = 'robust_acc'``), the order DIE adds them."""
    if fail.shape[0] != len(names):
        raise ValueError(f"{fail.shape[0]} failure rows for {len(names)} names")
    acc = 1.0 - fail.to(torch.float64).mean(1)  # per-member robust accuracy
    teams = all_teams(len(names))
    rds = team_diversities(fail, teams)
    team_acc = torch.tensor([float(acc[list(t)].mean()) for t in teams], dtype=torch.float64)
    ok = [i for i in range(len(teams)) if rds[i] >= threshold]
    if ok:
        smallest = min(len(teams[i]) for i in ok)
        cands = [i for i in ok if len(teams[i]) == smallest]
        best = max(cands, key=lambda i: (float(team_acc[i]), float(rds[i])))
    else:
        best = int(torch.argmax(rds))
    team = teams[best]
    if order == "robust_acc":
        team = tuple(sorted(team, key=lambda i: (-float(acc[i]), i)))
    return Selection(
        members=[names[i] for i in team], team=team, rd=float(rds[best]), threshold=threshold,
        threshold_met=bool(ok), robust_acc=float(team_acc[best]),
        member_robust_acc={n: float(a) for n, a in zip(names, acc)},
        teams=[{"members": [names[i] for i in t], "size": len(t), "rd": float(r), "robust_acc": float(a)}
               for t, r, a in zip(teams, rds, team_acc)])


def failures_from_store(db: Any, entries: Sequence[str], attack: str = "pgd20", eps: float | None = None,
                        protocol: str | None = None) -> torch.Tensor:
    """``fail[S, N]`` from the results store: each entry's latest done run's whole-model outcomes under
    ``attack`` (member -1), samples aligned by index (every entry must cover the same samples)."""
    from robbench.store import Store

    store = db if hasattr(db, "outcomes") else Store(db)
    rows = []
    samples_ref: list[int] | None = None
    missing = [name for name in entries if store.outcomes(entry=name, attack=attack, member=-1, status="done",
                                                          **({"protocol": protocol} if protocol else {})).empty]
    if missing:
        raise LookupError(f"no {attack!r} outcomes in the results store for {', '.join(missing)}")
    for name in entries:
        filters: dict[str, Any] = {"entry": name, "attack": attack, "member": -1, "status": "done"}
        if protocol is not None:
            filters["protocol"] = protocol
        df = store.outcomes(**filters)
        if eps is not None:
            df = df[(df["eps"] - eps).abs() < 1e-9]
        if df.empty:
            raise LookupError(f"no {attack!r} outcomes for {name!r} in the results store; evaluate the pool first")
        df = df[df["run_id"] == df["run_id"].max()].sort_values("sample")
        samples = df["sample"].tolist()
        if samples_ref is None:
            samples_ref = samples
        elif samples != samples_ref:
            raise LookupError(f"{name!r} was evaluated on other samples than {entries[0]!r}")
        rows.append(torch.tensor((1 - df["correct"].to_numpy()).astype(bool)))
    return torch.stack(rows)
