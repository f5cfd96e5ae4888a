"""EED supplementary variants as zoo entries: the TRADES / MART chains (Table 6, entry families) and the
max-combiner teams (Table 7). Loading and building only (no training)."""
from __future__ import annotations

import pytest
import torch

from robbench.config import load_entry
from robbench.data import get_info
from robbench.eed.pipeline import pool_entries
from robbench.models import build_model
from robbench.models.eed_team import find_team
from robbench.pruning import masked_layers

CHAINS = [f"eed_{a}_cifar10_{m}" for a in ("resnet18", "vgg16") for m in ("trades", "mart")]


@pytest.mark.parametrize("prefix", CHAINS)
def test_trades_mart_chain_resolves_into_itself(prefix):
    objective = prefix.rsplit("_", 1)[1]
    at = load_entry(f"{prefix}_at")
    assert at.train.method == objective and at.train.params["beta"] == 6.0  # App. A.1: original beta
    assert at.train.params["init"] == "normal" and at.train.params["adv_steps"] == 20  # EED §5.1 attack
    pool = pool_entries(prefix, ("nis", "erm", "ase", "bnsf"), (0, 1, 2))
    assert len(pool) == 12
    for name in pool:
        fine = load_entry(name)
        prune = load_entry(fine.train.init_from)
        assert fine.train.init_from == f"{name}_prune"
        for e in (prune, fine):
            assert e.train.method == "score_prune" and e.train.params["objective"] == objective
            assert e.train.params["dense_from"] == f"{prefix}_at"  # pruned from this chain's base
        assert prune.train.params["phase"] == "prune" and fine.train.params["phase"] == "finetune"
    team, mean = load_entry(f"{prefix}_team"), load_entry(f"{prefix}_team_mean")
    assert team.train.method == "eed" and mean.train.init_from == f"{prefix}_team"
    assert objective in team.tags and "table6" in team.tags and "table1" not in team.tags
    # the team is the RD selection over this pool: the pipeline's --prefix names exactly these entries
    assert all(n.startswith(f"{prefix}_") for n in pool)


