"""One training step of every method runs, changes every member's weights and reports finite losses."""
from __future__ import annotations

import math

import pytest
import torch

from robbench.config import load_entry
from robbench.data import get_info
from robbench.memformat import choose_memory_format
from robbench.models import build_model
from robbench.registry import METHODS
from robbench.train.loop import DistEnv, TrainContext, build_optimizers
from robbench.train.methods import Batch

# tiny: width 0.25 ResNet-20s on 8x8 synthetic-looking digits batches, few attack steps
TINY = ["model.width=0.25"]
CASES = {
    "baseline": ("demo_baseline_x3", []),
    "adp": ("demo_adp_x3", []),
    "adp+adv": ("demo_adp_x3", ["train.params.plus_adv=true", "train.params.adv_steps=2", "train.params.adv_eps=0.1"]),
    "gal": ("demo_gal_x3", []),
    "gal+adv": ("demo_gal_x3", ["train.params.plus_adv=true", "train.params.adv_steps=2", "train.params.adv_eps=0.1"]),
    "advt": ("demo_advt_x3", ["train.params.adv_steps=3"]),
    "dverge": ("demo_dverge_x3", ["train.params.steps=3", "train.params.layer=9"]),
    "dverge_eval_bn": ("demo_dverge_x3", ["train.params.steps=3", "train.params.bn_mode=eval",
                                          "train.params.recompute_target_each_step=true"]),
    "dverge_advt": ("demo_dverge_advt_x3", ["train.params.steps=2", "train.params.adv_steps=2"]),
}


def _ctx(entry):
    torch.manual_seed(0)
    model = build_model(entry, get_info("digits")).train()
    # the same per-model check users get (robbench.memformat), never a hard-coded layout
    fmt = choose_memory_format(model, (1, 8, 8), "cpu", what=entry.name)
    model = model.to(memory_format=fmt.format)
    opts = build_optimizers(model, list(model.members), entry.train.optimizer)
    return TrainContext(entry=entry, model=model, optimizers=opts, device=torch.device("cpu"), dist=DistEnv(),
                        seed=0, num_classes=10, memory_format=fmt.format)


@pytest.mark.parametrize("case", sorted(CASES))
def test_one_step_changes_every_member(case):
    name, sets = CASES[case]
    entry = load_entry(name, TINY + sets)
    ctx = _ctx(entry)
    method = METHODS.get(entry.train.method)(entry.method_params)
    method.setup(ctx)
    method.on_epoch_start(ctx, 0)
    g = torch.Generator().manual_seed(1)
    x = ctx.prepare(torch.rand(32, 1, 8, 8, generator=g))
    y = torch.randint(0, 10, (32,), generator=g)
    xt = torch.rand(32, 1, 8, 8, generator=g)
    batch = Batch(x, y, tuple((xt, y) for _ in range(method.streams - 1)))
    before = [[p.detach().clone() for p in m.parameters()] for m in ctx.members]
    x_copy = x.clone()
    metrics = method.step(ctx, batch)
    assert metrics and all(math.isfinite(v) for v in metrics.values()), metrics
    assert torch.equal(x, x_copy)  # the batch is not modified in place
    for i, m in enumerate(ctx.members):
        changed = [not torch.equal(a, b) for a, b in zip(before[i], m.parameters())]
        assert sum(changed) >= len(changed) // 2, f"member {i}: only {sum(changed)}/{len(changed)} tensors moved"
    assert ctx.model.training  # methods restore the mode they switch for attacks


def test_dverge_layer_option_is_checked():
    from robbench.errors import ConfigError

    entry = load_entry("demo_dverge_x3", TINY + ["train.params.layer=21"])
    ctx = _ctx(entry)
    method = METHODS.get("dverge")(entry.method_params)
    with pytest.raises(ConfigError, match="layer 21 does not exist; allowed: 0 \\(random\\) or 1..20"):
        method.setup(ctx)


def test_dverge_random_layer_is_drawn_per_epoch_and_logged():
    entry = load_entry("demo_dverge_x3", TINY)
    ctx = _ctx(entry)
    method = METHODS.get("dverge")(entry.method_params)
    method.setup(ctx)
    layers = []
    for e in range(8):
        method.on_epoch_start(ctx, e)
        layers.append(method.layer)
        assert ctx.extras["log_distill_layer"] == method.layer
    assert all(1 <= v <= 20 for v in layers) and len(set(layers)) > 1


def test_advt_attack_in_train_mode_moves_bn_stats_eval_mode_does_not():
    """Reference AdvT crafts in train mode (BN running stats move during the attack); 'eval' must not."""
    from robbench.train.methods.advt import pgd

    for mode, moves in (("train", True), ("eval", False)):
        entry = load_entry("demo_advt_x3", TINY + ["train.params.adv_steps=2", f"train.params.attack_bn_mode={mode}"])
        ctx = _ctx(entry)
        bn = ctx.members[0].get_submodule("bn1") if hasattr(ctx.members[0], "bn1") else next(
            m for m in ctx.members[0].modules() if isinstance(m, torch.nn.BatchNorm2d))
        before = bn.running_mean.clone()
        x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
        x_adv = pgd(ctx.model, ctx.model, x, y, entry.method_params)
        assert (x_adv - x).abs().max() <= 0.1 + 1e-6
        assert (not torch.equal(before, bn.running_mean)) == moves
        assert ctx.model.training
