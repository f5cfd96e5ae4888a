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
