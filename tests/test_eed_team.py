"""EED robust diversity, team enumeration and selection, data subsets, the team network and DIE."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from robbench.eed.diversity import all_teams, robust_diversity, select_team, team_diversities
from robbench.eed.subsets import eed_subset
from robbench.models.eed_team import TeamNet, TeamOptions


def test_rd_hand_values():
    # two members never failing together: p_two = 0 -> RD = 1
    assert robust_diversity(torch.tensor([[1, 0, 0, 1], [0, 1, 0, 0]], dtype=torch.bool)) == 1.0
    # identical failures: every failure shared -> RD = 0
    f = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0]], dtype=torch.bool)
    assert robust_diversity(f) == pytest.approx(0.0)
    # 3 members, samples with 0, 1, 2, 3 failures: p_i = 1/4 each
    f = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1], [0, 0, 0, 1]], dtype=torch.bool)
    p_one = (1 / 3 + 2 / 3 + 1) / 4
    p_two = (0 + 2 / 6 + 1) / 4
    assert robust_diversity(f) == pytest.approx(1 - p_two / p_one)


def test_batched_rd_equals_the_single_formula():
    g = torch.Generator().manual_seed(0)
    fail = torch.rand(6, 200, generator=g) < 0.4
    teams = all_teams(6)
    rds = team_diversities(fail, teams, chunk=7)
    for t, r in zip(teams, rds):
        assert r.item() == pytest.approx(robust_diversity(fail[list(t)]), abs=1e-12)


def test_team_count_is_2n_minus_n_minus_1():
    assert len(all_teams(12)) == 2**12 - 12 - 1 == 4083  # EED §4.1


def test_selection_takes_the_smallest_team_over_the_threshold():
    # a and b fail on disjoint halves (RD 1); c fails wherever a does (RD(a, c) = low)
    n = 100
    a = torch.arange(n) < 50
    b = torch.arange(n) >= 50
    c = a.clone()
    c[:10] = False  # c slightly more robust than a
    d = torch.ones(n, dtype=torch.bool)  # fails everything
    fail = torch.stack([a, b, c, d])
    sel = select_team(fail, ["a", "b", "c", "d"], threshold=0.7)
    assert sel.threshold_met and len(sel.members) == 2 and set(sel.members) in ({"a", "b"}, {"b", "c"})
    assert set(sel.members) == {"b", "c"}  # ties in size broken by the members' robust accuracy
    assert len(sel.teams) == 11 and all("rd" in t for t in sel.teams)
    assert sel.members[0] == "c"  # strongest member first (DIE order)
    none = select_team(torch.stack([d, d, d]), ["x", "y", "z"], threshold=0.7)
    assert not none.threshold_met


def test_eed_subsets_share_one_quarter_and_reshuffle_per_score():
    n = 1000
    subs = [set(eed_subset(n, m, key="nis")) for m in range(3)]
    assert all(len(s) == 500 for s in subs)
    shared = subs[0] & subs[1] & subs[2]
    assert len(shared) == 250 and all(len(s - shared) == 250 for s in subs)
    assert len(subs[0] | subs[1] | subs[2]) == n  # 25% shared + 3 x 25% private cover the set
    other = set(eed_subset(n, 0, key="erm"))
    assert other != subs[0]
    assert eed_subset(n, 1, key="nis") == eed_subset(n, 1, key="nis")


class Const(nn.Module):
    """Logits = a fixed row per sample index, plus the input sum so gradients exist."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += x.shape[0]
        idx = x[:, 0].round().long()
        return self.logits[idx] + 0.0 * x.sum(1, keepdim=True) + x[:, 1:2]


def _team(rows: list[torch.Tensor], **kw) -> TeamNet:
    return TeamNet([Const(r) for r in rows], TeamOptions(size=len(rows), **kw))


def test_die_stops_per_sample_and_uses_the_prefix_mean():
    confident = torch.tensor([[8.0, 0.0], [0.5, 0.0]])   # sample 0 confident, sample 1 not
    second = torch.tensor([[8.0, 0.0], [0.0, 3.0]])
    third = torch.tensor([[0.0, 8.0], [0.0, 3.0]])
    x = torch.stack([torch.tensor([0.0, 0.0]), torch.tensor([1.0, 0.0])])
    team = _team([confident, second, third], inference="die", tau_conf=0.9, tau_kl=10.0)
    out = team(x)
    used = team.last_members_used.tolist()
    assert used[0] == 1  # member 1 alone is confident
    p = [torch.softmax(r[1], 0) for r in (confident, second, third)]
    assert used[1] == 3  # running means 0.62 then 0.67 stay below tau_conf: the last member decides
    want = torch.stack(p[:used[1]]).mean(0)
    assert torch.allclose(out[1].exp(), want, atol=1e-6)
    assert torch.allclose(out[0].exp(), torch.softmax(confident[0], 0), atol=1e-6)
    # sample 0 never ran through members 2 and 3: DIE evaluates fewer members
    assert [n.calls for n in team.nets] == [2, 1, 1]
    full = _team([confident, second, third], inference="mean")(x)
    assert torch.allclose(full.exp(), torch.stack([torch.softmax(r[x[:, 0].long()], 1) for r in
                                                   (confident, second, third)]).mean(0), atol=1e-6)


