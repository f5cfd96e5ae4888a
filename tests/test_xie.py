"""Xie & Yuille (ICLR 2020) training: the training attack, every strategy option, the deployed MBN branch,
and the ImageNet pipeline pieces (weight decay on conv/fc only, per-step warm-up, label smoothing),
each on a case whose answer is known by hand."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robbench.config import load_entry
from robbench.data import get_info
from robbench.errors import ConfigError
from robbench.models import MixtureBN, build_model
from robbench.models.xie_deploy import deployed_route
from robbench.registry import METHODS
from robbench.train.loop import DistEnv, TrainContext, build_optimizers
from robbench.train.methods import Batch
from robbench.train.methods.xie import random_wrong_targets, training_attack_options
from robbench.train.optim_decay import add_weight_decay_, conv_fc_weights, l2_term
from robbench.train.optim_warmup import linear_scaled_lr, warmup_lr

TINY = ["model.width=0.25", "train.params.adv_steps=2"]


def _ctx(entry, seed=0):
    torch.manual_seed(seed)
    model = build_model(entry, get_info("digits")).train()
    opts = build_optimizers(model, list(model.members), entry.train.optimizer)
    return TrainContext(entry=entry, model=model, optimizers=opts, device=torch.device("cpu"), dist=DistEnv(),
                        seed=0, num_classes=10)


def _method(entry, ctx):
    m = METHODS.get("xie")(entry.method_params)
    m.setup(ctx)
    return m


def _batch(n=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def _bns(model):
    return [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


def _bn_state(model):
    return [(b.running_mean.clone(), b.running_var.clone(), int(b.num_batches_tracked)) for b in _bns(model)]


# ---------------------------------------------------------------------------------------------------
# the training attack
# ---------------------------------------------------------------------------------------------------

def test_training_attack_is_the_papers_targeted_pgd_as_data():
    o = load_entry("xie_resnet152_r0").method_params
    p = training_attack_options(o)
    assert (p.norm, p.loss, p.steps, p.restarts, p.targeted) == ("linf", "ce", 30, 1, "random")
    assert p.step_size == pytest.approx(1 / 255) and o.adv_eps == pytest.approx(16 / 255)
    assert (p.init, p.clean_prob, p.keep, p.early_stop) == ("clean_or_uniform", 0.2, "last", False)
    # N = 5: paper footnote 6 alpha = 4 (given) vs the reference max(alpha, eps/N) = 3.2
    o5 = load_entry("xie_resnet152_r0_pgd5").method_params
    assert training_attack_options(o5).step_size == pytest.approx(4 / 255)
    o5.adv_step_rule, o5.adv_step = "max_eps_over_steps", 1 / 255
    assert training_attack_options(o5).step_size == pytest.approx(3.2 / 255)


def test_random_targets_are_uniform_over_the_wrong_classes():
    torch.manual_seed(0)
    y = torch.full((9000,), 3)
    t = random_wrong_targets(y, 10)
    assert not (t == y).any()
    counts = torch.bincount(t, minlength=10).float()
    assert counts[3] == 0 and ((counts[counts > 0] - 1000).abs() < 150).all()  # 9 classes x ~1000


def test_attack_moves_toward_the_target_and_leaves_bn_statistics_and_modes_alone():
    entry = load_entry("demo_xie_r0", TINY + ["train.params.adv_steps=5"])
    ctx = _ctx(entry)
    m = _method(entry, ctx)
    x, y = _batch(32)
    ctx.model.train()
    net = ctx.members[0]
    before = _bn_state(net)
    t = random_wrong_targets(y, 10)
    x_adv = m.craft(net, x, y, t, mbn=False)
    after = _bn_state(net)
    for (m0, v0, n0), (m1, v1, n1) in zip(before, after):
        assert torch.equal(m0, m1) and torch.equal(v0, v1) and n0 == n1
    assert all(mod.training for mod in net.modules())  # train mode restored
    assert (x_adv - x).abs().max() <= entry.method_params.adv_eps + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():
        net.eval()
        ce_clean = F.cross_entropy(net(x), t)
        ce_adv = F.cross_entropy(net(x_adv), t)
    assert ce_adv < ce_clean  # descends CE towards the target


def test_clean_start_coin_is_one_draw_per_batch():
    entry = load_entry("demo_xie_r0", TINY + ["train.params.adv_steps=1", "train.params.adv_step=0.0"])
    ctx = _ctx(entry)
    m = _method(entry, ctx)
    x, y = _batch(4)
    starts = []
    for s in range(40):
        torch.manual_seed(s)
        d = (m.craft(ctx.members[0], x, y, random_wrong_targets(y, 10), mbn=False) - x).abs().flatten(1).amax(1)
        assert bool((d == 0).all()) or bool((d > 0).all())  # the whole batch starts clean, or none does
        starts.append(bool((d == 0).all()))
    assert 2 <= sum(starts) <= 16  # P(clean) = 0.2 over 40 batches


# ---------------------------------------------------------------------------------------------------
# strategies
# ---------------------------------------------------------------------------------------------------

def _one_step(entry, x, y, seed=0):
    ctx = _ctx(entry, seed)
    m = _method(entry, ctx)
    torch.manual_seed(123)
    logs = m.step(ctx, Batch(x, y))
    return ctx, m, logs


def test_clean_ratio_one_with_zero_eps_equals_clean_training():
    """r = 1 and eps = 0: the batch is [x, x], so the mean CE, the BN batch mean and the gradients are
    those of clean training on x (adversarial = false)."""
    x, y = _batch(16)
    mixed = load_entry("demo_xie_r0", TINY + ["train.params.clean_ratio=1.0", "train.params.adv_eps=0.0",
                                              "train.params.adv_steps=1"])
    clean = load_entry("demo_xie_r0", TINY + ["train.params.adversarial=false"])
    ca, _, la = _one_step(mixed, x, y)
    cb, _, lb = _one_step(clean, x, y)
    assert la["loss"] == pytest.approx(lb["loss"], rel=1e-5)
    for pa, pb in zip(ca.model.parameters(), cb.model.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-6)
    for ba, bb in zip(_bns(ca.model), _bns(cb.model)):
        torch.testing.assert_close(ba.running_mean, bb.running_mean, rtol=1e-4, atol=1e-6)


def test_clean_training_loss_is_label_smoothed_ce_by_hand():
    x, y = _batch(8)
    entry = load_entry("demo_xie_r0", TINY + ["train.params.adversarial=false"])
    ctx = _ctx(entry)
    m = _method(entry, ctx)
    net = ctx.members[0]
    state = {k: v.clone() for k, v in net.state_dict().items()}
    loss, _ = m.objective(ctx, net, False, x, y)
    net.load_state_dict(state)
    logp = torch.log_softmax(net(x), 1)
    ls = 0.1  # tf.losses.softmax_cross_entropy: targets (1 - ls) * onehot + ls / K
    target = (1 - ls) * F.one_hot(y, 10) + ls / 10
    assert float(loss.detach()) == pytest.approx(float(-(target * logp).sum(1).mean()), rel=1e-5)


class _Linear(nn.Module):
    """A BN-free member whose logits are easy to compute by hand."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc(x.flatten(1))


