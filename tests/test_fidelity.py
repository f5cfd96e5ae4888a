"""Paper tables name the models the papers used: every view row, protocol and zoo entry the fidelity audit
asked for (the values checked here were read by hand from the papers; tests never read ../shared)."""
from __future__ import annotations

import fnmatch
import re
from pathlib import Path

import pytest
import torch

from robbench.config import list_entries, load_entry
from robbench.evaluate.protocol import load_protocol
from robbench.paths import PROTOCOLS_DIR
from robbench.report.reference import load_reference, published, table_layout
from robbench.report.views import load_views

SIZES = (3, 5, 8)
RUN_SEEDS = (4, 5)  # runs 2 and 3 of DVERGE Tables 4-5; seeds 1-3 are the hold-out surrogates'


@pytest.fixture(scope="module")
def spec():
    return load_views()


def view(spec, paper: str, table: str):
    (v,) = [v for v in spec.view if v.paper == paper and v.table == table]
    return v


def same_recipe(a: str, b: str, ignore: tuple[str, ...] = ()) -> None:
    """Entries ``a`` and ``b`` resolve to the same model, data and training except train.seed/init_from
    and the keys in ``ignore``."""
    ra, rb = load_entry(a).resolved(), load_entry(b).resolved()
    skip = {"name", "description", "tags", "_extends", "citation", *ignore}
    assert {k: v for k, v in ra.items() if k not in skip | {"train"}} == \
           {k: v for k, v in rb.items() if k not in skip | {"train"}}, (a, b)
    ta = {k: v for k, v in ra["train"].items() if k not in ("seed", "init_from")}
    tb = {k: v for k, v in rb["train"].items() if k not in ("seed", "init_from")}
    assert ta == tb, (a, b)


def applies_by_name(proto, entry: str) -> bool:
    pats = proto.applies_to.entries
    return not pats or any(fnmatch.fnmatch(entry, p) for p in pats)


# ------------------------------------------------------------------------- items 1-3: Ensemble-in-One

@pytest.mark.parametrize("k", [7, 14, 21])
def test_preprint_tables_3_4_topk_rows_are_40_epoch_finetunes(spec, k):
    """Preprint §4.1 fine-tunes every derived model 40 epochs, lr 0.001 /10 at 20 and 30."""
    ft = f"eio_resnet20_top{k}_ft40"
    for table in ("preprint-3", "preprint-4"):
        assert view(spec, "eio", table).rows[f"EIO(top{k})/1"] == f"{ft}_path0"
    e = load_entry(ft)
    t = e.train
    assert (t.epochs, t.optimizer.name, t.optimizer.lr, t.optimizer.momentum, t.optimizer.weight_decay) == (
        40, "sgd", 0.001, 0.9, 1e-4)
    assert (t.schedule.name, t.schedule.milestones, t.schedule.gamma) == ("multistep", [20, 30], 0.1)
    assert t.init_from == f"eio_resnet20_top{k}" and e.model.transform is None
    rgn = load_entry(t.init_from)
    o = rgn.model.transform_options
    assert (rgn.model.transform, o["layers"], o["include_shortcut"], o["augment_factor"]) == ("rgn", f"top{k}", True, 2)
    from robbench.eio.derive import _check_same_architecture

    _check_same_architecture(e, rgn)  # `robbench derive` accepts the fine-tuning entry for this RGN


def test_preprint_table2_is_the_21_rgb_network_with_the_40_epoch_finetune(spec):
    v = view(spec, "eio", "preprint-2")
    assert v.rows["EIO sub-models=1 n=2"] == "eio_resnet20_top21_ft40_path0"
    assert v.rows["EIO sub-models=3 n=2"] == "eio_resnet20_top21_ft40_ens3"
    assert v.rows["EIO sub-models=1 n=3"] == "eio_resnet20_top21_n3_ft40_path0"
    assert v.rows["EIO sub-models=3 n=3"] == "eio_resnet20_top21_n3_ft40_ens3"
    # one entry for Table 2's n=2/1 row and Table 3's top21/1 row: the paper prints the same model's numbers
    assert v.rows["EIO sub-models=1 n=2"] == view(spec, "eio", "preprint-3").rows["EIO(top21)/1"]
    assert published("eio", "preprint-2", "EIO sub-models=1 n=2", "clean").value == \
           published("eio", "preprint-3", "EIO(top21)/1", "clean").value == 88.5
    assert published("eio", "preprint-2", "EIO sub-models=1 n=2", "black-box eps=0.03").value == \
           published("eio", "preprint-3", "EIO(top21)/1", "0.03").value == 64.1
    n3 = load_entry("eio_resnet20_top21_n3_ft40")
    rgn = load_entry(n3.train.init_from)
    o = rgn.model.transform_options
    assert (o["layers"], o["include_shortcut"], o["augment_factor"]) == ("top21", True, 3)
    assert load_entry(rgn.train.init_from).model.transform_options["augment_factor"] == 3
    same_recipe("eio_resnet20_top21_n3_ft40", "eio_resnet20_top21_ft40")
    same_recipe("eio_resnet20_top21_n3", "eio_resnet20_top21", ignore=("model",))
    assert v.measure("white-box eps=0.01").protocol == "eio-whitebox-preprint"
    heat = [h for h in spec.heatmap if h.paper == "eio"]  # preprint Figure 8 "Ensemble-in-One/3"
    assert heat and "eio_resnet20_top21_ft40_ens3" in heat[0].entries


