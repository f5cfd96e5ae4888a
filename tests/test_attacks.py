"""Attack core fidelity and behaviour: parity with advertorch / torchattacks / pyautoattack, DeepFool on
an analytic linear model, the CW masking bug, early stop, keep-best, projection, record_steps."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
import advertorch_shim  # noqa: E402,F401  (must precede advertorch)
import dverge_reference  # noqa: E402  (DVERGE distillation.py loops, as written)

from robbench.attacks import (AttackLoss, DiverseInput, deepfool, draw_init, get_loss,  # noqa: E402
                              iterative_attack, make_attack, momentum_update)
from robbench.attacks.losses import cw, dlr, feature_mse  # noqa: E402
from robbench.errors import ConfigError  # noqa: E402
from robbench.registry import ATTACKS  # noqa: E402

torch.set_num_threads(1)


# ----------------------------------------------------------------------------------------------
# fixtures: a small CNN trained on 8x8 digits in about a second
# ----------------------------------------------------------------------------------------------

def _cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1),
                         nn.ReLU(), nn.Flatten(), nn.Linear(16 * 16, 10))


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    return x, torch.tensor(d.target)


@pytest.fixture(scope="module")
def net(digits: tuple[torch.Tensor, torch.Tensor]) -> nn.Module:
    x, y = digits
    torch.manual_seed(0)
    m = _cnn()
    opt = torch.optim.Adam(m.parameters(), 1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        idx = torch.randint(0, 1500, (128,), generator=g)
        loss = F.cross_entropy(m(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    for p in m.parameters():
        p.grad = None
    acc = (m(x[1500:]).argmax(1) == y[1500:]).float().mean().item()
    assert acc > 0.85, acc
    return m


@pytest.fixture(scope="module")
def batch(digits: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = digits
    return x[1500:1564].clone(), y[1500:1564].clone()


def _fooled(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).argmax(1) != y


# ----------------------------------------------------------------------------------------------
# parity with peer implementations
# ----------------------------------------------------------------------------------------------

def test_pgd_linf_equals_advertorch_with_reference_seeding(net, batch):
    """DVERGE eval_wbox.py: torch.manual_seed(r); LinfPGDAttack(...).perturb. Ours: seed=r. Same bits."""
    from advertorch.attacks import LinfPGDAttack

    x, y = batch
    eps = 0.1
    robust_ref = torch.ones_like(y, dtype=torch.bool)
    for r in range(3):
        torch.manual_seed(r)
        ref = LinfPGDAttack(net, eps=eps, nb_iter=10, eps_iter=eps / 5, rand_init=True).perturb(x, y)
        ours = iterative_attack(net, x, y, eps, steps=10, step_size=eps / 5, seed=r)
        assert (ref - ours.x_adv).abs().max().item() <= 1e-6
        assert torch.equal(ours.fooled, _fooled(net, ref, y))
        robust_ref &= ~_fooled(net, ref, y)
    # the reference's all-or-nothing over 3 seeded restarts == our restarts=3, with and without early stop
    for es in (False, True):
        res = iterative_attack(net, x, y, eps, steps=10, step_size=eps / 5, restarts=3, seed=0, early_stop=es)
        assert torch.equal(~res.fooled, robust_ref)
    assert 0 < int(robust_ref.sum()) < len(y)  # the check is not vacuous


def test_pgd_seed_stream_continues_across_batches(net, batch):
    """The reference seeds once per restart for the whole test set: a persistent rng list reproduces
    two consecutive advertorch batches."""
    from advertorch.attacks import LinfPGDAttack

    x, y = batch
    eps = 0.08
    torch.manual_seed(1)
    adv = LinfPGDAttack(net, eps=eps, nb_iter=5, eps_iter=eps / 5, rand_init=True)
    ref = torch.cat([adv.perturb(x[:32], y[:32]), adv.perturb(x[32:], y[32:])])
    gen = torch.Generator().manual_seed(1)
    ours = torch.cat([iterative_attack(net, x[s], y[s], eps, steps=5, step_size=eps / 5, rng=[gen]).x_adv
                      for s in (slice(0, 32), slice(32, 64))])
    assert (ref - ours).abs().max().item() <= 1e-6


def test_momentum_equals_advertorch_mifgsm(net, batch):
    from advertorch.attacks import MomentumIterativeAttack

    x, y = batch
    eps = 0.1
    ref = MomentumIterativeAttack(net, eps=eps, nb_iter=10, eps_iter=eps / 10, decay_factor=1.0).perturb(x, y)
    ours = iterative_attack(net, x, y, eps, steps=10, step_size=eps / 10, init="none", momentum=1.0,
                            momentum_floor=1e-6)  # advertorch normalize_by_pnorm floor
    assert (ref - ours.x_adv).abs().max().item() <= 1e-6
    plain = iterative_attack(net, x, y, eps, steps=10, step_size=eps / 10, init="none")
    assert (plain.x_adv - ours.x_adv).abs().max().item() > 1e-3  # momentum did something


def test_pgd_l2_equals_advertorch_with_injected_init(net, batch):
    from advertorch.attacks import L2PGDAttack
    from advertorch.attacks.utils import rand_init_delta
    from advertorch.utils import clamp

    x, y = batch
    eps = 1.0
    torch.manual_seed(3)
    delta = torch.zeros_like(x)
    rand_init_delta(delta, x, 2, eps, 0.0, 1.0)
    delta = clamp(x + delta, 0.0, 1.0) - x  # PGDAttack.perturb clips once more
    torch.manual_seed(3)
    ref = L2PGDAttack(net, eps=eps, nb_iter=10, eps_iter=eps / 5, rand_init=True).perturb(x, y)
    ours = iterative_attack(net, x, y, eps, norm="l2", steps=10, step_size=eps / 5, init=delta)
    assert (ref - ours.x_adv).abs().max().item() <= 1e-6
    assert (ours.x_adv - x).flatten(1).norm(dim=1).max().item() <= eps * (1 + 1e-5)


def test_pgd_equals_torchattacks(net, batch):
    """torchattacks PGD iterates x_adv (not delta) and draws uniform_(-eps, eps): the same math, so
    equal up to float rounding and with identical predictions."""
    import torchattacks

    x, y = batch
    eps = 0.1
    for s in range(2):
        torch.manual_seed(s)
        ref = torchattacks.PGD(net, eps=eps, alpha=eps / 5, steps=10, random_start=True)(x, y)
        ours = iterative_attack(net, x, y, eps, steps=10, step_size=eps / 5, seed=s)
        assert (ref - ours.x_adv).abs().max().item() <= 1e-6
        assert torch.equal(_fooled(net, ref, y), ours.fooled)


def test_fgsm_equals_advertorch(net, batch):
    from advertorch.attacks import GradientSignAttack

    x, y = batch
    ref = GradientSignAttack(net, eps=0.1).perturb(x, y)
    ours = make_attack("fgsm")(net, x, y, 0.1)
    assert (ref - ours.x_adv).abs().max().item() <= 1e-6
    assert ours.stats["grad"] == len(x)


def test_autoattack_adapter_equals_pyautoattack(net, batch):
    from pyautoattack import AutoAttack

    x, y = batch[0][:24], batch[1][:24]
    eps = 0.15
    aa = AutoAttack(net, attacks=["apgd-ce", "apgd-t"], eps=eps, seed=0, version="custom")
    aa.apgd.n_iter = aa.apgd_targeted.n_iter = 5
    aa.apgd.n_restarts = 1
    aa.apgd_targeted.n_target_classes = 2
    ref, _ = aa.run_standard_evaluation(x, y, batch_size=250)
    attack = make_attack("autoattack", version="custom", attacks=["apgd-ce", "apgd-t"], n_iter=5,
                         n_restarts=1, n_target_classes=2)
    ours = attack(net, x, y, eps)
    assert torch.equal(ours.fooled, _fooled(net, ref, y))
    assert (ours.x_adv - x).abs().max().item() <= eps + 1e-6
    assert 0 < int(ours.fooled.sum()) < len(y)


def test_autoattack_reports_gradient_masking_checks(net, batch):
    """Softmax output trips AutoAttack's check; the adapter returns the message."""
    x, y = batch[0][:8], batch[1][:8]
    soft = nn.Sequential(net, nn.Softmax(dim=1))
    res = make_attack("autoattack", version="custom", attacks=["apgd-ce"], n_iter=2, n_restarts=1)(soft, x, y, 0.1)
    assert any("probability distribution" in w for w in res.warnings)
    clean = make_attack("autoattack", version="custom", attacks=["apgd-ce"], n_iter=2, n_restarts=1)(net, x, y, 0.1)
    assert not any("probability distribution" in w for w in clean.warnings)


