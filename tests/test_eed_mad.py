"""ASE's MAD learned-mask saliency (robbench.pruning.scores.mad) against hand computations."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from robbench.pruning import mask_network
from robbench.pruning.scores import ScoreData
from robbench.pruning.scores.ase import ase_scores
from robbench.pruning.scores.mad import MASK_HIGH, MASK_LOW, damage, input_columns


def _hand_mad_linear(w: torch.Tensor, b: torch.Tensor, x: torch.Tensor, y: torch.Tensor, steps: int,
                     lr: float) -> torch.Tensor:
    """MAD on one Linear layer written out: soft mask on [W | b], Adam on CE, K-FAC damage."""
    m = torch.full((w.shape[0], w.shape[1] + 1), math.log(math.e - 1), requires_grad=True)
    opt = torch.optim.Adam([m], lr=lr)
    wb = torch.cat([w, b.reshape(-1, 1)], 1)
    xa = torch.cat([x, torch.ones(len(x), 1)], 1)
    for _ in range(steps):
        loss = F.cross_entropy(xa @ (wb * F.softplus(m)).t(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            m.clamp_(math.log(math.expm1(1e-4)), math.log(math.e - 1))
    with torch.no_grad():
        z = xa @ (wb * F.softplus(m)).t()
        g = torch.softmax(z, 1) - F.one_hot(y, w.shape[0])  # per-sample dCE_i/dz_i
        gdiag = g.pow(2).mean(0)
        a_mat = sum(torch.outer(r, r) for r in xa) / len(xa)
        delta = wb - wb * F.softplus(m)
        dl = torch.empty_like(delta)
        for o in range(delta.shape[0]):
            for j in range(delta.shape[1]):
                dl[o, j] = 0.5 * gdiag[o] * delta[o, j] * sum(delta[o, k] * a_mat[k, j] for k in range(delta.shape[1]))
    return dl[:, :-1]


def test_mad_saliency_on_one_linear_layer_equals_the_hand_computation():
    torch.manual_seed(0)
    net = mask_network(nn.Sequential(nn.Linear(3, 2)), {"sparsity": 0.5})
    x, y = torch.randn(6, 3), torch.randint(0, 2, (6,))
    opts = {"saliency": "mad", "mask_steps": 5, "mask_lr": 0.1}
    s = ase_scores(net, ScoreData(batches=[(x, y)], options=opts))["0"]
    lin = net[0]
    want = _hand_mad_linear(lin.weight.detach(), lin.bias.detach(), x, y, 5, 0.1)
    assert s.abs().sum() > 0
    assert torch.allclose(s, want, rtol=1e-4, atol=1e-9)
    # the learned mask is the damage: no Adam step -> factor 1 -> no damage
    zero = ase_scores(net, ScoreData(batches=[(x, y)], options={**opts, "mask_steps": 0}))["0"]
    assert torch.equal(zero, torch.zeros_like(zero))
    # the weights, their flags and the mode are as before
    assert lin.weight.requires_grad and net.training
    # two batches: the mean of the per-batch damages
    x2, y2 = torch.randn(4, 3), torch.randint(0, 2, (4,))
    both = ase_scores(net, ScoreData(batches=[(x, y), (x2, y2)], options=opts))["0"]
    want2 = _hand_mad_linear(lin.weight.detach(), lin.bias.detach(), x2, y2, 5, 0.1)
    assert torch.allclose(both, (want + want2) / 2, rtol=1e-4, atol=1e-9)
    # and differs from EED's Eq. 10 default
    eq10 = ase_scores(net, ScoreData(batches=[(x, y)]))["0"]
    assert not torch.allclose(eq10, s)


def test_conv_columns_and_damage_against_an_explicit_a_matrix():
    torch.manual_seed(1)
    net = mask_network(nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, bias=True)), {"sparsity": 0.5})
    conv = net[0]
    a = torch.randn(2, 2, 4, 4)
    cols = input_columns(conv, a)
    assert cols.shape == (2 * 16, 2 * 9 + 1) and torch.equal(cols[:, -1], torch.ones(32))
    # patch of sample 1 at output position (2, 3) is the 3x3 window centred there, channels first
    ap = F.pad(a, (1, 1, 1, 1))
    assert torch.allclose(cols[16 + 2 * 4 + 3, :-1], ap[1, :, 2:5, 3:6].reshape(-1))
    delta = torch.randn(3, 19)
    g = torch.rand(3)
    a_mat = cols.t() @ cols / len(cols)
    want = 0.5 * g.reshape(-1, 1) * delta * (delta @ a_mat)
    assert torch.allclose(damage(delta, cols, g), want, rtol=1e-5, atol=1e-6)


def test_mad_saliency_runs_on_a_conv_net_and_learns_factors_in_range():
    from robbench.pruning.scores.mad import learn_mask
    from robbench.pruning.masked import masked_layers

    torch.manual_seed(2)
    net = mask_network(nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                                     nn.Linear(4 * 36, 3)), {"sparsity": 0.5})
    x, y = torch.rand(5, 1, 8, 8), torch.randint(0, 3, (5,))
    s = ase_scores(net, ScoreData(batches=[(x, y)], options={"saliency": "mad", "mask_steps": 4}))
    assert set(s) == {"0", "4"} and all(v.shape == dict(masked_layers(net))[k].weight.shape for k, v in s.items())
    assert all(torch.isfinite(v).all() and v.abs().sum() > 0 for v in s.values())
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    raw = learn_mask(net, masked_layers(net), x, y, 4, 0.1)
    for m in raw.values():
        assert m.min() >= MASK_LOW - 1e-6 and m.max() <= MASK_HIGH + 1e-6 and (m < MASK_HIGH).any()
