"""Each training objective on hand-checkable cases, the schedule, the DVERGE layer draw and distillation."""
from __future__ import annotations

import copy
import math
import random

import pytest
import torch
import torch.nn.functional as F

from robbench.config import ScheduleSpec
from robbench.train.loop import lr_at
from robbench.train.methods import module_mode
from robbench.train.methods.adp import adp_loss, ensemble_entropy, log_det_diversity, non_true_gram
from robbench.train.methods.dverge import all_pairs_losses, layer_for_epoch
from robbench.train.methods.gal import add_gaussian_noise, gal_coherence


# ---------------------------------------------------------------------------------------------- ADP
def _probs_from_nontrue(nontrue: list[list[float]], y: int, p_true: float = 0.5) -> torch.Tensor:
    """[M, 1, C] member probabilities with the given (unnormalised) non-true parts; true class y."""
    rows = []
    for v in nontrue:
        v = torch.tensor(v, dtype=torch.float64)
        v = v / v.sum() * (1 - p_true)
        rows.append(torch.cat([v[:y], torch.tensor([p_true], dtype=torch.float64), v[y:]]))
    return torch.stack(rows).unsqueeze(1)


def test_adp_gram_orthogonal_members_is_identity():
    # non-true parts with disjoint supports -> normalised vectors are orthonormal -> G = I
    p = _probs_from_nontrue([[1, 1, 0, 0], [0, 0, 1, 1]], y=2)
    g = non_true_gram(p, torch.tensor([2]))
    assert torch.allclose(g[0], torch.eye(2, dtype=torch.float64), atol=1e-12)
    assert log_det_diversity(p, torch.tensor([2])).item() == pytest.approx(2 * math.log(1 + 1e-6), abs=1e-12)


def test_adp_logdet_identical_members_is_log_of_tiny_det():
    # identical members: G = ones(2, 2); det(J + 1e-6 I) = 1e-6 * (2 + 1e-6)
    p = _probs_from_nontrue([[1, 2, 3, 4], [1, 2, 3, 4]], y=0)
    ld = log_det_diversity(p, torch.tensor([0])).item()
    assert ld == pytest.approx(math.log(1e-6 * (2 + 1e-6)), rel=1e-6)


def test_adp_gram_known_angle_ignores_true_class():
    # non-true vectors (1, 0) and (1, 1)/sqrt2 -> cos 45 deg; the true-class entry (index 1) must be dropped
    a = torch.tensor([0.3, 0.7, 0.0], dtype=torch.float64)
    b = torch.tensor([0.15, 0.7, 0.15], dtype=torch.float64)
    p = torch.stack([a, b]).unsqueeze(1)
    g = non_true_gram(p, torch.tensor([1]))[0]
    c = 1 / math.sqrt(2)
    assert torch.allclose(g, torch.tensor([[1, c], [c, 1]], dtype=torch.float64), atol=1e-12)
    assert log_det_diversity(p, torch.tensor([1])).item() == pytest.approx(math.log((1 + 1e-6) ** 2 - c * c), rel=1e-9)


def test_adp_entropy_and_total_loss():
    uniform = torch.full((2, 3, 10), 0.1, dtype=torch.float64)
    assert torch.allclose(ensemble_entropy(uniform), torch.full((3,), math.log(10), dtype=torch.float64))
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 10, dtype=torch.float64)
    y = torch.randint(0, 10, (5,))
    loss, parts = adp_loss(logits, y, alpha=2.0, beta=0.5)
    ce = sum(F.cross_entropy(z, y) for z in logits)
    probs = logits.softmax(-1)
    expected = ce - 2.0 * ensemble_entropy(probs).mean() - 0.5 * log_det_diversity(probs, y).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    assert parts["ce"].item() == pytest.approx(ce.item())


# ---------------------------------------------------------------------------------------------- GAL
def test_gal_coherence_aligned_vs_opposite():
    g = torch.randn(1, 4, 7)
    aligned = torch.cat([g, 2.5 * g])  # same direction, cos = 1
    opposite = torch.cat([g, -g])  # cos = -1
    assert gal_coherence(aligned).item() == pytest.approx(1.0, abs=1e-6)
    assert gal_coherence(opposite).item() == pytest.approx(-1.0, abs=1e-6)
    three = torch.cat([g, g, g])  # 3 pairs with cos 1: log(3 e)
    assert gal_coherence(three).item() == pytest.approx(1 + math.log(3), abs=1e-6)
    assert gal_coherence(aligned) > gal_coherence(opposite)


def test_gal_noise_probability_extremes():
    x = torch.rand(16, 1, 8, 8)
    assert torch.equal(add_gaussian_noise(x, 0.045, 0.0), x)
    torch.manual_seed(0)
    noisy = add_gaussian_noise(x, 0.045, 1.0)
    d = (noisy - x).flatten(1)
    assert (d.abs().sum(1) > 0).all()  # every sample got noise
    assert d.std().item() == pytest.approx(0.045, rel=0.15)


