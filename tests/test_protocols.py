"""The protocol files say what the papers and reference code say; bad protocol files are one-line errors."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from robbench.config import list_protocols
from robbench.errors import ConfigError
from robbench.evaluate.engine import select_samples
from robbench.evaluate.execute import random_targets
from robbench.evaluate.plan import and_groups, plan_attacks
from robbench.evaluate.protocol import load_protocol
from robbench.outcomes import OutcomeKey

PAPER = ["dverge-blackbox", "dverge-whitebox", "dverge-whitebox-cw", "dverge-transferability",
         "dverge-convergence", "eio-blackbox", "eio-whitebox", "eio-whitebox-cifar100", "eed-suite", "xie-pgd2000", "robustbench-autoattack"]
DEMO = ["demo-blackbox", "demo-whitebox", "demo-transferability"]
DVERGE_EPS = [0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07]


def attack(p, attack_id):
    return next(a for a in p.attacks if a.id == attack_id)


def planned(p, attack_id):
    return next(a for a in plan_attacks(p) if a.id == attack_id)


def test_every_protocol_file_loads_and_hashes():
    names = list_protocols()
    assert set(PAPER + DEMO) <= set(names)
    hashes = {n: load_protocol(n).sha256() for n in names}
    assert len(set(hashes.values())) == len(names)  # distinct resolved protocols
    assert load_protocol("dverge-whitebox").sha256() == hashes["dverge-whitebox"]  # stable


def test_dverge_whitebox_numbers():
    p = load_protocol("dverge-whitebox")
    assert p.kind == "whitebox" and p.aggregation == "all_or_nothing" and p.norm == "linf"
    assert p.eps == pytest.approx(DVERGE_EPS)
    assert (p.samples.selection, p.samples.n, p.samples.seed) == ("dverge", 1000, 0)
    assert p.batch_size == 200
    (a,) = p.attacks
    q = a.params_parsed
    assert (a.attack, q.loss, q.steps, q.rel_step, q.restarts, q.init, q.keep) == (
        "pgd", "ce", 50, 0.2, 5, "uniform", "last")
    cw = load_protocol("dverge-whitebox-cw").attacks
    assert len(cw) == 1 and cw[0].params_parsed.loss == "cw" and cw[0].params_parsed.kappa == 0.1
    assert cw[0].params_parsed.steps == 50 and cw[0].params_parsed.restarts == 5 and not cw[0].params_parsed.mask_bug


def test_dverge_blackbox_thirty_versions():
    p = load_protocol("dverge-blackbox")
    assert p.kind == "transfer" and p.aggregation == "all_or_nothing"
    assert p.eps == pytest.approx(DVERGE_EPS)
    assert p.sources == [f"baseline_resnet20_x{k}_holdout" for k in (3, 5, 8)]
    assert (p.samples.selection, p.samples.n) == ("dverge", 1000)
    assert len(p.attacks) * len(p.sources) == 30  # "3 (surrogate models) x 5 x 2 (losses) = 30"
    for a in p.attacks:
        q = a.params_parsed
        assert q.steps == 100 and q.rel_step == 0.2 and q.restarts == 1
        assert (q.loss, q.kappa) in (("ce", 0.0), ("cw", 0.1))
    mpgd = [a for a in p.attacks if a.id.startswith("mpgd")]
    assert sorted(a.params_parsed.seed for a in mpgd) == [0, 0, 1, 1, 2, 2]
    assert all(a.params_parsed.momentum == 1.0 and a.params_parsed.init == "uniform" for a in mpgd)
    mdi = [a for a in p.attacks if a.id.startswith("mdi2")]
    assert len(mdi) == 2 and all(a.params_parsed.di_prob == 0.5 and a.params_parsed.momentum == 1.0 for a in mdi)
    sgm = [a for a in p.attacks if a.id.startswith("sgm")]
    assert len(sgm) == 2 and all(a.params_parsed.sgm_gamma == 0.2 for a in sgm)
    # eval_bbox.py: the 3 M-PGD restarts are AND-ed -> 18 "sources" (6 M-PGD, 6 M-DI2, 6 SGM)
    groups = and_groups(plan_attacks(p), p.sources)
    assert len(groups) == 30 and len(set(groups.values())) == 18
    assert groups[OutcomeKey("mpgd-ce-2", "baseline_resnet20_x5_holdout")] == "mpgd-ce@source=baseline_resnet20_x5_holdout"


def test_dverge_transferability_and_convergence():
    p = load_protocol("dverge-transferability")
    assert p.eps == [0.03] and p.samples.selection == "all_correct" and p.samples.n == 1000
    (a,) = p.attacks
    assert a.restarts_as_runs == 5 and a.params_parsed.steps == 50 and a.params_parsed.rel_step == 0.2
    c = load_protocol("dverge-convergence")
    wb = attack(c, "pgd-wb")
    assert wb.eps == [0.01] and wb.params_parsed.restarts == 1 and wb.params_parsed.record_steps == [50, 500, 1000]
    assert [k for _, k in planned(c, "pgd-wb").stored()] == [OutcomeKey("pgd-wb", steps=s) for s in (50, 500, 1000)]
    bb = [a for a in c.attacks if c.attack_on(a) == "sources"]
    assert len(bb) == 30 and all(a.eps == [0.03] for a in bb)
    assert sorted({a.params_parsed.steps for a in bb}) == [100, 500, 1000]
    assert len(set(and_groups(plan_attacks(c), c.sources).values())) == 3  # one all-or-nothing column per step count


def test_eio_follows_dverge():
    for eio, dv in (("eio-blackbox", "dverge-blackbox"), ("eio-whitebox", "dverge-whitebox")):
        a, b = load_protocol(eio), load_protocol(dv)
        assert a.paper == "eio" and a.applies_to.papers == ["eio"]
        assert a.eps == b.eps and a.samples == b.samples and a.sources == b.sources
        assert [x.params_parsed for x in a.attacks] == [x.params_parsed for x in b.attacks]
    c100, wb = load_protocol("eio-whitebox-cifar100"), load_protocol("eio-whitebox")  # ICLR A.2: same white-box
    assert c100.datasets == ["cifar100"] and c100.eps == wb.eps and c100.samples == wb.samples
    assert [x.params_parsed for x in c100.attacks] == [x.params_parsed for x in wb.attacks]


def test_eed_suite():
    p = load_protocol("eed-suite")
    assert p.eps == [pytest.approx(8 / 255)] and p.aggregation == "per_attack"
    pgd = attack(p, "pgd20").params_parsed
    assert pgd.steps == 20 and pgd.step_size == pytest.approx(2 / 255)
    assert attack(p, "aa").params_parsed.version == "standard"
    cw = attack(p, "cw").params_parsed
    assert cw.loss == "cw" and cw.kappa == 0 and cw.steps == 30 and cw.rel_step == pytest.approx(2.3 / 30)
    df = attack(p, "df")
    assert df.norm == "l2" and df.params_parsed.overshoot == 0.02 and df.params_parsed.steps == 50
    assert df.params_parsed.success_rule == "norm_within_eps"
    assert p.clean


def test_xie_and_robustbench():
    p = load_protocol("xie-pgd2000")
    a, a10 = p.attacks
    q = a.params_parsed
    assert p.eps == [pytest.approx(16 / 255)] and q.step_size == pytest.approx(1 / 255) and q.steps == 2000
    assert q.targeted == "random" and q.init == "uniform" and q.restarts == 1
    assert q.record_steps == [10, 20, 50, 100, 200, 500, 1000, 2000]
    pa, pa10 = plan_attacks(p)
    ids, final = pa.stored(), pa.final()  # one run stores the whole Figure 2 curve
    assert [k for _, k in ids][-1] == final == OutcomeKey("pgd2000", steps=2000) and len(ids) == 8
    # adv_model.py PGDAttacker: step = max(alpha, eps / N) -> PGD-10 steps 1.6 pixels, same targets/init
    q10 = a10.params_parsed
    assert q10.steps == 10 and q10.step_size == pytest.approx(max(1, 16 / 10) / 255)
    assert (q10.targeted, q10.init, q10.seed) == (q.targeted, q.init, q.seed)
    assert pa10.final() == OutcomeKey("pgd10", steps=10)
    r = load_protocol("robustbench-autoattack")
    assert r.kind == "autoattack" and r.eps == [pytest.approx(8 / 255)] and r.datasets == ["cifar10"]
    assert r.attacks[0].params_parsed.version == "standard" and r.samples.selection == "first"


def test_demo_protocols_are_declared_scaled_and_digits_only():
    for name in DEMO:
        p = load_protocol(name)
        assert p.scaled and p.paper == "demo" and p.datasets == ["digits"]
        assert "SCALED" in p.description
    for name in PAPER:
        assert not load_protocol(name).scaled


def test_dverge_subset_is_the_reference_draw():
    class Fake:
        def __len__(self):
            return 10000

    ids = select_samples(load_protocol("dverge-whitebox"), Fake(), "cifar10")
    assert len(ids) == 1000 and ids[:5] == [6311, 6890, 663, 4242, 8376]


def test_overrides_are_recorded_and_change_the_hash():
    base = load_protocol("dverge-whitebox")
    p = load_protocol("dverge-whitebox", ["samples.seed=3"], n=20, eps="0.03,0.05", batch_size=10)
    assert p.samples.n == 20 and p.eps == [0.03, 0.05] and p.batch_size == 10 and p.samples.seed == 3
    assert p.overrides == ["samples.seed=3", "samples.n=20", "eps=[0.03, 0.05]", "batch_size=10"]
    assert p.sha256() != base.sha256()


# -------------------------------------------------------------------------------------------- errors

GOOD = """
kind = "whitebox"
datasets = ["digits"]
eps = [0.1]
[[attacks]]
id = "pgd"
attack = "pgd"
[attacks.params]
steps = 3
"""


@pytest.mark.parametrize("edit, field, words", [
    (("[[attacks]]", "bogus = 1\n[[attacks]]"), "bogus", "unknown key"),
    (('eps = [0.1]', 'eps = "big"'), "eps", "expected list"),
    (('eps = [0.1]', 'eps = [-0.1]'), "eps", "out of range"),
    (('attack = "pgd"', 'attack = "nope"'), "attacks[0].attack", "unknown attack"),
    (("steps = 3", "stepz = 3"), "attacks[0].params.stepz", "unknown key"),
    (("steps = 3", "steps = -3"), "attacks[0].params.steps", "out of range"),
    (('kind = "whitebox"', 'kind = "whitebox"\naggregation = "mean"'), "aggregation", "unknown aggregation"),
    (('kind = "whitebox"', 'kind = "transfer"'), "sources", "source"),
    (('id = "pgd"', 'id = "clean"'), "attacks[0].id", "ids must"),
    (("steps = 3", 'steps = 3\nnorm = "l2"'), "attacks[0].params.norm", "differs"),
])
def test_bad_protocol_is_one_line_config_error(tmp_path: Path, edit, field, words):
    f = tmp_path / "bad.toml"
    f.write_text(GOOD.replace(*edit, 1))
    with pytest.raises(ConfigError) as ei:
        load_protocol(str(f))
    msg = str(ei.value)
    assert "\n" not in msg and str(f) in msg and field in msg and words in msg


def test_good_fixture_loads(tmp_path: Path):
    f = tmp_path / "ok.toml"
    f.write_text(GOOD)
    p = load_protocol(str(f))
    assert p.name == "ok" and p.attacks[0].params_parsed.steps == 3 and p.attacks[0].params_parsed.norm == "linf"


def test_extends_cycle_and_cli_exit_code(tmp_path: Path):
    from robbench.cli import main

    (tmp_path / "a.toml").write_text('extends = "b"\n' + GOOD)
    (tmp_path / "b.toml").write_text('extends = "a"\n' + GOOD)
    with pytest.raises(ConfigError, match="extends cycle"):
        load_protocol(str(tmp_path / "a.toml"))
    res = CliRunner().invoke(main, ["protocols", "show", str(tmp_path / "a.toml")])
    assert res.exit_code == 2
    assert res.output.count("\n") == 1 and "extends cycle" in res.output
    ok = CliRunner().invoke(main, ["protocols", "show", "dverge-whitebox"])
    assert ok.exit_code == 0 and '"rel_step": 0.2' in ok.output


def test_random_targets_are_drawn_per_sample_id():
    p = plan_attacks(load_protocol("xie-pgd2000"))
    y = torch.arange(100) % 10
    ids = list(range(100, 200))
    whole = random_targets(p[0], y, ids, 10, 0)
    assert whole is not None and not (whole == y).any() and ((whole >= 0) & (whole < 10)).all()
    halves = torch.cat([random_targets(p[0], y[:50], ids[:50], 10, 0),
                        random_targets(p[0], y[50:], ids[50:], 10, 0)])
    assert torch.equal(whole, halves)  # independent of the batching
    offsets = (whole - y) % 10
    assert not torch.equal(offsets[:50], offsets[50:])  # not the same offsets in every batch
    assert torch.equal(random_targets(p[1], y, ids, 10, 0), whole)  # pgd10 shares them
    assert random_targets(plan_attacks(load_protocol("dverge-whitebox"))[0], y, ids, 10, 0) is None


def test_a_bad_protocol_override_names_the_set(tmp_path: Path):
    """Protocols get the same --set blame as zoo entries: the error names the override, not only the file."""
    with pytest.raises(ConfigError) as e:
        load_protocol("dverge-whitebox", ["batch_size=0"])
    assert "(--set batch_size=0)" in str(e.value) and e.value.field == "batch_size" and e.value.reason == "config"
    with pytest.raises(ConfigError, match=r"--set samples.n=0"):
        load_protocol("dverge-whitebox", ["samples.n=0"])