def test_die_thresholds_at_the_extremes_and_gradients_follow_the_prefix():
    rows = [torch.randn(4, 3) for _ in range(3)]
    x = torch.stack([torch.tensor([float(i), 0.1]) for i in range(4)]).requires_grad_(True)
    t = _team(rows, inference="die", tau_conf=0.0, tau_kl=1e9)
    t(x)
    assert t.last_members_used.tolist() == [1, 1, 1, 1]
    t = _team(rows, inference="die", tau_conf=1.01)
    out = t(x)
    assert t.last_members_used.tolist() == [3, 3, 3, 3]
    assert torch.allclose(out, _team(rows, inference="mean")(x), atol=1e-6)
    out.sum().backward()
    assert x.grad is not None and x.grad[:, 1].abs().sum() > 0


def test_max_combiner_is_the_renormalised_per_class_max_by_hand():
    # one sample, two members, 3 classes; probabilities chosen by hand through their logs
    pa = torch.tensor([0.7, 0.2, 0.1])
    pb = torch.tensor([0.1, 0.3, 0.6])
    x = torch.zeros(1, 2)
    rows = [pa.log().unsqueeze(0), pb.log().unsqueeze(0)]
    out = _team(rows, inference="mean", combiner="max")(x).exp()[0]
    # per-class max = (0.7, 0.3, 0.6), sum 1.6
    assert torch.allclose(out, torch.tensor([0.7 / 1.6, 0.3 / 1.6, 0.6 / 1.6]), atol=1e-6)
    mean = _team(rows, inference="mean")(x).exp()[0]
    assert torch.allclose(mean, torch.tensor([0.4, 0.25, 0.35]), atol=1e-6)
    assert out.argmax() == 0 and mean.argmax() == 0
    # logits reading: per-class max of the logits (log-probabilities here), then softmax = the same as
    # the probability reading for log-probability rows; other logits differ from it
    lg = _team(rows, inference="mean", combiner="max", max_of="logits")(x).exp()[0]
    assert torch.allclose(lg, out, atol=1e-6)
    za, zb = torch.tensor([[2.0, 0.0, 1.0]]), torch.tensor([[0.0, 3.0, -1.0]])
    lg = _team([za, zb], inference="mean", combiner="max", max_of="logits")(x).exp()[0]
    assert torch.allclose(lg, torch.softmax(torch.tensor([2.0, 3.0, 1.0]), 0), atol=1e-6)
    pr = _team([za, zb], inference="mean", combiner="max")(x).exp()[0]
    m = torch.maximum(torch.softmax(za[0], 0), torch.softmax(zb[0], 0))
    assert torch.allclose(pr, m / m.sum(), atol=1e-6) and not torch.allclose(pr, lg, atol=1e-3)


def test_die_with_the_max_combiner_stops_on_the_running_max():
    confident = torch.tensor([[8.0, 0.0], [0.5, 0.0]])
    second = torch.tensor([[8.0, 0.0], [0.0, 3.0]])
    x = torch.stack([torch.tensor([0.0, 0.0]), torch.tensor([1.0, 0.0])])
    team = _team([confident, second], inference="die", combiner="max", tau_conf=0.9, tau_kl=10.0)
    out = team(x)
    assert team.last_members_used.tolist() == [1, 2]
    assert torch.allclose(out[0].exp(), torch.softmax(confident[0], 0), atol=1e-6)
    m = torch.maximum(torch.softmax(confident[1], 0), torch.softmax(second[1], 0))
    assert torch.allclose(out[1].exp(), m / m.sum(), atol=1e-6)
    # never stopping early = the full max team
    rows = [torch.randn(4, 3) for _ in range(3)]
    xs = torch.stack([torch.tensor([float(i), 0.1]) for i in range(4)])
    for of in ("probs", "logits"):
        die = _team(rows, inference="die", combiner="max", max_of=of, tau_conf=1.01)(xs)
        full = _team(rows, inference="mean", combiner="max", max_of=of)(xs)
        assert torch.allclose(die, full, atol=1e-6)


@pytest.mark.parametrize("inference", ["mean", "die"])
def test_attacks_run_through_the_max_combiner(inference):
    from robbench.attacks.core import iterative_attack
    from robbench.config import ModelSpec, parse_dataclass
    from robbench.data import get_info
    from robbench.models.eed_team import eed_team

    torch.manual_seed(0)
    info = get_info("digits")
    spec = ModelSpec(arch="eed_team", width=0.25)
    o = parse_dataclass(TeamOptions, {"base_arch": "resnet20", "base_options": {}, "size": 2,
                                      "inference": inference, "combiner": "max", "tau_conf": 0.5},
                        file="t", prefix="model.options")
    team = eed_team(spec, info, o).eval()
    x = torch.rand(6, 1, 8, 8)
    y = torch.randint(0, 10, (6,))
    xg = x.clone().requires_grad_(True)
    torch.nn.functional.nll_loss(team(xg), y).backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0  # gradients reach the input through the max
    res = iterative_attack(team, x, y, 0.1, steps=5, step_size=0.025)
    adv = res.x_adv
    assert (adv - x).abs().max() <= 0.1 + 1e-6 and (adv - x).abs().max() > 0
    before = torch.nn.functional.nll_loss(team(x), y)
    after = torch.nn.functional.nll_loss(team(adv), y)
    assert after > before  # the attack ascends the max-combined loss