def _stub_ctx(entry, net):
    model = nn.Module()
    model.members = nn.ModuleList([net])
    opts = build_optimizers(model, [net], entry.train.optimizer)
    return TrainContext(entry=entry, model=model, optimizers=opts, device=torch.device("cpu"), dist=DistEnv(),
                        seed=0, num_classes=10)


@pytest.mark.parametrize("reduction,weighting", [("mean", "per_image"), ("pair_sum", "per_image"), ("mean", "eq1")])
def test_alp_and_mixture_loss_values_on_a_known_case(reduction, weighting):
    sets = ["train.params.clean_ratio=0.5", "train.params.alp_weight=0.5", f"train.params.alp_reduction={reduction}",
            f"train.params.loss_weighting={weighting}", "train.params.label_smoothing=0.0"]
    entry = load_entry("demo_xie_r0", TINY + sets)
    torch.manual_seed(0)
    net = _Linear()
    ctx = _stub_ctx(entry, net)
    m = _method(entry, ctx)
    x, y = _batch(8)
    x_adv = (x + 0.1).clamp(0, 1)
    m.craft = lambda *a, **k: x_adv  # inject the adversarial images
    loss, logs = m.objective(ctx, net, False, x, y)
    with torch.no_grad():
        zc, za = net(x[:4]), net(x_adv)
        d2 = (zc - za[:4]) ** 2
        alp = d2.mean() if reduction == "mean" else d2.sum(1).mean()
        if weighting == "per_image":  # mean over the 4 clean + 8 adversarial images
            ce = (F.cross_entropy(zc, y[:4], reduction="sum") + F.cross_entropy(za, y, reduction="sum")) / 12
        else:  # Eq. 1, alpha = 0.5
            ce = 0.5 * F.cross_entropy(zc, y[:4]) + 0.5 * F.cross_entropy(za, y)
    assert logs["alp"] == pytest.approx(float(alp), rel=1e-5)
    assert float(loss) == pytest.approx(float(ce + 0.5 * alp), rel=1e-5)