def test_one_member_rows_evaluate_one_member(spec):
    """'/N/1' rows: "we select one of the sub-models within the ensembles" -> member 0 in the protocol the
    view names, so a whole-ensemble number cannot land in the row."""
    for table, proto_name in (("preprint-3", "eio-blackbox-member0"), ("preprint-4", "eio-whitebox-preprint-member0")):
        v = view(spec, "eio", table)
        assert v.protocol == proto_name
        p = load_protocol(proto_name)
        assert p.member == 0
        for row, entry in v.rows.items():
            assert row.endswith("/1") and applies_by_name(p, entry), (table, row, entry)
            assert v.measure("0.01").protocol == proto_name
    bb, bb_m = load_protocol("eio-blackbox"), load_protocol("eio-blackbox-member0")
    assert bb.member is None and bb_m.sources == bb.sources and bb_m.samples == bb.samples
    assert [a.params_parsed for a in bb_m.attacks] == [a.params_parsed for a in bb.attacks]
    for name in ("eio-blackbox-cifar100", "eio-whitebox-cifar100"):  # ICLR Fig. 6 "/3/1"
        assert load_protocol(name).member == 0


def test_preprint_whitebox_uses_another_sample_draw():
    """Preprint Table 4: "sampling another set of data to test the accuracy against white-box attacks"."""
    from robbench.data.subsets import dverge_subset

    a, b = load_protocol("eio-whitebox"), load_protocol("eio-whitebox-preprint")
    assert b.samples.seed != a.samples.seed and (b.samples.n, b.samples.selection) == (a.samples.n, a.samples.selection)
    assert [x.params_parsed for x in a.attacks] == [x.params_parsed for x in b.attacks] and a.eps == b.eps
    ids_a = dverge_subset(a.samples.n, 10000, a.samples.seed)
    ids_b = dverge_subset(b.samples.n, 10000, b.samples.seed)
    assert len(set(ids_a) & set(ids_b)) < 200  # a different draw, not a reordering
    assert load_protocol("eio-whitebox-preprint-member0").samples == b.samples


# ------------------------------------------------------------------------------ item 4: three runs

@pytest.mark.parametrize("table", ["4", "5"])
def test_three_runs_are_entries_that_differ_only_in_seed(spec, table):
    """Each row of Tables 4/5 names its three runs: the entry (seed 0) and its _seed4/_seed5 copies."""
    v = view(spec, "dverge", table)
    holdout_seeds = {load_entry(f"baseline_resnet20_x{n}_holdout").train.seed for n in SIZES}
    assert set(v.seeds) == set(v.rows)
    assert not [w for w in spec.view if w.table.startswith("seed")]  # no per-run copies of the tables
    assert "need a report change" not in spec.papers["dverge"].intro
    for row, entry in v.rows.items():
        assert v.runs_of(row) == [entry, *(f"{entry}_seed{s}" for s in RUN_SEEDS)]
        e = load_entry(entry)
        assert e.train.seed == 0
        for s in RUN_SEEDS:
            assert s not in holdout_seeds  # same seed + recipe would train a copy of a surrogate
            run = f"{entry}_seed{s}"
            r = load_entry(run)
            assert r.train.seed == s
            same_recipe(entry, run)
            if e.train.init_from:  # DVERGE starts from the baseline of the same run
                assert r.train.init_from == f"{e.train.init_from}_seed{s}"


# --------------------------------------------------------------------- item 5: same-defense hold-outs

