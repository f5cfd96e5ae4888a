"""Report generation from a small fixture store: golden markdown, leaderboard order, sanity flags,
valid PNGs, determinism, csv/json formats."""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest

from robbench.outcomes import OutcomeKey
from robbench.store import Store

GOLDEN = Path(__file__).parent / "golden"
EPS = [0.01, 0.02, 0.03]
N = 40  # samples per run: small, but enough for distinct Wilson intervals

VIEWS = '''
leaderboard_exclude = ["*:*"]
[headline_eps]
"dverge-blackbox" = 0.02
[papers.fix]
title = "Fixture paper"
intro = "A tiny store built in tests/test_report.py."

[[view]]
paper = "fix"
table = "4"
reference = "dverge:4"
title = "Black-box accuracy vs eps"
protocol = "dverge-blackbox"
columns = ["clean", "0.01", "0.02", "0.03"]
curves = true
[view.rows]
"baseline/3" = "baseline_resnet20_x3"
"ADP/3" = "adp_resnet20_x3"
"GAL/3" = "gal_resnet20_x3"
"DVERGE/3" = "dverge_resnet20_x3"
"AdvT/3" = "advt_resnet20_x3"
"DVERGE+AdvT/3" = "dverge_advt_resnet20_x3"

[[view]]
paper = "fix"
table = "5"
reference = "dverge:5"
title = "White-box accuracy vs eps"
protocol = "dverge-whitebox"
columns = ["clean", "0.01", "0.02", "0.03"]
curves = true
[view.rows]
"baseline/3" = "baseline_resnet20_x3"
"ADP/3" = "adp_resnet20_x3"
"GAL/3" = "gal_resnet20_x3"
"DVERGE/3" = "dverge_resnet20_x3"

[[view]]
paper = "fix"
table = "8"
reference = "dverge:8"
title = "Convergence"
protocol = "dverge-convergence"
columns = ["white-box eps=0.01 steps=50", "white-box eps=0.01 steps=500", "white-box eps=0.01 steps=1000"]
[view.measures]
"white-box eps=0.01 steps=50" = { eps = 0.01, attacks = ["pgd-wb"], steps = 50 }
"white-box eps=0.01 steps=500" = { eps = 0.01, attacks = ["pgd-wb"], steps = 500 }
"white-box eps=0.01 steps=1000" = { eps = 0.01, attacks = ["pgd-wb"], steps = 1000 }
[view.rows]
"DVERGE/3" = "dverge_resnet20_x3"

[[heatmap]]
paper = "fix"
protocol = "dverge-transferability"
eps = 0.03

[[iterations]]
paper = "fix"
protocol = "dverge-convergence"

[[training_time]]
paper = "fix"
reference = "dverge:1"
[training_time.rows]
"Baseline" = "baseline_resnet20_x3"
"DVERGE" = "dverge_resnet20_x3"
'''

# accuracy per eps (clean first) of each fixture entry: baseline and DVERGE are sane; ADP's white-box beats
# its black-box at 0.02 (masking); GAL's white-box rises with eps and never falls.
CURVES = {
    ("baseline_resnet20_x3", "dverge-blackbox"): [0.95, 0.10, 0.025, 0.0],
    ("baseline_resnet20_x3", "dverge-whitebox"): [0.95, 0.025, 0.0, 0.0],
    ("adp_resnet20_x3", "dverge-blackbox"): [0.925, 0.20, 0.0, 0.0],
    ("adp_resnet20_x3", "dverge-whitebox"): [0.925, 0.15, 0.10, 0.0],
    ("gal_resnet20_x3", "dverge-blackbox"): [0.90, 0.75, 0.60, 0.40],
    ("gal_resnet20_x3", "dverge-whitebox"): [0.90, 0.30, 0.50, 0.60],
    ("dverge_resnet20_x3", "dverge-blackbox"): [0.90, 0.85, 0.70, 0.50],
    ("dverge_resnet20_x3", "dverge-whitebox"): [0.90, 0.375, 0.10, 0.025],
    ("advt_resnet20_x3", "dverge-blackbox"): [0.775, 0.75, 0.75, 0.725],
}
ATTACKS = {"dverge-blackbox": ["mpgd-ce-0", "sgm-cw"], "dverge-whitebox": ["pgd-ce"]}
FIXED_TIME = "2026-01-0{}T12:00:00+00:00"