def test_alp_needs_clean_images():
    with pytest.raises(ConfigError, match="train.params.alp_weight.*clean_ratio > 0"):
        load_entry("demo_xie_r0", ["train.params.alp_weight=0.5"])


def test_bn_statistics_move_once_per_step_on_the_mixture():
    """Plain BN: the attack leaves the statistics alone, the one training forward of cat(clean, adv)
    updates them once."""
    x, y = _batch(16)
    entry = load_entry("demo_xie_r0", TINY + ["train.params.clean_ratio=0.5"])
    ctx, _, logs = _one_step(entry, x, y)
    assert {int(b.num_batches_tracked) for b in _bns(ctx.model)} == {1}
    assert {"clean_ce", "adv_ce", "attack_success"} <= set(logs)


@pytest.mark.parametrize("ratio", [0.0, 0.5])
def test_mixture_bn_routes_clean_and_adversarial_images_to_their_own_statistics(ratio):
    sets = ["model.norm_layer=mbn", f"train.params.clean_ratio={ratio}"]
    entry = load_entry("demo_xie_r0", TINY + sets)
    ctx = _ctx(entry)
    m = _method(entry, ctx)
    net = ctx.members[0]
    assert deployed_route(net) == "adv"
    x, y = _batch(16)
    x_adv = (x + 0.05).clamp(0, 1)
    m.craft = lambda *a, **k: x_adv
    first = next(mod for mod in net.modules() if isinstance(mod, MixtureBN))  # after the stem conv
    with torch.no_grad():
        feats = lambda inp: net.conv1(net.normalize(inp))  # noqa: E731  (the first MBN's input, before the update)
        want_adv = 0.1 * feats(x_adv).mean(dim=(0, 2, 3))
        want_clean = 0.1 * feats(x[:8]).mean(dim=(0, 2, 3))
    m.step(ctx, Batch(x, y))
    torch.testing.assert_close(first.bn_adv.running_mean, want_adv, rtol=1e-4, atol=1e-6)
    if ratio:
        torch.testing.assert_close(first.bn_clean.running_mean, want_clean, rtol=1e-4, atol=1e-6)
        assert int(first.bn_clean.num_batches_tracked) == 1
    else:
        assert int(first.bn_clean.num_batches_tracked) == 0 and not first.bn_clean.running_mean.any()
    assert int(first.bn_adv.num_batches_tracked) == 1
    assert deployed_route(net) == "adv"  # training restores the deployed branch


def test_deployed_branch_is_a_recorded_model_option():
    adv = load_entry("demo_xie_mbn_r100")
    cln = load_entry("demo_xie_mbn_r100_clean")
    assert adv.model.norm_layer == cln.model.norm_layer == "mbn"
    assert adv.resolved()["model"]["transform_options"]["deploy_route"] == "adv"
    assert cln.resolved()["model"]["transform_options"]["deploy_route"] == "clean"
    assert cln.train.init_from == "demo_xie_mbn_r100" and cln.train.epochs == 0  # same weights, other branch
    info = get_info("digits")
    torch.manual_seed(0)
    a = build_model(adv, info)
    torch.manual_seed(0)
    c = build_model(cln, info)
    assert deployed_route(a) == "adv" and deployed_route(c) == "clean"
    x, _ = _batch(8)
    a.eval(), c.eval()
    with torch.no_grad():  # fresh MBN: both branches have the same init, so change one branch's statistics
        for mod in a.modules():
            if isinstance(mod, MixtureBN):
                mod.bn_adv.running_mean.fill_(0.5)
        c.load_state_dict(a.state_dict())
        assert not torch.allclose(a(x), c(x))  # the branch decides the output


def test_reference_input_normalization_maps_pixels_to_minus_one_one():
    e = load_entry("xie_resnet152_r0")
    assert e.model.transform == "xie"
    from robbench.models.xie_deploy import XieModelOptions, xie_transform

    net = nn.Module()
    net.normalize = nn.Identity()
    xie_transform(net, XieModelOptions(), info=get_info("digits"))
    x = torch.tensor([0.0, 0.5, 1.0]).view(1, 1, 3, 1)
    assert net.normalize(x).flatten().tolist() == [-1.0, 0.0, 1.0]


