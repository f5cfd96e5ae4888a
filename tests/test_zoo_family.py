"""Entry families (``zoo/*.family.toml``, robbench.zoo_family): a derived entry is its file entry plus the
family's overrides, its references point inside the derived chain, mistakes are one line (exit 2), and a
derived digits entry trains through the CLI."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

import robbench.config as config
from robbench.cli import main
from robbench.config import list_entries, load_entry
from robbench.errors import ConfigError
from robbench.paths import ZOO_DIR
from robbench.zoo_family import rename_refs

FAMILY = """
description = "sub-models at 50% sparsity"
from = "demo_eed"
to = "demo_eed_s50"
entries = ["at", "nis_0_prune", "nis_0", "erm_0_prune", "erm_0", "team"]
tags = ["s50"]
[set]
"model.transform_options.sparsity" = 0.5
train.params.adv_steps = 2
[set_for."at"]
"model.transform_options" = {}
"train.epochs" = 1
"""


@pytest.fixture()
def zoo(tmp_path: Path, monkeypatch) -> Path:
    """A zoo folder with the digits EED chain and one family deriving six of its entries."""
    for f in ZOO_DIR.glob("demo_eed_*.toml"):
        shutil.copy(f, tmp_path / f.name)
    (tmp_path / "demo_eed_s50.family.toml").write_text(FAMILY)
    monkeypatch.setattr(config, "ZOO_DIR", tmp_path)
    return tmp_path


def _core(d: dict) -> dict:
    """The resolved entry without what a family changes by design (name, description, tags, provenance)."""
    return {k: v for k, v in d.items() if k not in ("name", "description", "tags", "_family")}


def test_derived_entry_is_file_entry_plus_override(zoo):
    names = list_entries(zoo)
    derived = [n for n in names if n.startswith("demo_eed_s50_")]
    assert sorted(derived) == sorted(f"demo_eed_s50_{s}" for s in
                                     ("at", "nis_0_prune", "nis_0", "erm_0_prune", "erm_0", "team"))
    assert "demo_eed_s50.family" not in names and "demo_eed_s50" not in names
    mapping = {f"demo_eed_{s}": f"demo_eed_s50_{s}" for s in ("at", "nis_0_prune", "nis_0", "erm_0_prune", "erm_0", "team")}
    for name in ("nis_0_prune", "nis_0", "team"):
        d = load_entry(f"demo_eed_s50_{name}")
        f = load_entry(f"demo_eed_{name}", ["model.transform_options.sparsity=0.5", "train.params.adv_steps=2"])
        assert _core(d.resolved()) == rename_refs(_core(f.resolved()), mapping)
        assert d.model.transform_options["sparsity"] == 0.5 != load_entry(f"demo_eed_{name}").model.transform_options["sparsity"]
        assert d.tags == [*load_entry(f"demo_eed_{name}").tags, "s50"]
        assert d.description.endswith("[sub-models at 50% sparsity]")
        fam = d.resolved()["_family"]
        assert fam["from_entry"] == f"demo_eed_{name}" and len(fam["sha256"]) == 64
        assert fam["file"].endswith("demo_eed_s50.family.toml")
        assert d.sha256() != f.sha256()  # the provenance is part of the resolved config
    at = load_entry("demo_eed_s50_at")  # [set_for] after [set]: the AT base has no masks
    assert at.model.transform_options == {} and at.train.epochs == 1 and at.method_params.adv_steps == 2
    # a file entry's resolved form has no _family key (existing hashes and runs stay valid)
    assert "_family" not in load_entry("demo_eed_nis_0").resolved()


def test_references_point_inside_the_derived_chain(zoo):
    nis = load_entry("demo_eed_s50_nis_0")
    assert nis.train.init_from == "demo_eed_s50_nis_0_prune" and nis._extends == "demo_eed_s50_nis_0_prune"
    assert load_entry("demo_eed_s50_nis_0_prune").method_params.dense_from == "demo_eed_s50_at"
    team = load_entry("demo_eed_s50_team").method_params.team
    # ase_2 and bnsf_1 are not members of this family: their references stay on the file entries
    assert team == ["demo_eed_ase_2", "demo_eed_bnsf_1"]
    (zoo / "demo_eed_s50.family.toml").write_text(FAMILY.replace('"team"]', '"team", "ase_2", "bnsf_1"]'))
    assert load_entry("demo_eed_s50_team").method_params.team == ["demo_eed_s50_ase_2", "demo_eed_s50_bnsf_1"]


def test_path_spec_finds_the_family_in_that_folder(zoo, monkeypatch):
    monkeypatch.setattr(config, "ZOO_DIR", ZOO_DIR)  # the real zoo: the folder in the path is searched first
    e = load_entry(str(zoo / "demo_eed_s50_nis_0"))
    assert e.name == "demo_eed_s50_nis_0" and e.source == str(zoo / "demo_eed_s50.family.toml")


@pytest.mark.parametrize("edit, where", [
    (lambda t: t.replace("train.params.adv_steps = 2", "train.params.bogus = 2"), "train.params.bogus"),
    (lambda t: t.replace("train.params.adv_steps = 2", '"train.epochs.x" = 2'), "train.epochs.x"),
    (lambda t: t.replace("train.params.adv_steps = 2", '"train.epochs" = -1'), "train.epochs"),
    (lambda t: t.replace('from = "demo_eed"', 'from = "demo_nope"'), "from"),
    (lambda t: t.replace('"erm_0",', '"erm_9",'), "entries"),
    (lambda t: t.replace('[set_for."at"]', '[set_for."zz*"]'), "set_for.zz*"),
    (lambda t: "bogus = 1\n" + t, "bogus"),
    (lambda t: t.replace('tags = ["s50"]\n', 'tags = ["s50"]\ncopies = { nis_3 = "nis_9" }\n'), "copies.nis_3"),
    (lambda t: t.replace('tags = ["s50"]\n', 'tags = ["s50"]\ncopies = { erm_0 = "nis_2" }\n'), "copies.erm_0"),
    (lambda t: t.replace('tags = ["s50"]\n', 'tags = ["s50"]\ncopies = { nis_3 = "nis_2", nis_3_prune = "ase_2" }\n'),
     "copies.nis_3_prune"),
    (lambda t: t.replace('tags = ["s50"]\n', 'tags = ["s50"]\ncopies = ["nis_2"]\n'), "copies"),
])
def test_bad_family_is_one_line_naming_file_and_key(zoo, edit, where):
    fam = zoo / "demo_eed_s50.family.toml"
    fam.write_text(edit(FAMILY))
    with pytest.raises(ConfigError) as ei:
        load_entry("demo_eed_s50_nis_0")
    msg = str(ei.value)
    assert "\n" not in msg and msg.startswith(f"{fam}: {where}: "), msg
    res = CliRunner().invoke(main, ["zoo", "show", "demo_eed_s50_nis_0"])
    assert res.exit_code == 2 and res.output.count("\n") == 1 and str(fam) in res.output, res.output


def test_name_clash_with_a_file_entry(zoo):
    shutil.copy(zoo / "demo_eed_nis_0.toml", zoo / "demo_eed_s50_nis_0.toml")
    with pytest.raises(ConfigError, match=r"demo_eed_s50\.family\.toml: to: derives 'demo_eed_s50_nis_0', which is also a file"):
        list_entries(zoo)
    (zoo / "demo_eed_s50_nis_0.toml").unlink()
    (zoo / "other.family.toml").write_text('from = "demo_eed"\nto = "demo_eed_s50"\nentries = ["nis_0"]\n')
    with pytest.raises(ConfigError, match="which demo_eed_s50.family.toml derives too"):
        list_entries(zoo)


def test_family_file_named_as_an_entry(zoo):
    with pytest.raises(ConfigError, match="a family file derives entries, it is not one; name one of: demo_eed_s50_at"):
        load_entry(str(zoo / "demo_eed_s50.family.toml"))


def test_train_derived_digits_entry(zoo, tmp_path):
    """``robbench train`` of a derived entry: a one-epoch, 2-step PGD-AT base (the family's overrides)."""
    runs = tmp_path / "runs"
    res = CliRunner().invoke(main, ["train", "demo_eed_s50_at", "--runs-dir", str(runs), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    m = json.loads((runs / "demo_eed_s50_at" / "manifest.json").read_text())
    assert m["entry"] == "demo_eed_s50_at" and m["status"] == "complete" and m["epochs_done"] == 1
    assert m["config"]["train"]["params"]["adv_steps"] == 2
    assert m["config"]["_family"]["sha256"] == config.zoo_family.index(zoo)["demo_eed_s50_at"][0].sha256
    assert m["entry_sha256"] == load_entry("demo_eed_s50_at").sha256()
    # the next member names the derived base: its prerequisite error points inside the derived chain
    res = CliRunner().invoke(main, ["train", "demo_eed_s50_erm_0", "--runs-dir", str(runs), "--device", "cpu"])
    assert res.exit_code == 2 and "demo_eed_s50_erm_0_prune" in res.output, res.output


# ----------------------------------------------------------------------------------------------
# EED supplementary Tables 4, 5 and 8: the family-derived entries the views name
# ----------------------------------------------------------------------------------------------

BUDGETS = {"5.6M": 0.50, "3.4M": 0.70, "2.2M": 0.80, "1.1M": 0.90, "0.6M": 0.95}  # Table 5 -> s_r (families)
POOL = [f"{s}_{m}" for s in ("nis", "erm", "ase", "bnsf") for m in (0, 1, 2, 3, 4)]  # d = 6: sub-models 0..4


def _expected(table: str, label: str) -> tuple[float, int, str]:
    """(s_r, d, architecture) a Table 4/5/8 row stands for, from its label (EED supp. B.1, B.2, B.5)."""
    import re

    if table == "4":
        return 0.90, 4, {"ResNet50": "resnet50", "ResNet101": "resnet101"}[label.split("/")[0]]
    if table == "5":
        m = re.search(r"\((\d\.\dM)\)$", label)
        return (BUDGETS[m.group(1)] if m else 0.0), 4, "resnet18"
    m = re.fullmatch(r"EED d=(\d) \[s(\d\d)\]", label)
    return int(m.group(2)) / 100, int(m.group(1)), "resnet18"


def _rows():
    from robbench.report.views import load_views

    return [(v.table, v.dataset, label, e) for v in load_views().view if v.paper == "eed" and v.table in ("4", "5", "8")
            for label, e in v.rows.items() if e]


def _keeps(entry) -> list[float]:
    """Every masked layer's target keep fraction, from the model built on the meta device (no weights)."""
    import torch

    from robbench.data import get_info
    from robbench.models.build import build_model
    from robbench.pruning.masked import MaskedMixin

    with torch.device("meta"):
        net = build_model(entry, get_info(entry.data.dataset))
    return [m.keep for m in net.modules() if isinstance(m, MaskedMixin)]


def test_table_rows_name_entries_with_the_rows_settings():
    rows = _rows()
    assert len(rows) >= 85  # Tables 4 and 5: 55, Table 8: 2 x 15 mapped rows (d = 1, 3, 4, 5, 6 at s50/s80/s90)
    zoo = set(list_entries())
    for table, dataset, label, name in rows:
        s_r, d, arch = _expected(table, label)
        e = load_entry(name)
        assert e.data.dataset == dataset, (label, name)
        kind = name.rsplit("_", 1)[-1]
        if kind == "at":
            assert e.model.arch == arch and e.train.method == "pgd_at" and e.model.transform is None, name
        elif kind in ("hydra", "harp", "mad"):
            assert e.model.arch == arch and e.model.transform_options["sparsity"] == pytest.approx(s_r), name
            assert e.model.transform_options["learn_rates"] is (kind == "harp"), name
            assert load_entry(e.train.init_from).train.params.get("dense_from") == e.method_params.dense_from
        else:  # an EED team: its pool has d - 1 sub-models per score (d = 1: one, on the whole set)
            assert kind == "team" and e.model.arch == "eed_team" and e.model.options["base_arch"] == arch, name
            c_r = 1 - (1 - s_r) / 4  # §5.1: 80% -> 95%, the same factor at every rate
            assert e.model.transform_options["sparsity"] == pytest.approx(c_r), name
            prefix = name[: -len("_team")]
            members = [m for m in POOL if int(m[-1]) < max(d - 1, 1)]
            assert {m for m in POOL if f"{prefix}_{m}" in zoo} == set(members), name
            for m in members:
                p = load_entry(f"{prefix}_{m}_prune")
                assert p.model.transform_options["sparsity"] == pytest.approx(c_r) and p.model.arch == arch
                assert p.method_params.subset == ("all" if d == 1 else "eed"), p.name
                if d > 1:  # B.5: d parts, one shared + d - 1 private (one per sub-model of a score)
                    assert (p.method_params.subset_parts, p.method_params.subset_member) == (d, int(m[-1])), p.name
                assert p.method_params.dense_from == f"{prefix}_at" and p.data.dataset == dataset
                assert p.method_params.hw_gamma == (0.1 if table == "4" else 0.01)  # App. A.1
                assert load_entry(f"{prefix}_{m}").train.init_from == p.name
            base = load_entry(f"{prefix}_at")
            if table != "4" and base._family is not None:  # budget / d sweeps prune the Table 1 AT base
                assert base.train.epochs == 0 and base.train.init_from == f"eed_resnet18_{dataset}_at"


def test_budgets_are_the_sparsity_of_the_built_models():
    """Table 5's budgets and Table 4's Params column are the dense parameter counts times (1 - s_r), for
    the models robbench builds (meta device: no weights), and the built layers keep what the entry says."""
    import torch

    from robbench.data import get_info
    from robbench.models.build import build_model

    def dense(name: str) -> int:
        e = load_entry(name)
        with torch.device("meta"):
            return sum(p.numel() for p in build_model(e, get_info(e.data.dataset)).parameters())

    n18 = dense("eed_resnet18_cifar10_at")
    assert 11.1e6 < n18 < 11.25e6  # Table 5: 11.2M
    for budget, s_r in BUDGETS.items():
        assert abs((1 - float(budget[:-1]) * 1e6 / n18) - s_r) < 0.01, budget
    for name, params, kept in (("eed_resnet50_imagenet_at", 25.6e6, 2.6e6), ("eed_resnet101_imagenet_at", 44.6e6, 4.5e6)):
        n = dense(name)
        assert abs(n / params - 1) < 0.002 and abs((1 - kept / n) - 0.90) < 0.005, name  # 44.55M printed 44.6M
    for name, keep in (("eed_resnet18_cifar10_s95_nis_0_prune", 0.0125), ("eed_resnet18_svhn_s70_hydra_prune", 0.3),
                       ("eed_resnet101_imagenet_bnsf_2_prune", 0.025), ("eed_resnet50_cifar100_harp_prune", 0.1),
                       ("eed_resnet18_cifar10_s50_d1_team", 0.125)):
        keeps = _keeps(load_entry(name))
        assert len(keeps) > 20 and all(k == pytest.approx(keep) for k in keeps), name


def test_eed_report_renders_the_derived_rows_not_run(tmp_path):
    from robbench.report import write_report

    write_report(paper="eed", out=tmp_path / "out", db=tmp_path / "none.db", runs_dir=tmp_path / "runs", fmt="md",
                 screenshot=False)
    text = (tmp_path / "out" / "eed" / "README.md").read_text()
    for row in ("| HYDRA (1.1M) | not run (76.74) |", "| EED d=1 [s50] | not run (84.53) |",
                "| ResNet101/EED(ours) | not run (74.10) |", "| ResNet50/HARP | not run (62.51) |"):
        assert row in text, row
    for name in ("eed_resnet18_cifar10_s90_hydra", "eed_resnet18_cifar10_s50_d1_team", "eed_resnet101_imagenet_team",
                 "eed_resnet18_svhn_s95_harp", "eed_resnet50_cifar100_harp"):
        assert f"`{name}`" in text, name


def test_description_replace_tags_drop_and_member_alternatives(zoo):
    text = 'tags_drop = ["pool"]\n' + FAMILY.replace('[set_for."at"]', '[set_for."at|team"]')
    text += '\n[description_replace]\n"NIS sub-model 0" = "NIS sub-model zero"\n'
    (zoo / "demo_eed_s50.family.toml").write_text(text)
    nis = load_entry("demo_eed_s50_nis_0")
    assert "NIS sub-model zero" in nis.description and "pool" not in nis.tags and nis.tags[-1] == "s50"
    assert "pool" in load_entry("demo_eed_nis_0").tags
    assert load_entry("demo_eed_s50_team").train.epochs == 1 == load_entry("demo_eed_s50_at").train.epochs
    assert nis.train.epochs != 1


def test_a_missing_run_of_a_derived_entry_says_how_to_train_it(tmp_path):
    """The hint for a derived entry is its train command, as for a file entry; an unknown name is told so."""
    from robbench.checkpoint import RunDir
    from robbench.errors import CheckpointError

    with pytest.raises(CheckpointError, match=r"train it with: robbench train zoo/eed_resnet18_cifar10_s50_nis_0"):
        RunDir(tmp_path, "eed_resnet18_cifar10_s50_nis_0").read_manifest()
    with pytest.raises(CheckpointError, match="no zoo entry of that name"):
        RunDir(tmp_path, "eed_resnet18_cifar10_s51_nis_0").read_manifest()


COPIES = FAMILY.replace('tags = ["s50"]\n', 'tags = ["s50"]\ncopies = { nis_3 = "nis_2", ase_3 = "ase_2" }\n') + """
[set_for."nis_*"]
"train.params.subset_parts" = 5
[set_for."nis_3*"]
"train.params.subset_member" = 3
"""


def test_copy_references_point_into_its_own_group(zoo):
    (zoo / "demo_eed_s50.family.toml").write_text(COPIES)
    names = set(list_entries(zoo))
    assert {"demo_eed_s50_nis_3", "demo_eed_s50_nis_3_prune", "demo_eed_s50_ase_3", "demo_eed_s50_ase_3_prune"} <= names
    assert "demo_eed_s50_nis_2" not in names  # the old group is not a member unless `entries` names it
    nis = load_entry("demo_eed_s50_nis_3")
    # its own prune entry (the old group's name renamed into the copy's group); the extends chain's root,
    # nis_0_prune, is a member
    assert nis.train.init_from == "demo_eed_s50_nis_3_prune" and nis._extends == "demo_eed_s50_nis_0_prune"
    prune = load_entry("demo_eed_s50_nis_3_prune")
    # the source prune entry extends nis_0_prune, a member: renamed as in any member
    assert prune.method_params.dense_from == "demo_eed_s50_at" and prune._extends == "demo_eed_s50_nis_0_prune"
    assert prune.method_params.subset_member == 3 and prune.method_params.subset_parts == 5
    # other members keep today's references: the team names the file entry ase_2, not the copy ase_3
    assert load_entry("demo_eed_s50_team").method_params.team == ["demo_eed_ase_2", "demo_eed_bnsf_1"]
    # with the old group a member too, it derives as before and the copy still points at its own group
    (zoo / "demo_eed_s50.family.toml").write_text(COPIES.replace('"team"]', '"team", "nis_2_prune", "nis_2"]'))
    assert load_entry("demo_eed_s50_nis_2").train.init_from == "demo_eed_s50_nis_2_prune"
    assert load_entry("demo_eed_s50_nis_3").train.init_from == "demo_eed_s50_nis_3_prune"
    assert "nis_3: a copy of nis_2" in load_entry("demo_eed_s50_nis_3").description


def test_copy_equals_its_source_entry_plus_overrides(zoo):
    (zoo / "demo_eed_s50.family.toml").write_text(COPIES)
    members = ("at", "nis_0_prune", "nis_0", "erm_0_prune", "erm_0", "team")
    mapping = {f"demo_eed_{s}": f"demo_eed_s50_{s}" for s in members}
    mapping |= {"demo_eed_nis_2_prune": "demo_eed_s50_nis_3_prune", "demo_eed_nis_2": "demo_eed_s50_nis_3"}
    sets = ["model.transform_options.sparsity=0.5", "train.params.adv_steps=2", "train.params.subset_parts=5",
            "train.params.subset_member=3"]
    for name in ("nis_3_prune", "nis_3"):
        d = load_entry(f"demo_eed_s50_{name}")
        src = name.replace("nis_3", "nis_2")
        f = load_entry(f"demo_eed_{src}", sets)
        assert _core(d.resolved()) == rename_refs(_core(f.resolved()), mapping), name
        assert d.resolved()["_family"]["from_entry"] == f"demo_eed_{src}"
    # ase_3 gets no [set_for."nis_*"] values: the patterns see the copy's own suffix
    ase = load_entry("demo_eed_s50_ase_3_prune").method_params
    assert (ase.subset_parts, ase.subset_member) == (4, 2)


def test_table8_d_pools_cut_disjoint_private_parts_and_the_pipeline_names_them():
    """Each Table 8 d = 3/5/6 chain: the pipeline's pool names exist, and the sub-models of one score share
    one part and get pairwise disjoint private parts of the cut their entries ask for (a small n)."""
    from robbench.eed.pipeline import pool_entries
    from robbench.eed.subsets import eed_subset

    zoo = set(list_entries())
    n = 600
    for ds in ("cifar10", "svhn"):
        for d in (3, 5, 6):
            for sp in ("_s50", "", "_s90"):
                prefix = f"eed_resnet18_{ds}{sp}_d{d}"
                pool = pool_entries(prefix, ("nis", "erm", "ase", "bnsf"), tuple(range(d - 1)))
                assert len(pool) == 4 * (d - 1) and set(pool) <= zoo, prefix
                assert f"{prefix}_{'nis'}_{d - 1}" not in zoo and f"{prefix}_team" in zoo, prefix
                for score in ("nis", "erm", "ase", "bnsf"):
                    cuts = []
                    for m in range(d - 1):
                        p = load_entry(f"{prefix}_{score}_{m}_prune").method_params
                        assert (p.subset, p.subset_parts, p.subset_member) == ("eed", d, m), (prefix, score, m)
                        cuts.append(set(eed_subset(n, p.subset_member, key=p.subset_key or p.score,
                                                   parts=p.subset_parts)))
                    shared = set.intersection(*cuts)
                    assert len(shared) == n // d, (prefix, score)
                    private = [c - shared for c in cuts]
                    assert all(len(c) == n // d for c in private)
                    assert len(set().union(*private)) == (d - 1) * (n // d)  # pairwise disjoint