def _outcome_rows(accs: list[float], attacks: list[str], rng: np.random.Generator) -> list[tuple]:
    """Nested correct sets (a sample robust at a larger eps is robust at a smaller one); every listed
    attack fails on robust samples, one random attack fools the others."""
    rows = []
    order = rng.permutation(N)
    k_clean = round(accs[0] * N)
    for s in range(N):
        rows.append(("clean", 0.0, int(s), -1, int(order[s] < k_clean), None))
    for e, acc in zip(EPS, accs[1:]):
        k = round(acc * N)
        for s in range(N):
            robust = order[s] < k
            fooled_by = int(rng.integers(len(attacks)))
            for j, a in enumerate(attacks):
                rows.append((a, e, int(s), -1, int(robust or j != fooled_by), None))
    return rows


def build_store(root: Path) -> tuple[Path, Path]:
    db, runs = root / "results.db", root / "runs"
    rng = np.random.default_rng(0)
    st = Store(db)
    day = 1
    for (entry, proto), accs in sorted(CURVES.items()):
        rid = st.start_run(entry, f"sha-{entry}", proto, "p" * 8, seed=0, versions={})
        st.write_batch(rid, "0", _outcome_rows(accs, ATTACKS[proto], rng))
        st.finish_run(rid)
        st.conn.execute("UPDATE runs SET started = ?, finished = ? WHERE run_id = ?",
                        (FIXED_TIME.format(day), FIXED_TIME.format(day), rid))
        day = day % 9 + 1
    # AutoAttack warning and a randomized model without EOT, both on ADP's white-box run
    adp = int(st.runs(entry="adp_resnet20_x3", protocol="dverge-whitebox")["run_id"].iloc[0])
    st.put_meta(adp, "attack_warnings", ["robust accuracy at 1 restart differs from 5 restarts"])
    st.put_meta(adp, "randomized", True)
    # transferability: 3 members; member i's examples fool i always, others rarely; ensemble in between
    rid = st.start_run("dverge_resnet20_x3", "sha-dverge_resnet20_x3", "dverge-transferability", "t" * 8, seed=0,
                       versions={})
    rows = []
    for i in range(3):
        for j in [0, 1, 2, -1]:
            rate = 1.0 if i == j else (0.5 if j == -1 else 0.1 * (i + 1))
            for s in range(N):
                rows.append((OutcomeKey("pgd", source_member=i), 0.03, s, j, int(s >= round(rate * N)), None))
    st.write_batch(rid, "0", rows)
    st.finish_run(rid)
    st.conn.execute("UPDATE runs SET started = ?, finished = ? WHERE run_id = ?",
                    (FIXED_TIME.format(9), FIXED_TIME.format(9), rid))
    # convergence: accuracy falls a little with iterations
    rid = st.start_run("dverge_resnet20_x3", "sha-dverge_resnet20_x3", "dverge-convergence", "c" * 8, seed=0,
                       versions={})
    rows = [("clean", 0.0, s, -1, 1, None) for s in range(N)]
    for steps, k in ((50, 20), (500, 18), (1000, 17)):
        rows += [(OutcomeKey("pgd-wb", steps=steps), 0.01, s, -1, int(s < k), None) for s in range(N)]
    st.write_batch(rid, "0", rows)
    st.finish_run(rid)
    st.conn.execute("UPDATE runs SET started = ?, finished = ? WHERE run_id = ?",
                    (FIXED_TIME.format(9), FIXED_TIME.format(9), rid))
    st.close()
    # run folders: manifest (members, dataset), a safetensors header for the parameter count, a log
    from safetensors.numpy import save_file

    for i, entry in enumerate(sorted({e for e, _ in CURVES})):
        d = runs / entry
        d.mkdir(parents=True)
        (d / "manifest.json").write_text(json.dumps({"entry": entry, "status": "complete", "config": {
            "model": {"members": 3}, "data": {"dataset": "cifar10"}}}))
        save_file({"members.0.fc.weight": np.zeros((10, 64), np.float32),
                   "members.0.bn.running_mean": np.zeros(64, np.float32)}, str(d / "model.safetensors"))
        with open(d / "log.jsonl", "w") as fh:
            for ep in range(1, 4):
                fh.write(json.dumps({"epoch": ep, "losses": {"ce": 2.0 / ep + i}, "test_acc": 0.5 + 0.1 * ep,
                                     "seconds": 10.0 * (1 + i)}) + "\n")
    return db, runs