def test_running_statistics_are_frozen_in_the_last_k_epochs():
    x, y = _batch(16)
    entry = load_entry("demo_xie_r0", TINY + ["train.params.running_stats_last_epochs=2", "train.epochs=5"])
    for epoch, moves in ((2, True), (3, False), (4, False)):
        ctx = _ctx(entry)
        m = _method(entry, ctx)
        ctx.epoch = epoch
        before = _bn_state(ctx.model)
        params = [p.detach().clone() for p in ctx.model.parameters()]
        m.step(ctx, Batch(x, y))
        after = _bn_state(ctx.model)
        assert all((n1 == n0 + 1) == moves for (_, _, n0), (_, _, n1) in zip(before, after))
        assert not all(torch.equal(a, b) for a, b in zip(params, ctx.model.parameters()))  # still trains
        assert ctx.model.training


def test_micro_batches_accumulate_to_the_whole_batch_gradient():
    """GroupNorm has no batch dependence: two micro-batches of 8 (gradient accumulation, mean of the
    chunk means) give the update of one batch of 16 (eps 0: no random start to differ)."""
    x, y = _batch(16)
    base = TINY + ["model.norm_layer=gn", "train.params.clean_ratio=1.0", "train.params.adv_eps=0.0"]
    whole, _, _ = _one_step(load_entry("demo_xie_r0", base), x, y)
    micro, _, _ = _one_step(load_entry("demo_xie_r0", base + ["train.params.micro_batch=8"]), x, y)
    for pa, pb in zip(whole.model.parameters(), micro.model.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------------
# pipeline: weight decay on conv/fc weights, warm-up, linear scaling
# ---------------------------------------------------------------------------------------------------

def test_weight_decay_selects_conv_and_fc_weights_only():
    net = nn.Sequential(nn.Conv2d(1, 4, 3, bias=True), nn.BatchNorm2d(4), nn.GroupNorm(2, 4), nn.Flatten(),
                        nn.Linear(4 * 36, 3))
    chosen = {id(p) for p in conv_fc_weights(net)}
    assert chosen == {id(net[0].weight), id(net[4].weight)}
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    add_weight_decay_(conv_fc_weights(net), 1e-2)
    torch.testing.assert_close(net[0].weight.grad, 1e-2 * net[0].weight.detach())
    assert not net[0].bias.grad.any() and not net[1].weight.grad.any() and not net[4].bias.grad.any()
    w = net[4].weight.detach()
    assert float(l2_term([net[4].weight], 1e-2)) == pytest.approx(float(1e-2 * 0.5 * (w ** 2).sum()), rel=1e-6)


def test_method_moves_the_optimizer_decay_onto_conv_fc_weights():
    """One step equals SGD with weight_decay on the conv/fc weights only and 0 elsewhere."""
    x, y = _batch(16)
    entry = load_entry("demo_xie_r0", TINY + ["train.params.adversarial=false", "train.optimizer.weight_decay=0.05"])
    ctx, m, _ = _one_step(entry, x, y)
    assert all(g["weight_decay"] == 0.0 for o in ctx.optimizers for g in o.param_groups)
    # the same step by hand: plain SGD, param groups with decay on conv/fc weights only
    torch.manual_seed(0)
    ref = build_model(entry, get_info("digits")).train()
    decay = {id(p) for p in conv_fc_weights(ref)}
    groups = [{"params": [p for p in ref.parameters() if id(p) in decay], "weight_decay": 0.05},
              {"params": [p for p in ref.parameters() if id(p) not in decay], "weight_decay": 0.0}]
    o = entry.train.optimizer
    sgd = torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov)
    loss = F.cross_entropy(ref(x), y, label_smoothing=0.1)
    sgd.zero_grad()
    loss.backward()
    sgd.step()
    for pa, pb in zip(ctx.model.parameters(), ref.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-7)