# ---------------------------------------------------------------------------------------------- DVERGE
def test_dverge_all_pairs_loss_skips_diagonal():
    y = torch.tensor([0, 1])
    z = {(i, j): torch.randn(2, 3) for i in range(3) for j in range(3) if i != j}
    logits = [[None if i == j else z[i, j] for j in range(3)] for i in range(3)]
    losses = all_pairs_losses(logits, y)
    for i in range(3):
        expect = sum(F.cross_entropy(z[i, j], y) for j in range(3) if j != i)
        assert losses[i].item() == pytest.approx(expect.item(), rel=1e-6)
    # hand case: uniform logits give CE = log 3 per pair, two pairs per member
    flat = [[None if i == j else torch.zeros(2, 3) for j in range(3)] for i in range(3)]
    assert all(v.item() == pytest.approx(2 * math.log(3)) for v in all_pairs_losses(flat, y))


def test_dverge_layer_sequence_is_the_reference_one():
    random.seed(7)
    ref = [random.randint(1, 20) for _ in range(6)]  # train_dverge.py: random.seed(seed); randint per epoch
    assert [layer_for_epoch(7, e, 20) for e in range(6)] == ref


def test_module_mode_restores_mixed_flags():
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    net.train()
    net[1].eval()
    with module_mode(net, "train"):
        assert net[1].training
    assert net.training and not net[1].training
    with module_mode(net, "eval"):
        assert not net.training and not net[0].training
    assert net[0].training


# ---------------------------------------------------------------------------------------------- schedule
def test_multistep_schedule_matches_torch():
    spec = ScheduleSpec(name="multistep", milestones=[100, 150], gamma=0.1)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[100, 150], gamma=0.1)
    for epoch in range(200):
        assert lr_at(spec, 0.1, epoch, 200) == opt.param_groups[0]["lr"], epoch  # bit-equal floats
        opt.step()
        sched.step()
    assert lr_at(spec, 0.1, 99, 200) == 0.1 and lr_at(spec, 0.1, 100, 200) < 0.011


def test_cosine_and_constant_schedules():
    cos = ScheduleSpec(name="cosine", milestones=[], warmup_epochs=0)
    assert lr_at(cos, 0.1, 0, 10) == pytest.approx(0.1)
    assert lr_at(cos, 0.1, 5, 10) == pytest.approx(0.05)
    assert lr_at(ScheduleSpec(name="constant"), 0.1, 123, 200) == 0.1
    warm = ScheduleSpec(name="constant", warmup_epochs=4)
    assert [lr_at(warm, 1.0, e, 10) for e in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]


# ---------------------------------------------------------------------------------------------- distillation
@pytest.fixture(scope="module")
def tiny_members():
    from robbench.config import load_entry
    from robbench.data import get_info
    from robbench.models import build_model

    torch.manual_seed(0)
    e = load_entry("demo_baseline_x3", ["model.width=0.25"])
    return build_model(e, get_info("digits")).members


@pytest.mark.parametrize("layer", [4, 20])
def test_distillation_reduces_feature_distance_within_eps(tiny_members, layer):
    from robbench.train.distill import distill, feature_distance

    torch.manual_seed(1)
    x_s, x_t = torch.rand(16, 1, 8, 8), torch.rand(16, 1, 8, 8)
    members = list(tiny_members)
    with module_mode(tiny_members, "eval"):
        out = distill(members, x_s, x_t, layer, eps=0.2, step_size=0.02, steps=10)
        assert len(out) == len(members)
        for m, xd in zip(members, out):
            before = feature_distance(m, x_s, x_t, layer)
            after = feature_distance(m, xd, x_t, layer)
            assert after.mean() < 0.8 * before.mean()  # clearly closer to the target's features
            assert (xd - x_s).abs().max() <= 0.2 + 1e-6  # in the eps ball
            assert xd.min() >= 0 and xd.max() <= 1
        # one batched attack call == a separate attack per member
        loop = distill(members, x_s, x_t, layer, eps=0.2, step_size=0.02, steps=10, batched=False)
        for a, b in zip(out, loop):
            assert (a - b).abs().max() < 1e-5 or (a != b).float().mean() < 0.01


def test_distillation_target_recompute_same_result_in_eval_mode(tiny_members):
    from robbench.train.distill import distill

    torch.manual_seed(2)
    x_s, x_t = torch.rand(8, 1, 8, 8), torch.rand(8, 1, 8, 8)
    with module_mode(tiny_members, "eval"):
        once = distill(list(tiny_members), x_s, x_t, 9, eps=0.1, step_size=0.01, steps=5)
        every = distill(list(tiny_members), x_s, x_t, 9, eps=0.1, step_size=0.01, steps=5, recompute_target=True)
    for a, b in zip(once, every):
        assert torch.equal(a, b)