@pytest.fixture(scope="module")
def fixture_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("store")
    db, runs = build_store(root)
    views = root / "views.toml"
    views.write_text(VIEWS)
    return db, runs, views


@pytest.fixture(scope="module")
def report(fixture_store: tuple[Path, Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    from robbench.report import write_report

    db, runs, views = fixture_store
    out = tmp_path_factory.mktemp("report")
    write_report(paper="all", out=out, db=db, runs_dir=runs, fmt="md", views=views, screenshot=False)
    return out


def test_report_matches_golden_markdown(report: Path) -> None:
    text = (report / "fix" / "README.md").read_text()
    golden = GOLDEN / "report_fixture.md"
    if os.environ.get("ROBBENCH_UPDATE_GOLDEN"):
        golden.write_text(text)
    assert text == golden.read_text()


def test_unrun_cells_are_marked_not_hidden(report: Path) -> None:
    text = (report / "fix" / "README.md").read_text()
    # mapped but never evaluated: marked, with the published value kept (DVERGE Table 4, DVERGE+AdvT/3 clean 81.4)
    assert "| DVERGE+AdvT/3 | not run (81.4) |" in text
    # published rows without a zoo entry stay in the table
    assert "| DVERGE/8 | · (91.1) |" in text


def _board(fixture_store: tuple[Path, Path, Path], out: Path) -> "pd.DataFrame":
    import pandas as pd

    from robbench.report import write_report

    db, runs, views = fixture_store
    write_report(paper="fix", out=out, db=db, runs_dir=runs, fmt="csv", views=views)
    return pd.read_csv(out / "leaderboard.csv")


def test_leaderboard_ranks_by_all_or_nothing_then_clean(fixture_store, tmp_path: Path) -> None:
    board = _board(fixture_store, tmp_path)
    bb = board[board["protocol"] == "dverge-blackbox"]
    # headline eps 0.02 from the views file; expected order from the fixture's definition
    idx = EPS.index(0.02) + 1
    want = sorted((e for (e, p) in CURVES if p == "dverge-blackbox"),
                  key=lambda e: (-round(CURVES[(e, "dverge-blackbox")][idx] * N), -CURVES[(e, "dverge-blackbox")][0], e))
    assert list(bb["entry"]) == want
    assert list(bb["rank"]) == list(range(1, len(want) + 1))
    assert (bb["eps"] == 0.02).all()
    wb = board[board["protocol"] == "dverge-whitebox"].set_index("entry")
    # adp and dverge tie at 10% white-box; adp's higher clean accuracy ranks it first
    assert wb.loc["adp_resnet20_x3", "rank"] < wb.loc["dverge_resnet20_x3", "rank"]
    assert (board["forward_passes"] == 3).all()
    assert (board["params"] == 10 * 64).all()  # BN running statistics are buffers, not parameters
    assert board.loc[board["entry"] == "advt_resnet20_x3", "checkpoint_sha256"].iloc[0] == "sha-advt_resnet20_x3"
    html = (tmp_path / "leaderboard.csv").read_text()
    assert "dverge-transferability" not in html  # not a ranking protocol


def test_leaderboard_html_is_static(report: Path) -> None:
    """One self-contained page: its script is inline, nothing is fetched (no src=, no http)."""
    html = (report / "leaderboard.html").read_text()
    assert html.startswith("<!DOCTYPE html>")
    assert "src=" not in html and "http" not in html and "<link" not in html
    assert html.index("advt_resnet20_x3") < html.index("baseline_resnet20_x3")
    assert 'id="filter"' in html and 'href="runs.html#run-' in html
    runs = (report / "runs.html").read_text()
    for rid in {int(x) for x in __import__("re").findall(r"runs\.html#run-(\d+)", html)}:
        assert f'id="run-{rid}"' in runs


def test_flags_fire_on_bad_cases_and_stay_quiet_on_good(fixture_store) -> None:
    from robbench.report.flags import compute_flags
    from robbench.report.results import Results

    db, runs, _ = fixture_store
    flags = compute_flags(Results(db, runs))
    codes: dict[str, set[str]] = {}
    for f in flags:
        codes.setdefault(f.entry, set()).add(f.code)
    assert codes.get("adp_resnet20_x3") == {"whitebox>blackbox", "attack-check", "randomized-no-eot"}
    assert {"rises-with-eps", "no-fall", "whitebox>blackbox"} == codes.get("gal_resnet20_x3")
    for good in ("baseline_resnet20_x3", "dverge_resnet20_x3", "advt_resnet20_x3"):
        assert good not in codes
    masking = [f for f in flags if f.entry == "adp_resnet20_x3" and f.code == "whitebox>blackbox"]
    assert [f.eps for f in masking] == [0.02]


def test_flag_rules_on_constructed_curves() -> None:
    from robbench.report.flags import curve_flags, pair_flags

    assert curve_flags("e", "p", "whitebox", {0.01: 0.4, 0.02: 0.1, 0.03: 0.0}, 0.9) == []
    rising = curve_flags("e", "p", "transfer", {0.01: 0.4, 0.02: 0.5}, 0.9)
    assert [f.code for f in rising] == ["rises-with-eps"]
    # within the 1 pp tolerance: noise, not a flag
    assert curve_flags("e", "p", "transfer", {0.01: 0.400, 0.02: 0.405}, 0.9) == []
    # black-box accuracy may stay high (AdvT); only white-box must fall
    assert curve_flags("e", "p", "transfer", {0.01: 0.77, 0.07: 0.63}, 0.78) == []
    assert [f.code for f in curve_flags("e", "p", "whitebox", {0.01: 0.77, 0.07: 0.63}, 0.78)] == ["no-fall"]
    # DVERGE appendix C.3: ADP/8 white-box 4.9% > black-box 0.4% at eps 0.02
    adp8 = pair_flags("adp8", "wb", {0.01: 0.127, 0.02: 0.049}, "bb", {0.01: 0.212, 0.02: 0.004})
    assert [(f.code, f.eps) for f in adp8] == [("whitebox>blackbox", 0.02)]


def _png_ok(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    w, h = struct.unpack(">II", data[16:24])
    assert 300 < w < 4000 and 300 < h < 3000  # 200 dpi
    assert data.rstrip(b"\x00").endswith(b"IEND\xaeB`\x82")
    assert b"Software" not in data and b"matplotlib" not in data  # no version metadata: stable bytes


def test_images_are_valid_pngs(report: Path) -> None:
    import matplotlib.image

    pngs = sorted((report / "fix").glob("*.png"))
    names = {p.name for p in pngs}
    assert {"curves_4.png", "curves_5.png", "transfer_dverge_resnet20_x3_0.03.png",
            "iterations_dverge-convergence.png", "training_curves.png"} <= names
    for p in pngs:
        _png_ok(p)
        img = matplotlib.image.imread(p)
        assert img.ndim == 3 and img.std() > 0  # decodes, and is not blank
    text = (report / "fix" / "README.md").read_text()
    for p in pngs:
        assert f"]({p.name})" in text
        for ext in ("pdf", "svg"):  # every figure also as vector graphics, linked from the page
            vec = p.with_name(p.name[:-4] + "." + ext)
            assert vec.exists() and f"]({vec.name})" in text


def test_same_store_gives_same_bytes(fixture_store, report: Path, tmp_path: Path) -> None:
    from robbench.report import write_report

    db, runs, views = fixture_store
    write_report(paper="all", out=tmp_path, db=db, runs_dir=runs, fmt="md", views=views, screenshot=False)
    first = {p.relative_to(report): p.read_bytes() for p in sorted(report.rglob("*")) if p.is_file()}
    second = {p.relative_to(tmp_path): p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()}
    assert first.keys() == second.keys()
    for k in first:
        assert first[k] == second[k], k


def test_json_and_csv_carry_the_same_cells(fixture_store, tmp_path: Path) -> None:
    import pandas as pd

    from robbench.report import write_report

    db, runs, views = fixture_store
    write_report(paper="fix", out=tmp_path / "j", db=db, runs_dir=runs, fmt="json", views=views)
    write_report(paper="fix", out=tmp_path / "c", db=db, runs_dir=runs, fmt="csv", views=views)
    js = json.loads((tmp_path / "j" / "fix" / "report.json").read_text())
    cs = pd.read_csv(tmp_path / "c" / "fix" / "cells.csv")
    assert len(js["cells"]) == len(cs)
    cell = next(c for c in js["cells"] if c["row"] == "DVERGE/3" and c["column"] == "0.02" and c["table"] == "4")
    assert cell["reproduced"] == pytest.approx(100 * CURVES[("dverge_resnet20_x3", "dverge-blackbox")][2])
    assert cell["published"] == 69.7 and cell["n"] == N and cell["seed"] == 0
    assert cell["delta"] == pytest.approx(cell["reproduced"] - 69.7)
    assert cell["ci_low"] < cell["reproduced"] < cell["ci_high"]
    heat = [t for t in js["transferability"] if t["source"] == 1 and t["target"] == "0"]
    assert heat[0]["attack_success_rate"] == pytest.approx(20.0) and heat[0]["unit"] == "%"
    assert {c["unit"] for c in js["cells"]} == {"%"} and {c["measure"] for c in js["cells"]} == {"accuracy"}
    assert not list((tmp_path / "j").rglob("*.png"))  # machine formats draw nothing


def test_cli_report_on_real_views_and_bad_input(tmp_path: Path, fixture_store) -> None:
    from click.testing import CliRunner

    from robbench.cli import main

    db, runs, _ = fixture_store
    r = CliRunner().invoke(main, ["report", "--paper", "dverge", "--out", str(tmp_path), "--db", str(db),
                                  "--runs-dir", str(runs), "--format", "csv"])
    assert r.exit_code == 0, r.output
    cells = (tmp_path / "dverge" / "cells.csv").read_text()
    assert "dverge,4,DVERGE/8,0.07" in cells and "not run" in cells
    r = CliRunner().invoke(main, ["report", "--paper", "nope", "--out", str(tmp_path)])
    assert r.exit_code == 2


def test_bad_views_file_is_a_config_error(tmp_path: Path) -> None:
    from robbench.errors import ConfigError
    from robbench.report.views import load_views

    p = tmp_path / "views.toml"
    p.write_text('[papers.x]\ntitle = "x"\n[[view]]\npaper = "x"\ntable = "1"\ntitle = "t"\n'
                 '[view.measures]\n"a" = { kind = "robust", eps = -1 }\n')
    with pytest.raises(ConfigError, match="measures.a.eps"):
        load_views(p)
    p.write_text('[[view]]\npaper = "y"\ntable = "1"\ntitle = "t"\n')
    with pytest.raises(ConfigError, match="view\\[0\\].paper"):
        load_views(p)


def test_report_without_a_store_shows_published_numbers(tmp_path: Path) -> None:
    from robbench.report import write_report

    db = tmp_path / "none.db"
    write_report(paper="dverge", out=tmp_path / "out", db=db, runs_dir=tmp_path / "runs", fmt="md", screenshot=False)
    assert not db.exists()  # reading must not create a store
    text = (tmp_path / "out" / "dverge" / "README.md").read_text()
    assert "| DVERGE/3 | not run (91.3) |" in text
    assert "0 finished evaluation runs" in (tmp_path / "out" / "index.md").read_text()


def test_views_folder_combines_files_and_refuses_a_key_set_twice(tmp_path):
    """The views folder is one file per paper (a paper's later tables may have files of their own); a heading
    two files both define is refused with both files; a view whose paper has no heading anywhere is refused."""
    from robbench.errors import ConfigError
    from robbench.report.views import _load_views_file, load_views, views_path

    spec = load_views()
    assert {"dverge", "eio", "eed", "xie", "demo"} <= set(spec.papers)
    assert len(spec.view) == sum(len(_load_views_file(f).view) for f in views_path().glob("*.toml"))
    assert [v.table for v in spec.view if v.paper == "eed"][-1] == "9"  # name order keeps paper order
    (tmp_path / "orphan").mkdir()
    (tmp_path / "orphan" / "a.toml").write_text('[papers.x]\ntitle = "X"\n')
    (tmp_path / "orphan" / "b.toml").write_text('[[view]]\npaper = "y"\ntable = "1"\ntitle = "t"\n'
                                                'protocol = "p"\ncolumns = []\n')
    with pytest.raises(ConfigError, match=r"b\.toml.*view\[0\]\.paper.*'y' has no \[papers\.y\]"):
        load_views(tmp_path / "orphan")
    for name in ("a.toml", "b.toml"):
        (tmp_path / name).write_text('[papers.x]\ntitle = "X"\n')
    with pytest.raises(ConfigError, match=r"b\.toml.*papers\.x.*also set in .*a\.toml"):
        load_views(tmp_path)


def test_without_chromium_the_screenshot_is_skipped_in_one_line(fixture_store, tmp_path: Path, monkeypatch,
                                                                capsys) -> None:
    from robbench.report.write import build_report

    db, runs, views = fixture_store
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "leaderboard.png").write_bytes(b"old picture")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    result = build_report("fix", tmp_path / "out", db, runs, "md", views, screenshot=True)
    assert not (tmp_path / "out" / "leaderboard.png").exists()  # no stale picture beside the new page
    printed = [line for line in capsys.readouterr().out.splitlines() if "leaderboard.png" in line]
    assert len(printed) == 1 and "no Chromium" in printed[0] and result.notes
    assert (tmp_path / "out" / "leaderboard.html").exists() and tmp_path / "out" / "leaderboard.png" not in result.files


def test_meta_measures_show_recorded_costs_and_difference_only_in_the_same_unit(tmp_path: Path) -> None:
    """EED Table 1's Speed up / Params cells come from the evaluation run's recorded ``eed_cost``; a
    value is differenced against the published one only in the same unit and setting."""
    from robbench.report.results import Results
    from robbench.report.tables import build_table, cell_text
    from robbench.report.views import load_views

    db = tmp_path / "r.db"
    st = Store(db)
    costs = {"eed_resnet18_cifar10_at": {"flops_speedup": 1.0, "params_kept": 11.2e6},
             "eed_resnet18_cifar10_team": {"flops_speedup": 2.5, "params_kept": 3.1e6}}
    for entry, cost in costs.items():
        rid = st.start_run(entry, f"sha-{entry}", "eed-suite", "e" * 8, seed=0, versions={})
        st.write_batch(rid, "0", [("clean", 0.0, s, -1, int(s < 8), None) for s in range(10)])
        st.finish_run(rid)
        st.put_meta(rid, "eed_cost", cost)
        st.put_meta(rid, "samples", {"dataset": "cifar10", "n": 10, "selection": "first", "sha256": "s" * 64})
    st.close()
    spec = load_views()
    view = next(v for v in spec.view if v.paper == "eed" and v.table == "1" and "ResNet18/AT" in v.rows)
    t = build_table(Results(db, tmp_path / "runs"), view, [], spec)
    at, team = t.cells[("ResNet18/AT", "CIFAR-10/Speed up")], t.cells[("ResNet18/EED(ours)", "CIFAR-10/Speed up")]
    assert at.cell.value == 1.0 and team.cell.value == 2.5
    assert at.delta == pytest.approx(0.0) and team.delta == pytest.approx(2.5 - team.ref.value)
    assert cell_text(team, True, {}, None).startswith(f"2.50x ({team.ref.value:.2f}x, ")
    params = t.cells[("ResNet18/AT", "Params")]
    assert params.cell.value == pytest.approx(11.2) and params.delta == pytest.approx(0.0)
    rec = params.record("eed", "1")
    assert rec["measure"] == "meta:eed_cost.params_kept" and rec["unit"] == "M params" and rec["n"] is None
    assert t.cells[("ResNet18/AT", "CIFAR-10/Clean")].cell.acc == pytest.approx(0.8)  # accuracy cells as before
    # a run that recorded no cost is 'not run' for that column, never zero
    assert t.cells[("ResNet18/HYDRA", "CIFAR-10/Speed up")].status == "not run"


def test_published_iteration_curves_pair_with_the_reproduced_series(tmp_path: Path) -> None:
    """Xie's PGD-2000 curves: Table 7's published PGD-20/100/500/2000 of an entry's row are drawn dashed on
    the same series as its reproduced pgd2000 curve; PGD-10 (another attack, step eps/10) is not on it."""
    from robbench.report import figures
    from robbench.report.reference import published
    from robbench.report.results import Results
    from robbench.report.views import load_views
    from robbench.report.write import PaperReport

    spec = load_views()
    it = next(i for i in spec.iterations if i.protocol == "xie-pgd2000")
    t7 = next(v for v in spec.view if v.paper == "xie" and v.table == "7")
    label, entry = next((r, e) for r, e in t7.rows.items() if e)
    rep = PaperReport("xie", spec, Results(tmp_path / "none.db", tmp_path / "runs"), [], tmp_path, "md")
    mine = [figures.Series("pgd2000 (ε 0.0627)", [20, 2000], [50.0, 40.0]), figures.Series("pgd10 (ε 0.0627)", [10], [60.0])]
    (pub,) = rep._published_iterations(it, entry, mine)
    assert pub.published and pub.name == "pgd2000 (ε 0.0627)"
    want = [(k, published("xie", "7", label, f"PGD-{k}")) for k in (20, 100, 500, 2000)]
    assert list(zip(pub.xs, pub.ys)) == [(k, r.value) for k, r in want if r is not None]
    assert rep._published_iterations(it, "not_a_row_entry", mine) == []


def test_digits_demo_tables_of_eed_and_xie_are_also_on_their_papers_pages(tmp_path: Path) -> None:
    """`report --paper eed` / `--paper xie` show the digits tables the demo fills, beside the paper's own."""
    from robbench.report import build_report

    out = build_report(paper="all", out=tmp_path / "rep", db=tmp_path / "none.db", runs_dir=tmp_path / "runs",
                       screenshot=False)
    assert out.files
    eed = (tmp_path / "rep" / "eed" / "README.md").read_text()
    xie = (tmp_path / "rep" / "xie" / "README.md").read_text()
    demo = (tmp_path / "rep" / "demo" / "README.md").read_text()
    for page in (eed, demo):
        assert "Digits demo of EED" in page
    for page in (xie, demo):
        assert "Digits: clean accuracy and targeted-PGD accuracy vs iterations per strategy" in page
        assert "Digits: accuracy vs targeted-PGD iterations (demo-xie" in page
    assert "Digits demo of EED" not in xie and "Digits: MBN statistics" not in eed