# ----------------------------------------------------------------------------------------------
# DeepFool
# ----------------------------------------------------------------------------------------------

def test_deepfool_linear_model_minimal_perturbation():
    """For f(x) = Wx + b the minimal L2 perturbation is min_k |f_k - f_y| / ||w_k - w_y||; DeepFool
    lands (1 + overshoot) * (d + 1e-4) away in one step."""
    g = torch.Generator().manual_seed(0)
    lin = nn.Sequential(nn.Flatten(), nn.Linear(16, 5))
    with torch.no_grad():
        lin[1].weight.copy_(torch.randn(5, 16, generator=g))
        lin[1].bias.copy_(torch.randn(5, generator=g) * 0.1)
    x = 0.5 + 0.01 * torch.randn(20, 1, 4, 4, generator=g)  # far from the box: no clipping
    with torch.no_grad():
        z = lin(x)
    y = z.argmax(1)
    w, b = lin[1].weight, lin[1].bias
    d = torch.full((20,), float("inf"))
    for k in range(5):
        dk = (z[:, k] - z.gather(1, y[:, None]).squeeze(1)).abs() / (w[k] - w[y]).norm(dim=1)
        d = torch.where(y == k, d, torch.minimum(d, dk))
    res = deepfool(lin, x, y, steps=50, overshoot=0.02)
    assert res.fooled.all()
    assert torch.allclose(res.norms, 1.02 * (d + 1e-4), rtol=1e-4, atol=1e-6)
    assert (res.iterations == 1).all()
    # top-k candidates containing the nearest boundary give the same answer
    res3 = deepfool(lin, x, y, candidates=5)
    assert torch.allclose(res3.norms, res.norms)


