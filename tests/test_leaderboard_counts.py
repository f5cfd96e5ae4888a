"""The leaderboard's `params` and `fwd passes` columns for pruned models and dynamic-inference teams:
kept weights counted from the masks (as EED's Params column), members per sample as measured."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from robbench.checkpoint import WEIGHTS
from robbench.pruning import masked
from robbench.pruning.measure import footprint
from robbench.report.leaderboard import _fwd, forward_passes
from robbench.report.results import Results, RunInfo


def _run(entry: str, protocol: str, meta: dict, run_id: int = 1) -> RunInfo:
    return RunInfo(run_id=run_id, entry=entry, protocol=protocol, seed=0, finished="2026-12-02", checkpoint_sha256="x",
                   overrides=[], meta=meta)


def _results(tmp_path: Path, runs: list[RunInfo]) -> Results:
    res = Results(tmp_path / "none.db", tmp_path / "runs")
    res.__dict__["runs"] = {(r.entry, r.protocol, r.role): r for r in runs}  # the cached property, filled by hand
    return res


def test_param_count_of_a_pruned_network_counts_only_kept_weights(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 10))
    masked(net, {"sparsity": 0.7, "learn_rates": True})
    for m in net.modules():
        if hasattr(m, "refresh_mask"):
            m.refresh_mask()
    fp = footprint(net, (3, 6, 6))
    assert fp.params_kept < fp.params_total  # the masks prune something, so the two counts can differ
    (tmp_path / "runs" / "pruned").mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "runs" / "pruned" / WEIGHTS))
    res = _results(tmp_path, [])
    assert res.param_count("pruned") == fp.params_kept
    # a dense network of the same shapes: every weight counts, BN statistics do not
    dense = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 10))
    (tmp_path / "runs" / "dense").mkdir()
    save_file(dense.state_dict(), str(tmp_path / "runs" / "dense" / WEIGHTS))
    assert res.param_count("dense") == sum(p.numel() for p in dense.parameters()) == fp.params_total


def test_forward_passes_of_a_dynamic_team_is_the_measured_members_per_sample(tmp_path: Path) -> None:
    team_cfg = {"model": {"arch": "eed_team", "members": 1, "options": {"size": 3, "inference": "die"}}}
    measured = _run("team", "demo-eed", {"eed_cost": {"members_per_sample": 1.89, "size": 3}}, 1)
    other = _run("team", "demo-whitebox", {}, 2)
    plain = _run("plain_team", "demo-whitebox", {}, 3)
    res = _results(tmp_path, [measured, other, plain])
    assert forward_passes(res, measured, team_cfg, None) == 1.89
    # another protocol's run of the same entry reads the same clean-set measurement
    assert forward_passes(res, other, team_cfg, None) == 1.89
    # no measurement: the team's size, not the one network that holds the members
    assert forward_passes(res, plain, team_cfg, None) == 3
    assert forward_passes(res, plain, team_cfg, 0) == 1  # one picked member
    assert _fwd(1.89) == "1.89" and _fwd(3) == "3" and _fwd(None) == "?"
