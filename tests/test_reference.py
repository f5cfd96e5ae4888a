"""Published numbers: spot checks of protocols/reference/*.csv against the papers' text (values copied
here by hand from ../shared/papers/, which tests never read)."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest

from robbench.report.reference import COLUMNS, load_reference, published, reference_dir, table_layout

# (paper, table, row, column, value as printed in the paper)
SPOT = [
    ("dverge", "1", "GAL", "training time", "7.5"),              # appendix A Table 1
    ("dverge", "3", "DVERGE/5 train-eps=0.05", "black-box eps=0.03", "57.2"),  # Table 3: 91.5% / 57.2% / 48.9%
    ("dverge", "3", "DVERGE/8 train-eps=0.07", "white-box eps=0.01", "52.4"),
    ("dverge", "4", "DVERGE/8", "0.05", "34.9"),                 # Table 4
    ("dverge", "4", "GAL/3", "clean", "88.3"),
    ("dverge", "5", "ADP/8", "0.02", "4.9"),                     # the value C.3 calls obfuscated gradients
    ("dverge", "5", "DVERGE+AdvT/5", "0.07", "3.6"),
    ("dverge", "6", "GAL/8", "0.03", "5.4"),                     # Table 6
    ("dverge", "7", "DVERGE/3 ResBlock 3 (layer 19)", "white-box eps=0.01", "31.0"),
    ("dverge", "8", "DVERGE/5", "white-box eps=0.01 steps=50", "50.4"),
    ("eio", "preprint-2", "EIO sub-models=3 n=2", "white-box eps=0.01", "61.5"),
    ("eio", "preprint-3", "EIO(top21)/1", "0.03", "64.1"),
    ("eio", "preprint-3", "DVERGE/8/1", "0.07", "8.7"),
    ("eio", "preprint-4", "EIO(top14)/1", "0.02", "9.5"),
    ("eio", "iclr-1", "GAL/5", "white-box eps=0.01", "31.7"),
    ("eed", "1", "VGG16/HARP", "SVHN/AA", "44.73"),
    ("eed", "1", "ResNet18/EED(ours)", "CIFAR-10/Speed up", "1.86"),
    ("eed", "4", "ResNet101/EED(ours)", "ImageNet/PGD", "64.66"),
    ("eed", "5", "RST (0.6M)", "CIFAR-10/Clean", "48.90"),
    ("eed", "6", "VGG16/EEDmart", "DF", "57.55"),
    ("eed", "7", "ResNet18/EEDmax", "Speed up", "1.88"),
    ("eed", "8", "EED d=6 [s90]", "SVHN/DF", "47.15"),
    ("eed", "9", "VGG16/EED+SoE", "C&W", "53.11"),
    ("xie", "2", "MBN_adv, 100% adv + 100% clean", "PGD-2000", "38.3"),
    ("xie", "7", "GN, 100% adv + 100% clean", "PGD-500", "39.5"),
]


@pytest.mark.parametrize("paper,table,row,column,printed", SPOT)
def test_spot_cells_match_the_papers(paper: str, table: str, row: str, column: str, printed: str) -> None:
    ref = published(paper, table, row, column)
    assert ref is not None
    assert ref.printed == printed
    assert ref.value == pytest.approx(float(printed))


def test_differences_resolve_to_absolute_values() -> None:
    # Xie & Yuille Table 2 prints '+3.0' under 39.2 for running statistics in the last 10 epochs
    ref = published("xie", "2", "100% adv + 0% clean*", "PGD-2000")
    assert ref is not None and ref.printed == "+3.0"
    assert ref.value == pytest.approx(42.2) and ref.unit == "%"
    # ... which appendix Table 7 confirms as an absolute number
    assert published("xie", "7", "100% adv + 0% clean*", "PGD-2000").value == pytest.approx(42.2)


def test_tables_have_the_papers_shapes() -> None:
    rows, cols = table_layout("dverge", "4")
    assert cols == ["clean", "0.01", "0.02", "0.03", "0.04", "0.05", "0.06", "0.07"]
    assert len(rows) == 18 and rows[0] == "baseline/3" and rows[-1] == "DVERGE+AdvT/8"
    assert len(table_layout("dverge", "5")[0]) == 18
    assert len(table_layout("dverge", "6")[0]) == 9
    assert len(table_layout("eio", "preprint-3")[0]) == 15
    rows, cols = table_layout("eed", "1")
    assert len(rows) == 18 and "SVHN/DF" in cols


def test_files_are_well_formed() -> None:
    keys = load_reference()
    assert len(keys) > 2000
    for path in sorted(reference_dir().glob("*.csv")):
        with open(path, newline="") as fh:
            reader = csv.DictReader(fh)
            assert tuple(reader.fieldnames or ()) == COLUMNS, path
            for r in reader:
                assert r["paper"] == path.stem, (path, r)
                float(r["value"])
                assert r["unit"] in ("%", "pp", "x", "h", "M params", ""), r
    # every published accuracy is a percentage in range
    for (p, t, r, c), row in keys.items():
        if row["unit"] == "%":
            assert 0.0 <= float(row["value"]) <= 100.0, (p, t, r, c)


def test_views_name_existing_reference_tables() -> None:
    from robbench.report.views import load_views

    spec = load_views()
    tables = {(p, t) for (p, t, _, _) in load_reference()}
    for v in spec.view:
        if v.ref_paper_table not in tables:  # a figure/table without published numbers names its columns
            assert not v.reference and v.columns, v.table
            continue
        rows, cols = table_layout(*v.ref_paper_table)
        if v.compare:  # a view differenced against a table must use that table's labels
            for c in v.columns:
                assert c in cols, (v.table, c)
            for r in v.rows:
                assert r in rows, (v.table, r)


def test_view_entries_exist_in_the_zoo() -> None:
    """Every entry a view names is a zoo entry, or a run `robbench derive` makes from one
    (``<entry>_path<i>`` / ``<entry>_ens<k>``)."""
    import re

    from robbench.config import list_entries
    from robbench.report.views import load_views

    zoo = set(list_entries())
    spec = load_views()
    named = {e for v in spec.view for r in v.rows for e in v.runs_of(r)}
    named |= {e for t in spec.training_time for e in t.rows.values()}
    named |= {e for h in spec.heatmap for e in h.entries}
    for e in sorted(named):
        base = re.sub(r"_(path\d+|ens\d+)$", "", e)
        assert e in zoo or base in zoo, e


def test_a_view_without_published_numbers_renders(tmp_path: Path) -> None:
    """A view of one's own (no reference table) is allowed: its columns are its own, cells 'not run'."""
    from robbench.report import write_report
    from robbench.report.views import load_views

    p = tmp_path / "mine.toml"
    p.write_text('[papers.mine]\ntitle = "Mine"\n[[view]]\npaper = "mine"\ntable = "robustness"\n'
                 'title = "My table"\nprotocol = "demo-whitebox"\ncolumns = ["clean", "0.1"]\ncurves = true\n'
                 '[view.rows]\n"my model" = "demo_baseline_x3"\n')
    spec = load_views(p)
    assert spec.view[0].ref_paper_table == ("mine", "robustness")
    write_report(paper=str(p), out=tmp_path / "out", db=tmp_path / "none.db", runs_dir=tmp_path / "runs",
                 fmt="md", screenshot=False)
    text = (tmp_path / "out" / "mine" / "README.md").read_text()
    assert "| my model | not run | not run | – | – |" in text and "no published numbers" in text