def test_deepfool_success_rule_norm_within_eps(net, batch):
    x, y = batch
    free = make_attack("deepfool", success_rule="unbounded")(net, x, y, 0.5)
    assert free.fooled.float().mean() > 0.9
    norms = free.objective
    eps = float(norms.median())
    ruled = make_attack("deepfool")(net, x, y, eps)
    assert torch.equal(ruled.fooled, free.fooled & (norms <= eps))
    # samples over budget are returned clean, so re-evaluating x_adv gives the same verdict
    assert torch.equal(_fooled(net, ruled.x_adv, y), ruled.fooled)
    proj = make_attack("deepfool", success_rule="project")(net, x, y, eps)
    assert (proj.x_adv - x).flatten(1).norm(dim=1).max().item() <= eps * (1 + 1e-5)


# ----------------------------------------------------------------------------------------------
# losses
# ----------------------------------------------------------------------------------------------

def test_cw_mask_bug_shows_when_wrong_logits_are_negative():
    z = torch.tensor([[2.0, -1.0, -3.0]], requires_grad=True)
    y = torch.tensor([0])
    fixed = cw(z, y, kappa=0.0)
    bug = cw(z, y, kappa=0.0, mask_bug=True)
    assert fixed.item() == pytest.approx(-3.0)  # -(2 - (-1))
    assert bug.item() == pytest.approx(-2.0)    # -(2 - 0): the masked true class wins the max
    (g_bug,) = torch.autograd.grad(bug.sum(), z)
    assert g_bug[0, 1:].abs().sum().item() == 0.0  # the bug never pushes a wrong class up
    (g_fix,) = torch.autograd.grad(cw(z, y).sum(), z)
    assert g_fix[0, 1].item() == 1.0
    # log-probabilities (DVERGE's ensemble output) are all negative: the bug always fires there
    logp = torch.log_softmax(torch.randn(6, 10), 1)
    yy = logp.argmax(1)
    assert not torch.allclose(cw(logp, yy, 0.1), cw(logp, yy, 0.1, mask_bug=True))
    # with a positive wrong logit both agree
    z2 = torch.tensor([[2.0, 1.0, -3.0]])
    assert cw(z2, y).item() == cw(z2, y, mask_bug=True).item()


def test_dlr_equals_pyautoattack():
    from pyautoattack.autopgd_base import APGDAttack

    z = torch.randn(16, 10)
    y = torch.randint(0, 10, (16,))
    ref = APGDAttack(lambda t: t, eps=0.1, device="cpu").dlr_loss(z, y)
    assert torch.allclose(dlr(z, y), ref)
    from pyautoattack.autopgd_base import APGDAttack_targeted

    tgt = (y + 1) % 10
    apgd_t = APGDAttack_targeted(lambda t: t, eps=0.1, device="cpu")
    apgd_t.y_target = tgt
    assert torch.allclose(get_loss("dlr")(z, y, tgt), apgd_t.dlr_loss_targeted(z, y))