@pytest.mark.parametrize("layer", [1, 9, 20])
@pytest.mark.parametrize("batched", [True, False])
def test_distillation_iterate_x_equals_reference_loop(layer, batched):
    """iterate='x' == the reference's member loop to the bit over 10 steps (train mode, target features
    recomputed every step as the reference, so the BN running statistics must agree too). Batch 12: not a
    power of 2, so the loss must be the reference's batch-mean MSE, not a rescaled one."""
    import copy

    from robbench.config import load_entry
    from robbench.data import get_info
    from robbench.models import build_model
    from dverge_reference import linf_distillation  # tests/dverge_reference.py

    from robbench.train.distill import distill

    torch.manual_seed(3)
    e = load_entry("demo_baseline_x3")  # ResNet-20 on 1x8x8 digits
    ours = build_model(e, get_info("digits")).train()
    ref = copy.deepcopy(ours)
    x_s, x_t = torch.rand(12, 1, 8, 8), torch.rand(12, 1, 8, 8)
    got = distill(list(ours.members), x_s, x_t, layer, eps=0.07, step_size=0.007, steps=10,
                  recompute_target=True, batched=batched, iterate="x")
    want = [linf_distillation(m, x_s, x_t, 0.07, 0.007, 10, layer) for m in ref.members]
    for a, b in zip(got, want):
        assert torch.equal(a, b)
        assert (a != x_s).float().mean() > 0.5  # the attack moved most pixels
    for (k, a), (_, b) in zip(ours.state_dict().items(), ref.state_dict().items()):
        assert torch.allclose(a.float(), b.float(), rtol=0, atol=1e-6), k  # same BN running-stat updates


def test_feature_mse_batch_gradient_is_mseloss_to_the_bit():
    """The loss iterate='x' distils with has nn.MSELoss()'s input gradient bit for bit at a batch that is
    not a power of 2 (the per-sample mean's differs by the non-power-of-2 factor B, so it rounds apart)."""
    from robbench.attacks.losses import feature_mse, feature_mse_batch

    torch.manual_seed(4)
    f, t = torch.randn(12, 5, 3, requires_grad=True), torch.randn(12, 5, 3)
    ref = torch.autograd.grad(torch.nn.MSELoss()(f, t), f)[0]
    ours = torch.autograd.grad(-(feature_mse_batch(f, t, 12).sum() * -1.0), f)[0]  # the core's descend sign
    assert torch.equal(ours, ref)
    assert torch.allclose(feature_mse_batch(f, t, 12).sum(), torch.nn.MSELoss()(f, t), rtol=1e-6)
    per_sample = torch.autograd.grad(feature_mse(f, t).sum(), f)[0] / 12
    assert torch.allclose(per_sample, ref, rtol=1e-6)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_distillation_equals_reference_model_at_every_layer(mode):
    """Distillation on robbench's ResNet-20 equals ``Linf_distillation`` on DVERGE's own ResNet-20
    (models/resnet.py re-stated in tests/dverge_reference.py, AvgPool2d(8) pooling) to the bit at every
    layer 1..20, 10 momentum sign steps, BN in eval and in train mode (the running statistics too)."""
    from dverge_reference import RefResNet20, linf_distillation, ref_state_as_ours  # tests/dverge_reference.py

    from robbench.config import ModelSpec
    from robbench.data.info import INFOS
    from robbench.models import build_network
    from robbench.train.distill import distill

    torch.manual_seed(123)
    ref0 = RefResNet20()
    torch.manual_seed(123)
    ours0 = build_network(ModelSpec(arch="resnet20", normalization="none"), INFOS["cifar10"])
    ours0.load_state_dict(ref_state_as_ours(ref0))
    g = torch.Generator().manual_seed(5)
    x_s, x_t = torch.rand(3, 3, 32, 32, generator=g), torch.rand(3, 3, 32, 32, generator=g)
    for layer in range(1, 21):
        ours, ref = copy.deepcopy(ours0), copy.deepcopy(ref0)
        getattr(ours, mode)(), getattr(ref, mode)()
        got = distill([ours], x_s, x_t, layer, eps=0.07, step_size=0.007, steps=10, recompute_target=True,
                      batched=False, iterate="x")[0]
        want = linf_distillation(ref, x_s, x_t, 0.07, 0.007, 10, layer)
        assert torch.equal(got, want), (layer, (got - want).abs().max().item())
        assert (got != x_s).float().mean() > 0.5, layer  # the attack moved most pixels
        theirs = ref_state_as_ours(ref)
        for k, v in ours.state_dict().items():
            assert torch.equal(v, theirs[k]), (layer, k)  # same BN running-statistic updates
