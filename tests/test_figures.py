"""Figures and tables from a real (tiny) store: two digits models trained one epoch, evaluated on a few
samples with the demo protocols; then the report's figures (PDF, SVG, PNG at 200 dpi), bands, own runs,
several-run rows, settings of published numbers and the CLI's printout are checked on it."""
from __future__ import annotations

import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytestmark = pytest.mark.slow  # two 1-epoch trainings and three tiny evaluations: ~30 s on 2 shared cores

N = 16
OWN = """extends = "demo_baseline_x3"
description = "a user's own model: one small ResNet-20 on digits (test)"
tags = ["digits"]
[model]
members = 1
"""


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from robbench.evaluate.engine import evaluate_protocol
    from robbench.train.run import train_entry

    root = tmp_path_factory.mktemp("real")
    runs, db = root / "runs", root / "r.db"
    (root / "my_cnn.toml").write_text(OWN)
    for spec in ("demo_baseline_x3", str(root / "my_cnn.toml")):
        train_entry(spec, overrides=["train.epochs=1"], runs_dir=runs, progress=False, memory_format="contiguous")
    kw = dict(runs_dir=runs, db=db, quiet=True, memory_format="contiguous", cache_root=root / "cache")
    evaluate_protocol("demo-whitebox", ["demo_baseline_x3", "my_cnn"], n=N, **kw)
    evaluate_protocol("demo-transferability", ["demo_baseline_x3"], n=N, **kw)
    return db, runs


@pytest.fixture(scope="module")
def demo(store, tmp_path_factory) -> Path:
    from robbench.report.write import build_report

    db, runs = store
    out = tmp_path_factory.mktemp("demo")
    build_report("demo", out, db, runs, "md", screenshot=False)
    return out / "demo"