def test_loss_names_and_errors():
    assert get_loss("cw", kappa=0.1).kappa == 0.1
    with pytest.raises(ConfigError, match="allowed: ce, cw, dlr, feature_mse"):
        get_loss("hinge")
    assert not AttackLoss("feature_mse").classifies


def test_targeted_loss_moves_toward_target(net, batch):
    x, y = batch
    tgt = (y + 3) % 10
    res = iterative_attack(net, x, y, 0.3, steps=20, step_size=0.03, targeted=tgt)
    with torch.no_grad():
        p0 = F.softmax(net(x), 1).gather(1, tgt[:, None]).mean()
        p1 = F.softmax(net(res.x_adv), 1).gather(1, tgt[:, None]).mean()
    assert p1 > p0 + 0.2
    # the registered 'random' target is drawn over the wrong classes; accuracy is w.r.t. the true label
    from robbench.attacks.registered import _targets
    t = _targets(net, x, y, "random", 0)
    assert t is not None and not (t == y).any() and len(set(t.tolist())) > 3
    res = make_attack("pgd", targeted="random", steps=20, step_size=0.03)(net, x, y, 0.3)
    assert torch.equal(res.fooled, _fooled(net, res.x_adv, y))
    assert res.fooled.float().mean() > 0.5


# ----------------------------------------------------------------------------------------------
# core behaviour
# ----------------------------------------------------------------------------------------------

def test_early_stop_changes_no_result_and_saves_work(net, batch):
    x, y = batch
    kw = dict(steps=10, step_size=0.02, restarts=4, seed=0)
    full = iterative_attack(net, x, y, 0.08, early_stop=False, **kw)
    early = iterative_attack(net, x, y, 0.08, early_stop=True, **kw)
    assert torch.equal(full.fooled, early.fooled)
    # a restart that ran gives the same verdict as in the full run
    assert torch.equal(early.fooled_per_restart[early.ran], full.fooled_per_restart[early.ran])
    assert early.stats["grad"] < full.stats["grad"]
    # step-level early stop = "fooled at any iterate" = keep='best' flags
    step = iterative_attack(net, x, y, 0.08, early_stop="step", **kw)
    best = iterative_attack(net, x, y, 0.08, keep="best", **kw)
    assert torch.equal(step.fooled, best.fooled)
    assert torch.equal(_fooled(net, step.x_adv, y), step.fooled)
    assert step.stats["grad"] < early.stats["grad"]


def test_keep_best_never_worse_than_last(net, batch):
    x, y = batch
    kw = dict(steps=8, step_size=0.03, seed=5, loss="cw")
    last = iterative_attack(net, x, y, 0.06, keep="last", **kw)
    best = iterative_attack(net, x, y, 0.06, keep="best", **kw)
    assert (best.fooled | ~last.fooled).all()  # best fools every sample last fools
    both = ~best.fooled & ~last.fooled
    assert (best.objective[both] >= last.objective[both] - 1e-6).all()
    assert torch.equal(_fooled(net, best.x_adv, y), best.fooled)  # the recorded iterate is the one returned


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_projection_keeps_budget_and_box(net, batch, norm):
    x, y = batch
    eps = torch.linspace(0.02, 0.3, len(x)) if norm == "linf" else torch.linspace(0.2, 2.0, len(x))
    res = iterative_attack(net, x, y, eps, norm=norm, steps=6, step_size=eps / 3, restarts=2)
    d = (res.x_adv - x).flatten(1)
    size = d.abs().max(1).values if norm == "linf" else d.norm(dim=1)
    assert (size <= eps * (1 + 1e-5) + 1e-7).all()
    assert res.x_adv.min() >= 0.0 and res.x_adv.max() <= 1.0
    assert (size > 0.5 * eps).float().mean() > 0.5  # it does use the budget


