"""Madry PGD-AT, TRADES and MART objectives: hand-checkable values, the attack's constraints and BN mode."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from robbench.config import load_entry
from robbench.registry import METHODS
from robbench.train.methods.adv_bases import (AdvBaseOptions, KLToTarget, MartOptions, TradesOptions, craft,
                                              madry_objective, mart_objective, trades_objective)


class Flat(nn.Module):
    """logits = W x (x flattened), W given: gradients and losses are hand-computable."""

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(w.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.w.t()


def test_kl_to_target_is_kl_of_the_rows():
    p = torch.tensor([[0.25, 0.75]])
    z = torch.log(torch.tensor([[0.5, 0.5]]))
    want = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert KLToTarget()(z, None, p).item() == pytest.approx(want, rel=1e-6)


def test_madry_one_step_is_fgsm_on_the_linear_model():
    # one step of size eps from x with no random start: x + eps * sign(W^T (softmax(Wx) - onehot(y)))
    w = torch.tensor([[1.0, -2.0], [0.5, 3.0]])
    model = Flat(w)
    x = torch.tensor([[0.5, 0.5]])
    y = torch.tensor([0])
    o = AdvBaseOptions(adv_eps=0.1, adv_step=0.1, adv_steps=1, init="none")
    x_adv = craft(model, model, x, y, o)
    p = torch.softmax(x @ w.t(), dim=1)
    grad = (p - torch.tensor([[1.0, 0.0]])) @ w
    assert torch.allclose(x_adv, x + 0.1 * grad.sign())


def test_attacks_stay_in_the_eps_ball_and_the_box():
    torch.manual_seed(0)
    model = Flat(torch.randn(3, 4))
    x = torch.rand(16, 4)
    y = torch.randint(0, 3, (16,))
    for init in ("uniform", "normal"):
        o = AdvBaseOptions(adv_eps=0.05, adv_step=0.02, adv_steps=5, init=init)
        xa = craft(model, model, x, y, o)
        assert (xa - x).abs().max() <= 0.05 + 1e-7 and xa.min() >= 0 and xa.max() <= 1
        ce = nn.functional.cross_entropy
        assert ce(model(xa), y) > ce(model(x), y)  # it ascends


def test_zero_steps_hand_values():
    # logits 0 for both classes: p = (0.5, 0.5); x_adv = x, so every KL is 0
    model = Flat(torch.zeros(2, 2))
    x, y = torch.zeros(1, 2), torch.tensor([0])
    loss, _ = madry_objective(model, model, x, y, AdvBaseOptions(adv_steps=0))
    assert loss.item() == pytest.approx(math.log(2), rel=1e-6)
    loss, m = trades_objective(model, model, x, y, TradesOptions(adv_steps=0))
    assert loss.item() == pytest.approx(math.log(2), rel=1e-6) and m["robust_kl"] == pytest.approx(0.0, abs=1e-7)
    # MART: CE(adv) + NLL(log(1.0001 - p_adv + 1e-12), y~) with y~ the other class: log 2 - log(0.5001)
    loss, _ = mart_objective(model, model, x, y, MartOptions(adv_steps=0))
    assert loss.item() == pytest.approx(math.log(2) - math.log(0.5001 + 1e-12), rel=1e-6)


def test_trades_and_mart_weigh_the_kl_by_beta():
    torch.manual_seed(0)
    model = Flat(torch.randn(3, 4) * 3)
    x, y = torch.rand(8, 4), torch.randint(0, 3, (8,))
    torch.manual_seed(1)
    l0, m0 = trades_objective(model, model, x, y, TradesOptions(beta=0.0, adv_eps=0.1, adv_step=0.05, adv_steps=3))
    torch.manual_seed(1)
    l6, m6 = trades_objective(model, model, x, y, TradesOptions(beta=6.0, adv_eps=0.1, adv_step=0.05, adv_steps=3))
    assert m6["robust_kl"] > 0
    assert l6.item() == pytest.approx(l0.item() + 6.0 * m6["robust_kl"], rel=1e-5)
    torch.manual_seed(1)
    a0, _ = mart_objective(model, model, x, y, MartOptions(beta=0.0, adv_eps=0.1, adv_step=0.05, adv_steps=3))
    torch.manual_seed(1)
    a6, n6 = mart_objective(model, model, x, y, MartOptions(beta=6.0, adv_eps=0.1, adv_step=0.05, adv_steps=3))
    assert a6.item() == pytest.approx(a0.item() + 6.0 * n6["robust_kl"], rel=1e-5) and n6["robust_kl"] > 0


def test_trades_kl_target_keeps_its_gradient():
    # trades.py: KLDivLoss(log_softmax(f(x_adv)), softmax(f(x_nat))) -- the target is not detached, so with
    # beta only (CE weight removed by y-independence it still has) the weights get gradient through p_nat too
    torch.manual_seed(0)
    model = Flat(torch.randn(3, 4))
    x, y = torch.rand(4, 4), torch.randint(0, 3, (4,))
    loss, _ = trades_objective(model, model, x, y, TradesOptions(adv_eps=0.1, adv_step=0.05, adv_steps=2))
    loss.backward()
    assert model.w.grad is not None and model.w.grad.abs().sum() > 0


def test_attack_runs_with_batchnorm_in_eval_mode():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)).train()
    x, y = torch.rand(16, 4), torch.randint(0, 3, (16,))
    before = net[2].running_mean.clone()
    craft(net, net, x, y, AdvBaseOptions(adv_steps=3, attack_bn_mode="eval"))
    assert torch.equal(net[2].running_mean, before) and net.training and net[2].training
    craft(net, net, x, y, AdvBaseOptions(adv_steps=3, attack_bn_mode="train"))
    assert not torch.equal(net[2].running_mean, before)


@pytest.mark.parametrize("method", ["pgd_at", "trades", "mart"])
def test_methods_take_a_step_through_the_loop_interface(method):
    from robbench.data import get_info
    from robbench.models import build_model
    from robbench.train.loop import DistEnv, TrainContext, build_optimizers
    from robbench.train.methods import Batch

    entry = load_entry("demo_eed_at", ["model.width=0.25", f"train.method={method}", "train.params={}"])
    assert isinstance(entry.method_params, METHODS.params(method))
    torch.manual_seed(0)
    model = build_model(entry, get_info("digits")).train()
    ctx = TrainContext(entry=entry, model=model, optimizers=build_optimizers(model, list(model.members),
                       entry.train.optimizer), device=torch.device("cpu"), dist=DistEnv(), seed=0, num_classes=10)
    m = METHODS.get(method)(entry.method_params)
    m.setup(ctx)
    before = [p.detach().clone() for p in model.parameters()]
    g = torch.Generator().manual_seed(1)
    out = m.step(ctx, Batch(torch.rand(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)))
    assert out and all(math.isfinite(v) for v in out.values())
    assert sum(not torch.equal(a, b) for a, b in zip(before, model.parameters())) > len(before) // 2


def test_defaults_trace_to_eed_and_the_references():
    o = AdvBaseOptions()
    assert (o.adv_eps, o.adv_step, o.adv_steps, o.init) == (8 / 255, 2 / 255, 20, "uniform")  # EED §5.1
    assert (TradesOptions().beta, TradesOptions().init) == (6.0, "normal")
    assert (MartOptions().beta, MartOptions().init) == (6.0, "normal")
