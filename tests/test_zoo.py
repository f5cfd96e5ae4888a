"""Every zoo entry validates, and the DVERGE-paper entries carry the paper's / reference code's numbers."""
from __future__ import annotations

import pytest

from robbench.config import list_entries, load_entry

SIZES = (3, 5, 8)


@pytest.mark.parametrize("name", list_entries())
def test_every_zoo_entry_validates(name):
    e = load_entry(name)
    assert e.name == name
    assert e.paper and e.description
    if e.train.init_from:
        assert e.train.init_from in list_entries(), f"{name}: init_from names an unknown entry"


def test_baseline_recipe_matches_dverge_appendix_a():
    for n in SIZES:
        e = load_entry(f"baseline_resnet20_x{n}")
        t = e.train
        assert (e.model.arch, e.model.members, e.model.combine) == ("resnet20", n, "log_mean_softmax")
        assert e.model.normalization == "dverge" and e.model.activation == "relu"
        assert (e.data.dataset, e.data.augment, e.data.batch_size, e.data.test_batch_size) == ("cifar10", "crop_flip", 128, 100)
        assert (t.method, t.epochs, t.seed) == ("baseline", 200, 0)
        o = t.optimizer
        assert (o.name, o.lr, o.momentum, o.weight_decay, o.per_member) == ("sgd", 0.1, 0.9, 1e-4, True)
        s = t.schedule
        assert (s.name, s.milestones, s.gamma) == ("multistep", [100, 150], 0.1)


def test_holdout_surrogates_are_baselines_with_other_seeds():
    seeds = set()
    for n in SIZES:
        e, h = load_entry(f"baseline_resnet20_x{n}"), load_entry(f"baseline_resnet20_x{n}_holdout")
        assert "holdout" in h.tags and h.train.seed != e.train.seed
        seeds.add(h.train.seed)
        same = {k: v for k, v in h.resolved().items() if k not in ("name", "description", "tags", "_extends", "train")}
        assert same == {k: v for k, v in e.resolved().items() if k in same}
        assert {**h.resolved()["train"], "seed": 0} == e.resolved()["train"]
    assert len(seeds) == 3 and 0 not in seeds


def test_adp_and_gal_numbers():
    for n in SIZES:
        a = load_entry(f"adp_resnet20_x{n}")
        assert a.model.members == n and a.train.method == "adp"
        assert (a.method_params.alpha, a.method_params.beta, a.method_params.plus_adv) == (2.0, 0.5, False)
        o = a.train.optimizer
        assert (o.name, o.lr, o.weight_decay, o.eps, o.per_member) == ("adam", 1e-3, 1e-4, 1e-7, False)
        assert a.train.schedule.milestones == [100, 150] and a.train.epochs == 200
        g = load_entry(f"gal_resnet20_x{n}")
        assert g.model.members == n and (g.model.activation, g.model.leaky_slope) == ("leaky_relu", 0.1)
        p = g.method_params
        assert (p.lam, p.noise_std, p.noise_prob, p.plus_adv) == (0.5, 0.045, 0.5, False)
        assert (g.train.optimizer.name, g.train.optimizer.lr, g.train.optimizer.per_member) == ("adam", 1e-3, False)
    assert load_entry("adp_resnet20_x3_plus_adv").method_params.plus_adv
    assert load_entry("gal_resnet20_x3_plus_adv").method_params.plus_adv


def test_dverge_numbers_and_starting_points():
    for n in SIZES:
        d = load_entry(f"dverge_resnet20_x{n}")
        p = d.method_params
        assert d.model.members == n and d.train.init_from == f"baseline_resnet20_x{n}"
        assert (p.eps, p.step_size, p.steps, p.momentum, p.rand_start) == (0.07, 0.007, 10, 1.0, False)
        assert (p.layer, p.before_relu, p.bn_mode) == (0, True, "train")
        o = d.train.optimizer
        assert (o.name, o.lr, o.per_member, d.train.epochs, d.train.schedule.milestones) == ("sgd", 0.1, True, 200, [100, 150])
        for e, eps in (("03", 0.03), ("05", 0.05)):  # Table 3
            ab = load_entry(f"dverge_resnet20_x{n}_eps{e}")
            assert ab.method_params.eps == eps and ab.model.members == n
            assert ab.train.init_from == f"baseline_resnet20_x{n}" and ab.method_params.step_size == 0.007
    for layer in (7, 13, 19, 20):  # Table 7
        assert load_entry(f"dverge_resnet20_x3_layer{layer}").method_params.layer == layer
    scratch = load_entry("dverge_resnet20_x3_scratch")  # C.6
    assert scratch.train.method == "dverge" and scratch.train.init_from is None


def test_advt_and_dverge_advt_numbers():
    for n in SIZES:
        a = load_entry(f"advt_resnet20_x{n}")
        p = a.method_params
        assert a.model.members == n and a.train.init_from is None  # from scratch (train_adv.py)
        assert (p.adv_eps, p.adv_step, p.adv_steps, p.adv_rand_start) == (8 / 255, 2 / 255, 10, True)
        assert p.attack_bn_mode == "train"
        d = load_entry(f"dverge_advt_resnet20_x{n}")
        q = d.method_params
        assert d.train.init_from == f"baseline_resnet20_x{n}" and q.coeff == 1.0
        assert (q.adv_eps, q.adv_step, q.adv_steps, q.eps) == (8 / 255, 2 / 255, 10, 0.07)
    assert load_entry("dverge_advt_resnet20_x8_lambda05").method_params.coeff == 0.5


def test_demo_entries_are_digits_and_small():
    names = ["demo_baseline_x3", "demo_baseline_x3_holdout", "demo_adp_x3", "demo_gal_x3", "demo_dverge_x3",
             "demo_advt_x3", "demo_dverge_advt_x3"]
    for name in names:
        e = load_entry(name)
        assert e.data.dataset == "digits" and e.paper == "demo" and e.model.members == 3
        assert e.model.width <= 0.5 and e.train.epochs <= 20
    assert load_entry("demo_baseline_x3_holdout").train.seed != load_entry("demo_baseline_x3").train.seed
    assert load_entry("demo_dverge_x3").train.init_from == "demo_baseline_x3"