@pytest.mark.parametrize("fam,label", [("adp", "ADP"), ("gal", "GAL"), ("dverge", "DVERGE")])
def test_table6_rows_are_attacked_from_their_own_defense(spec, fam, label):
    v = view(spec, "dverge", f"{fam}-6")
    assert v.ref_paper_table == ("dverge", "6") and v.protocol == f"dverge-blackbox-samedefense-{fam}"
    assert v.rows == {f"{label}/{n}": f"{fam}_resnet20_x{n}" for n in SIZES}
    p, ref = load_protocol(v.protocol), load_protocol("dverge-blackbox")
    assert p.sources == [f"{fam}_resnet20_x{n}_holdout" for n in SIZES]
    assert [a.params_parsed for a in p.attacks] == [a.params_parsed for a in ref.attacks]  # "the same group of attacks"
    assert p.eps == ref.eps and p.samples == ref.samples and p.aggregation == "all_or_nothing"
    for n in SIZES:
        target, h = f"{fam}_resnet20_x{n}", f"{fam}_resnet20_x{n}_holdout"
        he = load_entry(h)
        assert "holdout" in he.tags and he.train.seed not in (0, *RUN_SEEDS)  # an independent copy
        same_recipe(target, h)
        if fam == "dverge":
            assert he.train.init_from == f"baseline_resnet20_x{n}_holdout"
        assert applies_by_name(p, target) and p.applies(load_entry(target)) and not p.applies(he)
    assert not any(v.protocol == "dverge-blackbox-samedefense" for v in spec.view)


# ------------------------------------------------------------------------- item 6/9: DVERGE Table 2

def test_dverge_table2_has_a_view_on_two_standard_resnet20s(spec):
    v = view(spec, "dverge", "2")
    rows, cols = table_layout("dverge", "2")
    assert list(v.rows) == rows and set(v.rows.values()) == {"baseline_resnet20_x3"}
    assert v.protocol == "dverge-distillation" and all(v.measure(c, r).kind == "mean" for r in rows for c in cols)
    assert load_entry("baseline_resnet20_x3").train.method == "baseline"  # "trained in a standard way"


# ------------------------------------------------------------------ items 7, 8: CIFAR-100, VGG-16, AdvT

def test_cifar100_blackbox_has_ten_versions_from_two_holdouts():
    p = load_protocol("eio-blackbox-cifar100")
    assert p.kind == "transfer" and p.datasets == ["cifar100"] and p.aggregation == "all_or_nothing"
    assert len(p.sources) == 2 and len(p.sources) * len(p.attacks) == 10  # "2 surrogate models x 5 random starts"
    assert sorted(a.params_parsed.seed for a in p.attacks) == [0, 1, 2, 3, 4]
    for a in p.attacks:
        q = a.params_parsed
        assert (q.loss, q.steps, q.rel_step, q.init, q.restarts, q.momentum) == ("ce", 100, 0.2, "uniform", 1, 1.0)
    targets = ["baseline_resnet20_x3_cifar100", "gal_resnet20_x3_cifar100", "dverge_resnet20_x3_cifar100",
               "advt_resnet20_x3_cifar100"]
    for s in p.sources:
        e = load_entry(s)
        assert e.data.dataset == "cifar100" and "holdout" in e.tags and e.train.method == "baseline"
        assert e.train.seed != 0 and not p.applies(e)
    for name in targets:  # ICLR Fig. 6: baseline, GAL, DVERGE, AdvT (ADP "fails to converge")
        e = load_entry(name)
        dv = load_entry(name.replace("_cifar100", ""))
        assert e.data.dataset == "cifar100" and e.model.normalization == "dataset" and e.model.members == 3
        assert e.train.method == dv.train.method and e.paper == "eio"
        assert p.applies(e) and load_protocol("eio-whitebox-cifar100").applies(e)
    assert load_entry("dverge_resnet20_x3_cifar100").train.init_from == "baseline_resnet20_x3_cifar100"
    assert not any(n.startswith("adp_") and "cifar100" in n for n in list_entries())


def test_iclr_fig4_vgg16_ensembles_and_fig5_single_advt():
    for fam in ("baseline", "adp", "gal", "dverge"):
        name = f"{fam}_vgg16_x3"
        e = load_entry(name)
        assert (e.model.arch, e.model.members, e.data.dataset, e.paper) == ("vgg16", 3, "cifar10", "eio")
        same_recipe(name, f"{fam}_resnet20_x3", ignore=("model", "paper"))
        assert {k: v for k, v in e.resolved()["model"].items() if k != "arch"} == \
               {k: v for k, v in load_entry(f"{fam}_resnet20_x3").resolved()["model"].items() if k != "arch"}
        assert load_protocol("eio-blackbox").applies(e)  # "the same surrogate models as DVERGE"
    assert load_entry("dverge_vgg16_x3").train.init_from == "baseline_vgg16_x3"
    a = load_entry("advt_resnet20_x1_eps0005")
    assert a.model.members == 1 and a.method_params.adv_eps == 0.005 and a.train.method == "advt"
    assert a.method_params.adv_steps == load_entry("advt_resnet20_x3").method_params.adv_steps


