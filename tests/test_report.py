"""Report generation from a small fixture store: golden markdown, leaderboard order, sanity flags,
valid PNGs, determinism, csv/json formats."""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest

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
"white-box eps=0.01 steps=50" = { eps = 0.01, attacks = ["pgd-wb@steps=50"] }
"white-box eps=0.01 steps=500" = { eps = 0.01, attacks = ["pgd-wb@steps=500"] }
"white-box eps=0.01 steps=1000" = { eps = 0.01, attacks = ["pgd-wb@steps=1000"] }
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
    st.put_meta(adp, "autoattack_warnings", ["robust accuracy at 1 restart differs from 5 restarts"])
    st.put_meta(adp, "randomized", True)
    # transferability: 3 members; member i's examples fool i always, others rarely; ensemble in between
    rid = st.start_run("dverge_resnet20_x3", "sha-dverge_resnet20_x3", "dverge-transferability", "t" * 8, seed=0,
                       versions={})
    rows = []
    for i in range(3):
        for j in [0, 1, 2, -1]:
            rate = 1.0 if i == j else (0.5 if j == -1 else 0.1 * (i + 1))
            for s in range(N):
                rows.append((f"pgd@source_member={i}", 0.03, s, j, int(s >= round(rate * N)), None))
    st.write_batch(rid, "0", rows)
    st.finish_run(rid)
    st.conn.execute("UPDATE runs SET started = ?, finished = ? WHERE run_id = ?",
                    (FIXED_TIME.format(9), FIXED_TIME.format(9), rid))
    # convergence: accuracy falls a little with iterations
    rid = st.start_run("dverge_resnet20_x3", "sha-dverge_resnet20_x3", "dverge-convergence", "c" * 8, seed=0,
                       versions={})
    rows = [("clean", 0.0, s, -1, 1, None) for s in range(N)]
    for steps, k in ((50, 20), (500, 18), (1000, 17)):
        rows += [(f"pgd-wb@steps={steps}", 0.01, s, -1, int(s < k), None) for s in range(N)]
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
    write_report(paper="all", out=out, db=db, runs_dir=runs, fmt="md", views=views)
    return out


def test_report_matches_golden_markdown(report: Path) -> None:
    text = (report / "fix" / "README.md").read_text()
    golden = GOLDEN / "report_fixture.md"
    if os.environ.get("ROBBENCH_UPDATE_GOLDEN"):
        golden.write_text(text)
    assert text == golden.read_text()