def png_info(path: Path) -> tuple[int, int, float]:
    """(width, height, dpi) from the IHDR and pHYs chunks."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    w, h = struct.unpack(">II", data[16:24])
    i = data.index(b"pHYs")
    ppm_x, _, unit = struct.unpack(">IIB", data[i + 4:i + 13])
    assert unit == 1  # pixels per metre
    return w, h, ppm_x * 0.0254


def svg_texts(path: Path) -> list[str]:
    """The text of an SVG figure (matplotlib writes each text as a comment beside its glyph paths)."""
    return [t.strip() for t in re.findall(r"<!-- (.*?) -->", path.read_text())]


def test_every_figure_is_pdf_svg_and_png_at_200_dpi(demo: Path) -> None:
    import matplotlib.image

    pngs = sorted(demo.glob("*.png"))
    assert {"curves_whitebox.png", "transfer_demo_baseline_x3_0.1.png", "training_curves.png"} <= {p.name for p in pngs}
    for p in pngs:
        w, h, dpi = png_info(p)
        assert round(dpi) == 200 and w >= 600 and h >= 400, p.name
        assert matplotlib.image.imread(p).std() > 0
        assert p.with_suffix(".pdf").read_bytes()[:5] == b"%PDF-"
        assert p.with_suffix(".svg").read_text().lstrip().startswith("<?xml")
        assert b"CreationDate" not in p.with_suffix(".pdf").read_bytes()  # same store -> same bytes


def test_curves_have_units_clean_point_bands_and_the_users_run(demo: Path, store) -> None:
    from robbench.report.results import Results

    texts = svg_texts(demo / "curves_whitebox.svg")
    assert "accuracy (%)" in texts and any(t.startswith("ε (L∞") for t in texts)
    assert "0" in texts and "0.05" in texts  # the clean point sits at eps 0 beside the protocol's eps
    assert "my_cnn" in texts and "baseline" in texts  # the user's own run is drawn too
    assert any("95% band" in t for t in texts)
    svg = (demo / "curves_whitebox.svg").read_text()
    assert svg.count('PolyCollection_') >= 2  # one filled band per drawn series
    # the demo's published numbers (CIFAR-10) are another setting: their own panel, dashed
    assert any(t.startswith("published, dverge Table 5 (cifar10)") for t in texts)
    readme = (demo / "README.md").read_text()
    assert "| + my_cnn |" in readme.split("## Accuracy vs eps against white-box")[1].split("## ")[0]
    assert "| + my_cnn |" not in readme.split("## Accuracy vs eps against white-box")[0]  # not run black-box
    db, runs = store
    r = Results(db, runs).run("my_cnn", "demo-whitebox")
    assert r is not None and r.meta["samples"]["n"] == N


def test_heatmap_is_attack_success_rate_with_a_colorbar(demo: Path, store, tmp_path: Path) -> None:
    from robbench.report.write import build_report
    from robbench.store import Store, transfer_matrix

    texts = svg_texts(demo / "transfer_demo_baseline_x3_0.1.svg")
    assert "attack success rate (%)" in texts  # title and colorbar label
    assert texts.count("attack success rate (%)") >= 2 and "100" in texts
    db, runs = store
    build_report("demo", tmp_path, db, runs, "csv", screenshot=False)
    heat = pd.read_csv(tmp_path / "demo" / "transferability.csv")
    assert set(heat["unit"]) == {"%"} and set(heat["measure"]) == {"attack success rate"}
    with Store(db) as st:
        rid = int(st.runs(entry="demo_baseline_x3", protocol="demo-transferability")["run_id"].iloc[0])
        acc = transfer_matrix(st.outcomes(rid), "pgd", eps=0.1)
    cell = heat[(heat["source"] == 0) & (heat["target"] == "1") & (heat["eps"] == 0.1)]
    assert cell["attack_success_rate"].iloc[0] == pytest.approx(100 * (1 - acc.loc[0, 1]))
    # the command-line text of the same run: the same number, the same unit
    from robbench.report.transferability import success_lines

    with Store(db) as st:
        lines = success_lines(st.outcomes(rid))
    assert "attack success rate (%)" in lines[0]
    row0 = lines[2].split()
    assert row0[0] == "0" and row0[2] == f"{cell['attack_success_rate'].iloc[0]:.1f}%"


def test_no_csv_delta_pairs_different_settings(store, tmp_path: Path) -> None:
    """Digits runs beside CIFAR-10 numbers are never differenced, in the shipped views and in a views file
    that claims compare = true for them."""
    from robbench.report.write import build_report

    db, runs = store
    mine = tmp_path / "claims.toml"
    mine.write_text('[papers.claims]\ntitle = "t"\n[[view]]\npaper = "claims"\ntable = "5"\nreference = "dverge:5"\n'
                    'title = "digits under a CIFAR table"\nprotocol = "demo-whitebox"\ncompare = true\n'
                    'columns = ["clean", "0.05"]\n[view.rows]\n"baseline/3" = "demo_baseline_x3"\n')
    frames = []
    for paper in ("all", str(mine)):
        out = tmp_path / paper.replace("/", "_")
        build_report(paper, out, db, runs, "csv", screenshot=False)
        frames += [pd.read_csv(p) for p in out.glob("*/cells.csv")]
    cells = pd.concat(frames, ignore_index=True)
    with_delta = cells[cells["delta"].notna()]
    assert (with_delta["dataset"] == with_delta["published_dataset"]).all()
    assert (with_delta["protocol"] == with_delta["published_protocol"]).all()
    digits = cells[(cells["status"] == "done") & cells["published"].notna()]
    assert len(digits) >= 4 and set(digits["dataset"]) == {"digits"}
    assert digits["delta"].isna().all() and set(digits["published_dataset"]) == {"cifar10"}


def test_rows_with_several_runs_show_mean_std_and_each_runs_interval(store, tmp_path: Path) -> None:
    from robbench.report.measures import bootstrap_interval
    from robbench.report.results import Results
    from robbench.report.write import build_report

    db, runs = store
    views = tmp_path / "seeds.toml"
    views.write_text('[papers.seeds]\ntitle = "t"\n[[view]]\npaper = "seeds"\ntable = "runs"\ntitle = "two runs"\n'
                     'protocol = "demo-whitebox"\ncolumns = ["clean", "0.05", "0.1"]\ncurves = true\n'
                     '[view.rows]\n"pair" = "demo_baseline_x3"\n[view.seeds]\n"pair" = ["my_cnn", "not_run_yet"]\n')
    build_report(str(views), tmp_path / "md", db, runs, "md", screenshot=False)
    build_report(str(views), tmp_path / "csv", db, runs, "csv", screenshot=False)
    cells = pd.read_csv(tmp_path / "csv" / "seeds" / "cells.csv").set_index("column")
    res = Results(db, runs)
    accs, vecs = [], []
    for e in ("demo_baseline_x3", "my_cnn"):
        run = res.run(e, "demo-whitebox")
        k, n = res.aon_counts(run, ["pgd-ce"], 0.05)
        accs.append(100 * k / n)
        vecs.append(res.aon_vector(run, ["pgd-ce"], 0.05))
    c = cells.loc["0.05"]
    assert c["runs"] == 2 and c["reproduced"] == pytest.approx(np.mean(accs))
    assert c["std"] == pytest.approx(np.std(accs, ddof=1), abs=1e-4)
    lo, hi = bootstrap_interval(vecs)
    assert (c["ci_low"], c["ci_high"]) == pytest.approx((100 * lo, 100 * hi), abs=1e-4)
    text = (tmp_path / "md" / "seeds" / "README.md").read_text()
    assert " ± " in text and "runs 2/3: [" in text
    assert (tmp_path / "md" / "seeds" / "curves_runs.svg").exists()


def test_bootstrap_interval_resamples_runs_and_samples() -> None:
    from robbench.report.measures import bootstrap_interval, wilson

    one = np.array([1] * 60 + [0] * 40)
    lo, hi = bootstrap_interval([one])
    wlo, whi = wilson(60, 100)
    assert lo < 0.6 < hi and abs(lo - wlo) < 0.03 and abs(hi - whi) < 0.03
    spread = [np.array([1] * k + [0] * (100 - k)) for k in (40, 60, 80)]
    slo, shi = bootstrap_interval(spread)
    assert slo < 0.6 < shi and (shi - slo) > (hi - lo)  # run-to-run spread widens the interval
    assert bootstrap_interval(spread) == (slo, shi)  # fixed seed


def test_cli_report_on_a_protocol_prints_files_and_summary(store, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from robbench.cli import main

    db, runs = store
    r = CliRunner().invoke(main, ["report", "--paper", "demo-whitebox", "--out", str(tmp_path), "--db", str(db),
                                  "--runs-dir", str(runs), "--no-screenshot"])
    assert r.exit_code == 0, r.output
    listed = [Path(line.strip()) for line in r.output.splitlines() if line.startswith("  " + str(tmp_path))]
    assert listed and all(p.exists() for p in listed)
    assert Path(tmp_path / "demo-whitebox" / "curves_demo-whitebox.pdf") in listed
    assert "best entry per protocol" in r.output and "demo-whitebox:" in r.output
    page = (tmp_path / "demo-whitebox" / "README.md").read_text()
    assert "| demo_baseline_x3 |" in page and "| my_cnn |" in page
    r = CliRunner().invoke(main, ["report", "--paper", "demo-transferability", "--out", str(tmp_path), "--db", str(db),
                                  "--runs-dir", str(runs), "--no-screenshot"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "demo-transferability" / "transfer_demo_baseline_x3_0.1.svg").exists()
    assert "training_curves.png" in (tmp_path / "demo-transferability" / "README.md").read_text()
    bad = CliRunner().invoke(main, ["report", "--paper", "no-such-thing", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "unknown paper or protocol" in bad.output and not (tmp_path / "x").exists()


def test_leaderboard_ranks_within_one_sample_set_and_marks_imported(store, tmp_path: Path) -> None:
    import shutil

    from robbench.report.write import build_report
    from robbench.store import Store

    db, runs = store
    copy = tmp_path / "r.db"
    shutil.copy(db, copy)
    with Store(copy) as st:
        rid = int(st.runs(entry="my_cnn", protocol="demo-whitebox")["run_id"].iloc[0])
        samples = dict(st.run(rid)["meta"]["samples"], sha256="f" * 64, selection="first")
        st.put_meta(rid, "samples", samples)
        st.put_meta(rid, "origin", "imported")
    build_report("demo", tmp_path / "out", copy, runs, "csv", screenshot=False)
    board = pd.read_csv(tmp_path / "out" / "leaderboard.csv")
    wb = board[board["protocol"] == "demo-whitebox"].set_index("entry")
    assert wb.loc["my_cnn", "sample_sha256"] == "f" * 64 and wb.loc["my_cnn", "rank"] == 1
    assert wb.loc["demo_baseline_x3", "rank"] == 1  # another sample set: ranked apart, never together
    assert (wb.loc["my_cnn", "origin"], wb.loc["demo_baseline_x3", "origin"]) == ("imported", "trained")
    build_report("demo", tmp_path / "md", copy, runs, "md", screenshot=False)
    md = (tmp_path / "md" / "leaderboard.md").read_text()
    assert md.count("## demo-whitebox · digits") == 2 and "sample set ffffffffffff (first n=16, test split)" in md
    assert '<span class="imported">imported</span>' in (tmp_path / "md" / "leaderboard.html").read_text()