def test_eps_batching_with_tiles_equals_separate_runs(net, batch):
    x, y = batch[0][:16], batch[1][:16]
    e1, e2 = 0.05, 0.1
    xx, yy = torch.cat([x, x]), torch.cat([y, y])
    eps = torch.tensor([e1] * 16 + [e2] * 16)
    tiled = iterative_attack(net, xx, yy, eps, steps=5, step_size=eps / 5, seed=2, tiles=2, restarts=2)
    for i, e in enumerate((e1, e2)):
        sep = iterative_attack(net, x, y, e, steps=5, step_size=e / 5, seed=2, restarts=2)
        assert (tiled.x_adv[16 * i:16 * (i + 1)] - sep.x_adv).abs().max().item() <= 1e-6
        assert torch.equal(tiled.fooled[16 * i:16 * (i + 1)], sep.fooled)
    # any packing of (eps, sample) pairs: init_rows names each row's sample in the base batch
    pick = torch.tensor([3, 0, 7, 3, 15])
    packed = iterative_attack(net, x[pick], y[pick], torch.tensor([e1, e1, e1, e2, e2]), steps=5,
                              step_size=torch.tensor([e1, e1, e1, e2, e2]) / 5, seed=2, init_rows=pick,
                              init_base=16)
    full1 = iterative_attack(net, x, y, e1, steps=5, step_size=e1 / 5, seed=2)
    full2 = iterative_attack(net, x, y, e2, steps=5, step_size=e2 / 5, seed=2)
    want = torch.stack([full1.x_adv[3], full1.x_adv[0], full1.x_adv[7], full2.x_adv[3], full2.x_adv[15]])
    assert (packed.x_adv - want).abs().max().item() <= 1e-6


@pytest.mark.parametrize("mode", ["last", "best", "step"])
def test_record_steps_match_separate_runs(net, batch, mode):
    x, y = batch
    counts = (0, 2, 5, 12)
    kw = dict(step_size=0.01, restarts=2, seed=7)
    kw.update({"last": dict(keep="last"), "best": dict(keep="best"), "step": dict(early_stop="step")}[mode])
    one = iterative_attack(net, x, y, 0.05, steps=12, record_steps=counts, early_stop=kw.pop("early_stop", True),
                           **kw)
    sep_stop = "step" if mode == "step" else False
    for s in counts:
        sep = iterative_attack(net, x, y, 0.05, steps=s, early_stop=sep_stop, **kw)
        assert torch.equal(one.step_correct[s], ~sep.fooled), s
    assert one.step_correct[0].float().mean() > one.step_correct[12].float().mean()


def test_no_param_grads_and_mode_untouched(net, batch):
    x, y = batch
    for p in net.parameters():
        p.grad = None  # peer libraries (advertorch: loss.backward()) leave them on the shared fixture
    net.train()
    try:
        iterative_attack(net, x, y, 0.05, steps=2, step_size=0.01, evaluate=False)
        assert net.training
    finally:
        net.eval()
    iterative_attack(net, x, y, 0.05, steps=2, step_size=0.01)
    assert not net.training
    assert all(p.grad is None for p in net.parameters())


def test_feature_distillation_descends_mse(net, batch):
    """DVERGE Linf_distillation: momentum, no random start, descend on MSE to the target's features."""
    x, y = batch
    feats = net[:4]
    xs, xt = x[:16], x[16:32]
    target_calls = []

    def target() -> torch.Tensor:  # recomputed every step, as the reference does
        target_calls.append(1)
        return feats(xt)

    res = iterative_attack(feats, xs, y[:16], 0.07, steps=10, step_size=0.007, loss="feature_mse", init="none",
                           momentum=1.0, descend=True, feature_target=target, evaluate=False)
    with torch.no_grad():
        before = feature_mse(feats(xs), feats(xt)).mean()
        after = feature_mse(feats(res.x_adv), feats(xt)).mean()
    assert after < 0.9 * before
    assert len(target_calls) == 10 and res.stats == {"grad": 160, "eval": 0}
    assert (res.x_adv - xs).abs().max() <= 0.07 + 1e-6