def test_trades_mart_entries_build():
    # one chain built (the others resolve the same way, test above; building is seconds per network)
    prefix = "eed_resnet18_cifar10_trades"
    info = get_info("cifar10")
    torch.manual_seed(0)
    at = build_model(load_entry(f"{prefix}_at"), info)
    assert not masked_layers(at)
    pruned = build_model(load_entry(f"{prefix}_ase_1_prune"), info)
    assert len(masked_layers(pruned)) > 10
    team = find_team(build_model(load_entry(f"{prefix}_team"), info))
    assert len(team.nets) == 2 and team.options.inference == "die"
    with torch.no_grad():
        assert team(torch.rand(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("arch", ["resnet18", "vgg16"])
def test_max_combiner_team_entries(arch):
    e = load_entry(f"eed_{arch}_cifar10_team_max")
    assert e.model.options["combiner"] == "max" and e.model.options["inference"] == "die"
    assert e.train.epochs == 0 and e.train.init_from == f"eed_{arch}_cifar10_team"  # same weights
    if arch == "resnet18":
        team = find_team(build_model(e, get_info("cifar10")))
        assert team.options.combiner == "max" and team.options.max_of == "probs"


def test_gal_ensemble_loss_equals_the_hand_computation_and_trains_the_weights():
    from torch.nn import functional as F

    from robbench.eed.losses import gal_ensemble_loss

    torch.manual_seed(0)
    w1 = torch.randn(3, 4, requires_grad=True)
    w2 = torch.randn(3, 4, requires_grad=True)
    x = torch.randn(5, 4, requires_grad=True)
    y = torch.randint(0, 3, (5,))
    loss, metrics = gal_ensemble_loss([x @ w1.t(), x @ w2.t()], x, y, beta=0.5)
    # linear members: dCE_i/dx = (softmax(W_i x) - onehot(y)) W_i / B (batch-mean CE)
    with torch.no_grad():
        oh = F.one_hot(y, 3).float()
        g1 = (torch.softmax(x @ w1.t(), 1) - oh) @ w1 / 5
        g2 = (torch.softmax(x @ w2.t(), 1) - oh) @ w2 / 5
        coh = torch.log(torch.exp(F.cosine_similarity(g1, g2, dim=1)) + 1e-20).mean()
        ce = F.cross_entropy(x @ w1.t(), y) + F.cross_entropy(x @ w2.t(), y)
    assert metrics["coherence"] == pytest.approx(coh.item(), rel=1e-5)
    assert loss.item() == pytest.approx((ce + 0.5 * coh).item(), rel=1e-5)
    # the coherence term reaches the weights through the input gradients (second order)
    coh_only, _ = gal_ensemble_loss([x @ w1.t(), x @ w2.t()], x, y, beta=1.0)
    ce_only, _ = gal_ensemble_loss([x @ w1.t(), x @ w2.t()], x, y, beta=0.0)
    gw = torch.autograd.grad(coh_only - ce_only, [w1])[0]
    assert gw.abs().sum() > 0


@pytest.mark.parametrize("arch", ["resnet18", "vgg16"])
def test_gal_team_entries(arch):
    from robbench.train.methods.eed import EEDOptions
    from robbench.config import parse_dataclass

    e = load_entry(f"eed_{arch}_cifar10_team_gal")
    o = parse_dataclass(EEDOptions, dict(e.train.params), file="t", prefix="train.params")
    assert o.ensemble_loss == "gal" and o.beta == 0.5 and o.omega == 10.0 and e.train.epochs == 80
    assert "table9" in e.tags and e.train.init_from is None  # trained from the pool, like the team


def test_gal_loss_double_backprop_through_a_masked_team():
    from robbench.eed.losses import gal_ensemble_loss
    from robbench.pruning import set_phase

    e = load_entry("demo_eed_team", ["model.width=0.25"])
    torch.manual_seed(0)
    model = build_model(e, get_info("digits")).train()
    set_phase(model, "finetune")
    team = find_team(model)
    x = torch.rand(6, 1, 8, 8, requires_grad=True)
    y = torch.randint(0, 10, (6,))
    loss, m = gal_ensemble_loss(team.member_logits(x), x, y, beta=0.5)
    loss.backward()
    w = [l.weight for _, l in masked_layers(team.nets[1])]
    assert all(p.grad is not None for p in w) and sum(p.grad.abs().sum() for p in w) > 0
    assert -1.0 <= m["coherence"] <= 1.0 + 1e-6  # log(exp(cos)) for one pair = cos


@pytest.mark.parametrize("arch", ["resnet18", "vgg16"])
def test_mad_like_baseline_entries(arch):
    prune = load_entry(f"eed_{arch}_cifar10_mad_prune")
    fine = load_entry(f"eed_{arch}_cifar10_mad")
    p = prune.train.params
    assert prune.train.epochs == 0 and p["score"] == "ase" and p["saliency"] == "mad"  # one-shot MAD
    assert p["mask_steps"] == 20 and p["mask_lr"] == 0.1 and p["dense_from"] == f"eed_{arch}_cifar10_at"
    assert prune.model.transform_options == {"sparsity": 0.8, "learn_rates": False}
    f = fine.train.params
    assert fine.train.init_from == prune.name and fine.train.epochs == 60
    assert f["phase"] == "finetune" and f["objective"] == "mart" and f["beta"] == 0.5


def test_dverge_ensemble_loss_by_hand_and_the_method_asks_for_a_second_stream():
    from torch.nn import functional as F

    from robbench.eed.losses import dverge_ensemble_loss
    from robbench.train.methods.eed import EED, EEDOptions

    torch.manual_seed(0)
    y, ys = torch.randint(0, 4, (5,)), torch.randint(0, 4, (5,))
    z = [torch.randn(5, 4) for _ in range(3)]
    cross = [[None if i == j else torch.randn(5, 4) for j in range(3)] for i in range(3)]
    loss, m = dverge_ensemble_loss(z, cross, y, ys, beta=0.25)
    ce = sum(F.cross_entropy(t, y) for t in z)
    div = sum(F.cross_entropy(cross[i][j], ys) for i in range(3) for j in range(3) if i != j)  # 6 pairs
    assert m["dverge"] == pytest.approx(div.item()) and loss.item() == pytest.approx((ce + 0.25 * div).item())
    assert EED(EEDOptions(ensemble_loss="dverge")).streams == 2 and EED(EEDOptions()).streams == 1


@pytest.mark.parametrize("arch", ["resnet18", "vgg16"])
def test_dverge_team_entries(arch):
    from robbench.config import parse_dataclass
    from robbench.train.methods.eed import EEDOptions

    e = load_entry(f"eed_{arch}_cifar10_team_dverge")
    o = parse_dataclass(EEDOptions, dict(e.train.params), file="t", prefix="train.params")
    assert o.ensemble_loss == "dverge" and o.beta == 1.0 and (o.dverge_eps, o.dverge_steps) == (0.07, 10)
    assert "table9" in e.tags and e.train.init_from is None
