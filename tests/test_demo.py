"""The digits demo end to end at its smallest size: every demo entry trained, the scaled protocols run,
the report written; a second call resumes (trains and evaluates nothing) and gives the same bytes."""
from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.mark.slow
def test_demo_smallest_end_to_end(tmp_path: Path) -> None:
    from robbench.demo import demo_entries, demo_protocols, run_demo
    from robbench.store import Store

    out = tmp_path / "demo"
    index = run_demo(out=out, smallest=True, device="cpu")
    assert index == out / "index.md" and index.exists()
    runs, db = out / ".work" / "runs", out / ".work" / "robbench.db"

    # every demo entry trained (derived Ensemble-in-One paths included), each run complete
    for e in demo_entries():
        name = e["name"] + ("_path0" if "eio-finetuned" in e["tags"] else "")
        manifest = json.loads((runs / name / "manifest.json").read_text())
        assert manifest["status"] == "complete", name

    # every demo protocol ran on the entries it applies to
    st = Store(db)
    done = st.runs(status="done")
    protos = set(done["protocol"])
    for p in demo_protocols():
        assert p in protos, p
    assert {"demo_baseline_x3", "demo_dverge_x3", "demo_eio_ft_path0"} <= set(
        done[done["protocol"] == "demo-blackbox"]["entry"])
    # the EED part: base, pool and both team deployments evaluated with demo-eed
    eed = set(done[done["protocol"] == "demo-eed"]["entry"])
    assert {"demo_eed_at", "demo_eed_nis_0", "demo_eed_ase_0", "demo_eed_team", "demo_eed_team_mean"} <= eed, eed
    # the Xie & Yuille part: every entry attacked with demo-xie, every iteration count from one run
    from robbench.demo import XIE_ENTRIES

    assert set(XIE_ENTRIES) <= set(done[done["protocol"] == "demo-xie"]["entry"])
    n_runs, n_rows = len(done), sum(st.count_outcomes(int(r)) for r in done["run_id"])
    st.close()

    text = (out / "demo" / "README.md").read_text()
    for row in ("baseline/3", "ADP/3", "GAL/3", "DVERGE/3", "AdvT/3", "EIO/1"):
        line = next(l for l in text.splitlines() if l.startswith(f"| {row} |"))
        assert "not run" not in line, line  # every demo row has numbers
    # EED's digits table: the team's accuracy, and its speed-up and kept parameters from the masks
    team = next(l for l in text.splitlines() if l.startswith("| ResNet18/EED(ours) |"))
    cells = [c.strip() for c in team.split("|")[2:6]]
    assert "not run" not in team and cells[2].split()[0].endswith("x") and cells[3].split()[0].endswith("k"), team
    xie = next(l for l in text.splitlines() if l.startswith("| 100% adv + 0% clean |"))
    assert "not run" not in xie, xie
    pngs = sorted((out / "demo").glob("*.png"))
    names = {p.name for p in pngs}
    assert {"curves_blackbox.png", "curves_whitebox.png", "training_curves.png",
            "transfer_demo_dverge_x3_0.1.png", "transfer_demo_baseline_x3_0.1.png"} <= names
    for p in pngs:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "leaderboard.html").read_text().count("demo_dverge_x3") >= 2
    before = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file() and ".work" not in p.parts}
    mtimes = {p: p.stat().st_mtime_ns for p in runs.rglob("model.safetensors")}

    # resume: nothing is retrained or re-evaluated, and the report is byte-identical
    run_demo(out=out, smallest=True, device="cpu")
    assert {p: p.stat().st_mtime_ns for p in runs.rglob("model.safetensors")} == mtimes
    st = Store(db)
    done = st.runs(status="done")
    assert len(done) == n_runs and sum(st.count_outcomes(int(r)) for r in done["run_id"]) == n_rows
    st.close()
    after = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file() and ".work" not in p.parts}
    assert before == after