def test_warmup_is_linear_per_step_from_0_1_as_main_py():
    base = linear_scaled_lr(4096)
    assert base == pytest.approx(1.6)  # 0.1 * 4096 // 256
    assert linear_scaled_lr(1000) == pytest.approx(0.3)  # integer division as main.py
    n = 5 * 313
    assert warmup_lr(base, 0.1, 0, n) == pytest.approx(0.1)
    assert warmup_lr(base, 0.1, n // 2, n) == pytest.approx(0.1 + 1.5 * (n // 2) / n)
    assert warmup_lr(base, 0.1, n, n) is None
    assert warmup_lr(0.1, 0.1, 0, n) is None  # main.py: only if BASE_LR > 0.1


def test_method_sets_the_warmup_lr_every_step():
    sets = TINY + ["train.params.adversarial=false", "train.optimizer.lr=0.4", "train.schedule.warmup_epochs=2"]
    entry = load_entry("demo_xie_r0", sets)
    ctx = _ctx(entry)
    m = _method(entry, ctx)
    spe = math.ceil(1347 / 128)  # digits train split, batch 128
    x, y = _batch(8)
    for epoch, b, want in ((0, 0, 0.1), (0, 5, 0.1 + 0.3 * 5 / (2 * spe)), (1, 3, 0.1 + 0.3 * (spe + 3) / (2 * spe))):
        ctx.epoch, ctx.step, ctx.global_step = epoch, b, epoch * spe + b
        m.step(ctx, Batch(x, y))
        assert ctx.optimizers[0].param_groups[0]["lr"] == pytest.approx(want)
        assert ctx.extras["log_last_step_lr"] == pytest.approx(want)


# ---------------------------------------------------------------------------------------------------
# zoo
# ---------------------------------------------------------------------------------------------------

def test_imagenet_entries_carry_the_papers_pipeline():
    e = load_entry("xie_resnet152_r0")
    o, s, p = e.train.optimizer, e.train.schedule, e.method_params
    assert (e.model.arch, e.model.options["depth"], e.model.norm_layer) == ("resnet_imagenet", 152, "bn")
    assert (e.data.dataset, e.data.batch_size, p.micro_batch) == ("imagenet", 4096, 32)
    assert (o.name, o.lr, o.momentum, o.nesterov, o.weight_decay) == ("sgd", pytest.approx(1.6), 0.9, True, 1e-4)
    assert (e.train.epochs, s.milestones, s.gamma, s.warmup_epochs) == (110, [35, 70, 95], 0.1, 5)
    assert (p.label_smoothing, p.weight_decay_params, p.clean_ratio, p.adv_steps) == (0.1, "conv_fc_weights", 0.0, 30)
    assert load_entry("xie_resnet152_r100").method_params.clean_ratio == 1.0
    assert load_entry("xie_resnet152_r100_alp").method_params.alp_weight == 0.5
    assert load_entry("xie_resnet152_mbn_r100").model.norm_layer == "mbn"
    assert load_entry("xie_resnet152_gn_r100").model.norm_layer == "gn"
    assert load_entry("xie_resnet152_r0_star").method_params.running_stats_last_epochs == 10
    for b in (512, 1024, 2048, 8192):  # Table 6: lr follows 0.1 * batch / 256
        eb = load_entry(f"xie_resnet152_r0_star_batch{b}")
        assert eb.data.batch_size == b and eb.train.optimizer.lr == pytest.approx(0.1 * b / 256)
    for d in (200, 338, 518, 638):  # Figure 7 / Table 7
        assert load_entry(f"xie_resnet{d}_r0_star").model.options["depth"] == d


def test_cifar_variant_follows_the_reference_cifar10_script():
    e = load_entry("xie_cifar10_resnet20_r0")
    p, o = e.method_params, e.train.optimizer
    a = training_attack_options(p)
    assert (a.targeted, a.steps, a.clean_prob) == ("none", 10, 0.0)
    assert a.step_size == pytest.approx(2 / 255) and p.adv_eps == pytest.approx(8 / 255)
    assert (o.lr, o.weight_decay, o.nesterov, p.weight_decay_params, p.label_smoothing) == (0.1, 2e-4, False, "all", 0.0)
    assert (e.train.epochs, e.train.schedule.milestones, e.data.batch_size) == (200, [100, 150], 128)


def test_untargeted_option_ascends_the_true_label_ce():
    entry = load_entry("demo_xie_r0", TINY + ["train.params.adv_target=none", "train.params.adv_steps=3",
                                              "train.params.adv_clean_start_prob=1.0"])
    ctx = _ctx(entry)
    m = _method(entry, ctx)
    x, y = _batch(16)
    net = ctx.members[0]
    x_adv = m.craft(net, x, y, None, mbn=False)
    with torch.no_grad():
        net.eval()
        assert F.cross_entropy(net(x_adv), y) > F.cross_entropy(net(x), y)
    net.train()
    logs = m.step(ctx, Batch(x, y))
    assert "attack_success" not in logs and math.isfinite(logs["loss"])


# ---------------------------------------------------------------------------------------------------
# the paper's claims at digits scale (issue #11): demo_xie_* trained as `robbench train` does, attacked
# with protocols/demo-xie.toml's targeted PGD-200 (eps 0.2, step eps/16, all 450 test images).
# One module fixture trains and attacks each entry once for every claim; each claim asserts what held at
# seed 0 with a margin. Only the pgd200 attack runs: no claim reads the protocol's pgd10. All 450 images
# are kept because the margins need them: on the first 150 / 225 / 300 images at seed 0, MBN - BN is
# 1.3 / 3.6 / 3.3 points (4.9 on all 450) and r0 - r100 6.0 / 5.8 / 6.7 (8.2); per-image outcomes do not
# depend on the subset, so these were read from the 450-image runs.
# ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits_xie(tmp_path_factory):
    """entry -> {(attack, steps): accuracy %} on demo-xie's pgd200, training and attacking each entry once."""
    import dataclasses

    from robbench.evaluate.engine import evaluate_protocol
    from robbench.evaluate.protocol import load_protocol
    from robbench.store import Store
    from robbench.train.run import train_entry

    proto = load_protocol("demo-xie")
    proto = dataclasses.replace(proto, attacks=[a for a in proto.attacks if a.id == "pgd200"])
    root = tmp_path_factory.mktemp("xie_digits")
    runs, db = root / "runs", root / "robbench.db"
    cache: dict[str, dict] = {}

    def measure(entry: str) -> dict:
        if entry not in cache:
            train_entry(f"zoo/{entry}", runs_dir=runs, progress=False, memory_format="contiguous")
            run_id = evaluate_protocol(proto, [entry], runs_dir=runs, db=db, quiet=True,
                                       memory_format="contiguous")[entry]
            with Store(db) as st:
                df = st.outcomes(run_id)
            df = df[df["member"] == -1]
            acc = df.groupby(["attack", "steps"])["correct"].mean() * 100
            cache[entry] = {k: float(v) for k, v in acc.items()} | {"n": int(df["sample"].nunique())}
        return cache[entry]

    return measure


@pytest.mark.slow
def test_digits_bn_fewer_clean_images_give_higher_targeted_pgd_accuracy(digits_xie):
    """§4.1 / Figure 1: with BatchNorm, fewer clean images give higher PGD-2000 accuracy (ImageNet:
    r = 0 39.2%, r = 1 20.9%). Digits at PGD-200 (contiguous format): r = 0 61.1 / 66.4 / 64.9% and
    r = 1 52.9 / 59.1 / 48.4% at seeds 0 / 1 / 2 (+8.2, +7.3, +16.4). Not asserted: the reference's PGD-10
    (step eps/10), where r = 0 leads by only +1.1 / +0.2 / +9.8 points, and the issue's r = 0 vs r = 0.5,
    which does not hold reliably here (r = 0.5 gave 64.0% at seed 0, above r = 0, in an earlier
    measurement; 62.2 / 53.1% at seeds 1 / 2, below)."""
    r0, r100 = digits_xie("demo_xie_r0"), digits_xie("demo_xie_r100")
    assert r0["n"] == r100["n"] == 450
    assert r0[("pgd200", 200)] >= r100[("pgd200", 200)] + 5.0


@pytest.mark.slow
def test_digits_mbn_adv_is_at_least_as_robust_as_bn_on_the_same_mixture(digits_xie):
    """§4.2 / Tables 1-2: MBN_adv trained on 100% adv + 100% clean secures robustness that plain BN on the
    same mixture loses (ImageNet PGD-2000 38.3% vs 20.9%). Digits at PGD-200: MBN_adv 57.8 / 58.2 / 53.6%,
    BN 52.9 / 59.1 / 48.4% at seeds 0 / 1 / 2 (+4.9, -0.9, +5.1): it holds at seeds 0 and 2 only, so the
    seed-0 assertion is a measurement of that seed, not of every seed."""
    mbn, bn = digits_xie("demo_xie_mbn_r100"), digits_xie("demo_xie_r100")
    assert mbn["n"] == 450
    assert mbn[("pgd200", 200)] >= bn[("pgd200", 200)] + 3.0


@pytest.mark.slow
def test_digits_targeted_pgd_accuracy_falls_then_levels_off_in_one_run(digits_xie):
    """Figure 2: accuracy falls with more iterations and, for 100% adv + 0% clean, levels off. One
    200-step run records every count (pgd200@steps=K rows of one store run). Digits, seed 0:
    86.0 / 72.2 / 62.4 / 61.3 / 61.1 % at 10 / 20 / 50 / 100 / 200 steps (seeds 1 / 2: 88.4 -> 66.4,
    88.7 -> 64.9, unchanged from 100 to 200)."""
    r0 = digits_xie("demo_xie_r0")
    curve = [r0[("pgd200", k)] for k in (10, 20, 50, 100, 200)]
    assert all(b <= a + 0.5 for a, b in zip(curve, curve[1:]))  # never rises by more than 2 of 450 samples
    assert curve[0] - curve[-1] >= 15.0                          # falls from 10 to 200 iterations
    assert curve[-2] - curve[-1] <= 1.0                          # and levels off from 100 to 200


# ---------------------------------------------------------------------------------------------------
# published numbers: the appendix tables agree with each other once differences are resolved
# ---------------------------------------------------------------------------------------------------

S4 = ["100% adv + 0% clean", "100% adv + 100% clean", "100% adv + 100% clean, ALP",
      "MBN_adv, 100% adv + 100% clean", "MBN_adv, 100% adv + 100% clean, ALP"]


def _pub(table, row, column="PGD-2000"):
    from robbench.report.reference import published

    ref = published("xie", table, row, column)
    return None if ref is None else ref.value


def test_table4_differences_resolve_to_table5_and_table7():
    # Table 4 prints PGD-20/10/5 as differences to PGD-30; Table 5 prints the same models as absolutes
    # (e.g. 39.2 - 1.0 = 38.2), and Table 7's PGD-N blocks again (where legible)
    assert _pub("4", "100% adv + 0% clean, PGD-20 training") == pytest.approx(38.2)
    for s in ("100% adv + 0% clean", "MBN_adv, 100% adv + 100% clean", "MBN_adv, 100% adv + 100% clean, ALP"):
        for n in (5, 10, 20, 30):
            assert _pub("4", f"{s}, PGD-{n} training") == pytest.approx(_pub("5", f"{s}, PGD-{n} training"))
    checked = 0
    for s in S4:
        for n in (5, 10, 20):
            t7 = _pub("7", f"{s}, PGD-{n} training")
            if t7 is not None:  # two PGD-2000 cells are not legible in Table 7 (see the CSV notes)
                assert t7 == pytest.approx(_pub("4", f"{s}, PGD-{n} training")), (s, n)
                checked += 1
        assert _pub("7", s) == pytest.approx(_pub("4", f"{s}, PGD-30 training"))
    assert checked == 14


def test_table5_starred_rows_and_table6_agree_with_table7():
    for s in ("100% adv + 0% clean", "MBN_adv, 100% adv + 100% clean", "MBN_adv, 100% adv + 100% clean, ALP"):
        assert _pub("5", f"{s}*, PGD-30 training") == pytest.approx(_pub("7", f"{s}*"))
        assert _pub("5", f"{s}*, PGD-20 training") == pytest.approx(_pub("7", f"{s}*, PGD-20 training"))
    assert _pub("6", "batch 4096") == pytest.approx(_pub("7", "100% adv + 0% clean*"))
    for b in (512, 1024, 2048, 8192):
        assert _pub("6", f"batch {b}") == pytest.approx(_pub("7", f"100% adv + 0% clean*, batch {b}"))
    # §5: "increasing depth from ResNet-152 to ResNet-338 ... improves the model robustness by 2.4%"
    assert _pub("7", "ResNet-338, 100% adv + 0% clean*") - _pub("7", "100% adv + 0% clean*") == pytest.approx(2.4)
    # Table 3's last row is the paper's ALP setting, Table 7's first row; §A: PGD-10 -> 30 gains 19.7
    r8 = "row 8: ours (PGD-30, ResNet-152, 128 GPUs, P(clean) = 0.2, M-SGD, lr 0.1, step-wise decay)"
    assert (_pub("3", r8), _pub("3", r8, "PGD-10")) == (_pub("7", S4[2]), _pub("7", S4[2], "PGD-10"))
    assert _pub("3", r8) - _pub("3", "row 7: PGD-10, 128 GPUs, the paper's other settings") == pytest.approx(19.7)


def test_every_xie_view_row_names_a_zoo_entry_of_its_setting():
    from robbench.config import list_entries
    from robbench.report.views import load_views

    zoo = set(list_entries())
    views = [v for v in load_views().view if v.paper == "xie"]
    assert {v.table for v in views} >= {"1", "2", "3", "4", "5", "6", "7"}
    for v in views:
        for label, entry in v.rows.items():
            assert not entry or entry in zoo, (v.table, label, entry)
    t4 = next(v for v in views if v.table == "4")
    assert t4.rows["MBN_adv, 100% adv + 100% clean, ALP, PGD-10 training"] == "xie_resnet152_mbn_r100_alp_pgd10"
    e = load_entry(t4.rows["100% adv + 0% clean, PGD-5 training"]).method_params
    assert (e.adv_steps, e.adv_step) == (5, pytest.approx(4 / 255))  # footnote 6: alpha = 4 for PGD-5


def test_table3_rows_5_and_6_are_the_read_one_by_one_changes():
    """Table 3 rows 5 and 6 (a reading of the garbled extraction, see the view note): row 6 is row 7 with
    48 GPUs, row 5 is row 6 with the PGD start always in the eps-cube; rows 2-4 have no entry."""
    from robbench.report.views import load_views

    t3 = next(v for v in load_views().view if v.paper == "xie" and v.table == "3")
    r5, r6, r7 = (load_entry(t3.rows[f"row {k}"] if k != 7 else "xie_resnet101_alp_pgd10") for k in (5, 6, 7))
    assert t3.rows["row 7: PGD-10, 128 GPUs, the paper's other settings"] == "xie_resnet101_alp_pgd10"
    assert [t3.rows[f"row {k}"] for k in (2, 3, 4)] == ["", "", ""] and "READING" in t3.note
    for e in (r5, r6):
        p, o = e.method_params, e.train.optimizer
        assert e.model.options["depth"] == 101 and p.adv_steps == 10 and p.alp_weight == r7.method_params.alp_weight
        assert (o.name, o.nesterov, e.train.schedule.name, e.train.schedule.milestones) == ("sgd", True, "multistep", [35, 70, 95])
        assert e.data.batch_size == 48 * 32 and o.lr == pytest.approx(0.1 * (48 * 32 // 256))  # main.py BASE_LR
    assert (r6.method_params.adv_clean_start_prob, r5.method_params.adv_clean_start_prob) == (0.2, 0.0)
    # one setting each: row 6 differs from row 7 in the GPUs only (the batch and the lr that follows it)
    def settings(e):
        return {"batch": e.data.batch_size, "lr": e.train.optimizer.lr, "epochs": e.train.epochs,
                "start": e.method_params.adv_clean_start_prob, "depth": e.model.options["depth"],
                "steps": e.method_params.adv_steps, "optimizer": e.train.optimizer.name}
    s5, s6, s7 = settings(r5), settings(r6), settings(r7)
    assert {k for k in s6 if s6[k] != s7[k]} == {"batch", "lr"} and {k for k in s5 if s5[k] != s6[k]} == {"start"}
    assert (_pub("3", "row 5", "PGD-10"), _pub("3", "row 6", "PGD-10"), _pub("3", "row 6")) == (47.0, 47.5, 2.9)


def test_demo_protocol_scales_the_papers_attack():
    from robbench.evaluate.protocol import load_protocol

    p = load_protocol("demo-xie")
    a = {x.id: x for x in p.attacks}
    pgd = a["pgd200"].params
    assert p.eps == [0.2] and p.scaled and p.samples.n == 450
    assert (pgd["targeted"], pgd["init"], pgd["restarts"], pgd["steps"]) == ("random", "uniform", 1, 200)
    assert pgd["step_size"] == pytest.approx(p.eps[0] / 16)          # alpha = 1 at eps = 16
    assert pgd["record_steps"] == [10, 20, 50, 100, 200]
    assert a["pgd10"].params["step_size"] == pytest.approx(p.eps[0] / 10)  # max(alpha, eps / N) at N = 10


def test_table3_original_alp_settings_build_rmsprop_with_staircase_decay():
    """Table 3 row 1: the original ALP optimizer (RMSProp; decay 0.9, momentum 0.9, epsilon 1.0 from the
    ALP code) and its lr schedule, 0.045 x 0.94 every two epochs, staircase."""
    import torch

    from robbench.config import load_entry
    from robbench.train.loop import build_optimizers
    from robbench.train.schedule import lr_at

    e = load_entry("xie_resnet101_alp_pgd10_original")
    net = torch.nn.Linear(3, 2)
    (opt,) = build_optimizers(net, [net], e.train.optimizer)
    g = opt.param_groups[0]
    assert isinstance(opt, torch.optim.RMSprop) and (g["alpha"], g["eps"], g["momentum"], g["lr"]) == (0.9, 1.0, 0.9, 0.045)
    s = e.train.schedule
    assert [lr_at(s, 0.045, ep, 220) for ep in (0, 1, 2, 3, 4, 219)] == pytest.approx(
        [0.045, 0.045, 0.045 * 0.94, 0.045 * 0.94, 0.045 * 0.94 ** 2, 0.045 * 0.94 ** 109])
    assert e.method_params.adv_steps == 10 and e.method_params.adv_clean_start_prob == 0.0
    assert e.model.options["depth"] == 101 and e.data.batch_size == 48 * 32
