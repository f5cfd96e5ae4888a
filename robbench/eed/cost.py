"""What a pruned model or an EED team costs per sample, measured from its masks and, for DIE, from the
members it actually evaluated (EED Table 1's "Speed up" and "Params", §4.4).

- A single network: multiply-accumulates per sample and kept parameters from its masks
  (:func:`robbench.pruning.footprint`).
- A team: member t runs on the samples still undecided after t members, so its MACs per sample are
  sum_t MACs_t * P(members used > t); with the full mean every member runs on every sample.
- Speed-up against a dense model = dense MACs / MACs per sample (the FLOP speed-up); the wall-time
  speed-up is measured by ``benchmarks/eed_speed.py`` beside it.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from robbench.models.eed_team import find_team
from robbench.pruning.measure import footprint


def network_cost(net: nn.Module, input_shape: tuple[int, ...]) -> dict[str, Any]:
    """MACs per sample and kept parameters of one network (``model.members[0]`` of an entry)."""
    fp = footprint(net, input_shape)
    return {"macs_per_sample": float(fp.macs_kept), "macs_dense": fp.macs_dense, "params_kept": fp.params_kept,
            "params_total": fp.params_total, "sparsity": fp.sparsity}


@torch.no_grad()
def members_used(model: nn.Module, x: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Members each sample's prediction evaluated (DIE: its prefix length; full mean: the team size)."""
    team = find_team(model)
    model.eval()
    device = next(model.parameters()).device
    used = []
    for i in range(0, len(x), batch_size):
        model(x[i:i + batch_size].to(device))
        assert team.last_members_used is not None
        used.append(team.last_members_used.cpu())
    return torch.cat(used)


def team_cost(model: nn.Module, x: torch.Tensor, input_shape: tuple[int, ...]) -> dict[str, Any]:
    """Members and MACs per sample of an ``eed_team`` model on inputs ``x`` (e.g. the clean test set),
    and the team's kept parameters (every member is deployed)."""
    team = find_team(model)
    costs = [network_cost(net, input_shape) for net in team.nets]
    used = members_used(model, x)
    frac = [float((used > t).to(torch.float64).mean()) for t in range(len(team.nets))]
    return {
        "size": len(team.nets),
        "inference": team.inference,
        "members_per_sample": float(used.to(torch.float64).mean()),
        "members_histogram": [int((used == t + 1).sum()) for t in range(len(team.nets))],
        "member_fraction_run": frac,
        "macs_per_sample": sum(c["macs_per_sample"] * f for c, f in zip(costs, frac)),
        "params_kept": sum(c["params_kept"] for c in costs),
        "member_costs": costs,
        "samples": len(used),
    }


def speedup(dense_macs: float, macs: float) -> float:
    return dense_macs / macs if macs > 0 else float("inf")


@torch.no_grad()
def die_sweep(model: nn.Module, x: torch.Tensor, y: torch.Tensor, taus: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9)
              ) -> list[dict[str, float]]:
    """DIE's members per sample and clean accuracy at several confidence thresholds (a measurement
    beside the entry's own tau_conf; the model's options are restored after)."""
    team = find_team(model)
    saved = team.options.tau_conf
    device = next(model.parameters()).device
    out = []
    try:
        for tau in taus:
            team.options.tau_conf = tau
            used = members_used(model, x)
            pred = torch.cat([model(x[i:i + 500].to(device)).argmax(1).cpu() for i in range(0, len(x), 500)])
            out.append({"tau_conf": tau, "members_per_sample": float(used.to(torch.float64).mean()),
                        "clean_acc": float((pred == y).to(torch.float64).mean())})
    finally:
        team.options.tau_conf = saved
    return out