# ----------------------------------------------------------------------- item 9: every table renders

def test_every_published_table_has_a_view(spec):
    shown = {v.ref_paper_table for v in spec.view} | {tuple(t.reference.split(":", 1)) for t in spec.training_time}
    published_tables = {(p, t) for (p, t, _, _) in load_reference()}
    assert published_tables <= shown, sorted(published_tables - shown)


def test_report_renders_every_table_with_unrun_cells(tmp_path: Path, spec):
    from robbench.report import write_report

    write_report(paper="all", out=tmp_path / "out", db=tmp_path / "none.db", runs_dir=tmp_path / "runs", fmt="md", screenshot=False)
    pages = {p: (tmp_path / "out" / p / "README.md").read_text() for p in spec.papers}
    for v in spec.view:
        assert f"{v.title}\n" in pages[v.paper], (v.paper, v.table)
    assert "| EIO(top21)/1 | not run (88.5) |" in pages["eio"]
    assert "| ADP/3 | not run (93.3) |" in pages["dverge"]  # Table 6, ADP copy
    assert "| eps=0.03 | not run (1.056) | not run (1.726) |" in pages["dverge"]  # Table 2: a measured protocol now


# ------------------------------------------------------------------ item 10: heatmaps at other eps

def test_heatmaps_at_other_testing_eps(spec):
    sweep, base = load_protocol("dverge-transferability-sweep"), load_protocol("dverge-transferability")
    assert [a.params_parsed for a in sweep.attacks] == [a.params_parsed for a in base.attacks]
    assert sweep.samples == base.samples and set(base.eps) < set(sweep.eps)
    maps = [h for h in spec.heatmap if h.protocol == "dverge-transferability-sweep"]
    assert {h.eps for h in maps} >= {0.01}
    for h in maps:
        assert h.eps in sweep.eps and h.paper == "dverge"
    fig11 = [h for h in maps if "dverge_resnet20_x3_layer7" in h.entries]
    assert len(fig11) == 1 and fig11[0].eps == 0.01  # C.5: "evaluated under eps=0.01"
    assert {f"dverge_resnet20_x3_layer{k}" for k in (7, 13, 19, 20)} <= set(fig11[0].entries)


# -------------------------------------------------------------------------- items 11-13: words

def _text(name: str) -> str:
    return (PROTOCOLS_DIR / f"{name}.toml").read_text()


def test_eed_quote_is_whole_and_the_eval_pgd_is_an_assumption():
    text = re.sub(r"\s*\n#\s*", " ", _text("eed-suite"))
    assert "We use PGD-20 attacker with a step size of 2/255 to generate adversarial examples for training" in text
    assert "robbench's assumption" in text and "TRAINING attacker" in text


def test_whitebox_cw_is_cited_as_reference_code():
    p = load_protocol("dverge-whitebox-cw")
    assert p.citation.startswith("reference code only") and p.attacks[0].params_parsed.loss == "cw"
    assert "Table 5 is PGD with the CE loss" in p.citation


def test_cw_transfer_sets_exist_with_both_maskings(spec):
    ours, ref = load_protocol("dverge-blackbox"), load_protocol("dverge-blackbox-cwref")
    assert ref.sources == ours.sources and ref.eps == ours.eps and ref.samples == ours.samples
    assert len(ref.attacks) == len(ours.attacks)
    for a, b in zip(ours.attacks, ref.attacks):
        pa, pb = a.params_parsed, b.params_parsed
        if pa.loss == "ce":
            assert a.id == b.id and pa == pb  # the same CE sets (the cache serves both)
        else:
            assert a.id != b.id and b.id.replace("cwref", "cw") == a.id  # stored under other ids
            assert (pa.mask_bug, pb.mask_bug) == (False, True)
            assert pb == type(pa)(**{**vars(pa), "mask_bug": True})
    assert view(spec, "dverge", "4").protocol == "dverge-blackbox"  # the table's choice
    cw = view(spec, "dverge", "cwref-4")
    assert cw.protocol == "dverge-blackbox-cwref" and cw.rows == view(spec, "dverge", "4").rows
    # the reference masking on log-probabilities zeroes the other-class term
    from robbench.attacks.losses import cw as cw_loss

    z = torch.log_softmax(torch.tensor([[2.0, 1.0, -1.0], [0.0, 3.0, 1.0]]), dim=1)
    y = torch.tensor([0, 1])
    buggy = cw_loss(z, y, kappa=0.1, mask_bug=True)
    true = z.gather(1, y[:, None]).squeeze(1)
    assert torch.allclose(buggy, -torch.relu(true - 0.0 + 0.1))
    assert not torch.allclose(buggy, cw_loss(z, y, kappa=0.1, mask_bug=False))