@pytest.mark.parametrize("momentum", [None, 1.0])
def test_iterate_x_equals_dverge_linf_pgd_to_the_bit(net, batch, momentum):
    """iterate='x' is the DVERGE reference's in-place update; 'delta' (advertorch's form) is not, to the bit.
    Batch 64: CE mean and the core's per-sample CE sum differ by a power of 2, so the gradients match."""
    x, y = batch
    want = dverge_reference.linf_pgd(net, x, y, 0.1, 0.01, 10, momentum is not None)
    for p in net.parameters():
        p.grad = None
    got = iterative_attack(net, x, y, 0.1, steps=10, step_size=0.01, init="none", momentum=momentum,
                           iterate="x", evaluate=False).x_adv
    assert torch.equal(got, want)
    assert (got - x).abs().max() <= 0.1 + 1e-6 and (got != x).float().mean() > 0.3
    delta_form = iterative_attack(net, x, y, 0.1, steps=10, step_size=0.01, init="none", momentum=momentum,
                                  evaluate=False).x_adv
    assert (delta_form - want).abs().max() < 0.05  # same attack up to rounding (and rare sign flips)
    with pytest.raises(ValueError, match="linf"):
        iterative_attack(net, x, y, 0.5, norm="l2", steps=1, step_size=0.1, iterate="x")
    with pytest.raises(ValueError, match="iterate"):
        iterative_attack(net, x, y, 0.1, steps=1, step_size=0.01, iterate="adv")


def test_clean_or_uniform_init_is_one_draw_per_batch():
    x = torch.full((64, 1, 4, 4), 0.5)
    eps = torch.full((64, 1, 1, 1), 0.1)
    clean = 0
    for s in range(40):
        d = draw_init(x, eps, "clean_or_uniform", "linf", torch.Generator().manual_seed(s), clean_prob=0.2)
        assert d.abs().max() == 0 or (d.flatten(1).abs().max(1).values > 0).all()  # all clean or none
        clean += int(d.abs().max() == 0)
    assert 2 <= clean <= 16  # about 20% of 40 batches


def test_momentum_update_is_l1_normalised_per_sample():
    g0 = torch.zeros(2, 1, 2, 2)
    grad = torch.tensor([1.0, -3.0, 0.0, 0.0, 10.0, 10.0, 0.0, 0.0]).view(2, 1, 2, 2)
    g1 = momentum_update(g0, grad, 1.0, 1e-12)
    assert torch.allclose(g1.flatten(1).abs().sum(1), torch.ones(2))
    g2 = momentum_update(g1, grad, 1.0, 1e-12)
    assert torch.allclose(g2, 2 * g1)


def test_diverse_input_scales_and_is_seeded():
    di = DiverseInput(p=0.5)
    assert di.sizes(32) == (32, 35, 36)  # CIFAR: U{32..35}, pad to 36
    assert di.sizes(8) == (8, 8, 9)
    x = torch.rand(4, 3, 32, 32)
    assert torch.equal(DiverseInput(p=0.0)(x, torch.Generator().manual_seed(0)), x)
    out = DiverseInput(p=1.0)(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and not torch.equal(out, x)
    again = DiverseInput(p=1.0)(x, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    raw = DiverseInput(p=1.0, resize_back=False)(x, torch.Generator().manual_seed(0))
    assert raw.shape[-1] == 36
    applied = sum(not torch.equal(di(x, torch.Generator().manual_seed(s)), x) for s in range(40))
    assert 10 <= applied <= 30


def test_mdi2_and_labels_from_prediction_run(net, batch):
    x, y = batch
    attack = make_attack("pgd", steps=5, momentum=1.0, di_prob=0.5, init="none", labels_from="prediction")
    res = attack(net, x, y, 0.1)
    assert res.fooled.float().mean() > 0.1
    assert (res.x_adv - x).abs().max() <= 0.1 + 1e-6


def test_registered_attacks_and_option_errors():
    assert {"fgsm", "pgd", "deepfool", "autoattack"} <= set(ATTACKS.names())
    with pytest.raises(ConfigError, match="step_size or rel_step"):
        make_attack("pgd", step_size=0.01, rel_step=0.2)
    with pytest.raises(ConfigError, match="loss"):
        make_attack("pgd", loss="hinge")
    with pytest.raises(ConfigError, match="record_steps"):
        make_attack("pgd", steps=10, record_steps=[20])
    with pytest.raises(ConfigError, match="custom"):
        make_attack("autoattack", attacks=["apgd-ce"])
    with pytest.raises(ConfigError, match="attacks"):
        make_attack("autoattack", version="custom", attacks=["nope"])


def test_registered_pgd_rel_step_is_eps_over_5(net, batch):
    x, y = batch
    res = make_attack("pgd", steps=1, init="none", restarts=1)(net, x, y, 0.05)  # default rel_step 0.2
    d = (res.x_adv - x).abs()
    moved = d[d > 0]
    assert torch.allclose(moved.max(), torch.tensor(0.01), atol=1e-6)
