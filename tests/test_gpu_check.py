"""benchmarks/gpu_check.py: the section runner, the projection arithmetic, and a CPU quick run of a subset.

The full ``--tiny --device cpu`` run takes minutes on two cores; here a subset of its sections runs in a
subprocess (the vmap checks, the engine's white-box PGD, CUDA-only sections reporting 'skipped: no CUDA')
and the projection is checked against counts computed by hand from the entries' and protocols' own fields.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from gpucheck import projection as pj  # noqa: E402
from gpucheck.runner import Runner, traceback_tail  # noqa: E402


# ---------------------------------------------------------------------------------------------- runner
def test_runner_isolates_failures_skips_and_budget(tmp_path: Path) -> None:
    from gpu_check import write_outputs

    runner = Runner(tmp_path, budget_s=1.5, options=None, write=write_outputs, min_start_s=0.2)
    try:
        def ok(sec):  # noqa: ANN001, ANN202
            return {"value": 1}

        def boom(sec):  # noqa: ANN001, ANN202
            raise ValueError("boom happened")

        def tolerance(sec):  # noqa: ANN001, ANN202
            sec.check("a within tolerance", True)
            sec.check("b within tolerance", False)
            return {"b": 2.0}

        def slow(sec):  # noqa: ANN001, ANN202
            time.sleep(1.6)
            return {}

        runner.run("ok", ok, 10)
        runner.run("boom", boom, 10)
        runner.run("tolerance", tolerance, 10)
        runner.run("cuda", ok, 10, cuda_only=True, has_cuda=False)
        runner.run("missing", ok, 10, needs=("no_such_module_for_gpu_check",))
        runner.run("unselected", ok, 10, selected=False)
        runner.run("slow", slow, 10)
        runner.run("after", ok, 10)
    finally:
        runner.close()
    s = runner.results["sections"]
    assert s["ok"]["status"] == "ok" and s["ok"]["data"] == {"value": 1}
    assert s["boom"]["status"].startswith("failed: ValueError: boom happened")
    assert "Traceback" in s["boom"]["status"] or "line" in s["boom"]["status"]
    assert s["tolerance"]["status"] == "failed: tolerance: b within tolerance"
    assert s["tolerance"]["data"] == {"b": 2.0}  # a tolerance miss keeps what was measured
    assert s["cuda"]["status"] == "skipped: no CUDA"
    assert s["missing"]["status"].startswith("skipped: needs no_such_module_for_gpu_check")
    assert s["unselected"]["status"].startswith("skipped: not selected")
    assert s["slow"]["status"] == "ok"  # started with budget left; the one after it finds none
    assert s["after"]["status"].startswith("skipped: overall budget spent")
    rec = json.loads((tmp_path / "gpu_check.json").read_text())
    assert set(rec["sections"]) == set(s)
    md = (tmp_path / "gpu_check.md").read_text()
    assert "| boom | failed: ValueError: boom happened |" in md


def test_traceback_tail_leads_with_the_exception() -> None:
    try:
        {}["missing key"]
    except KeyError as e:
        text = traceback_tail(e, 3)
    assert text.splitlines()[0] == "KeyError: 'missing key'"
    assert len(text.splitlines()) == 4


def test_summary_renders_an_empty_record() -> None:
    from gpucheck.summary import render

    md = render({"meta": {}, "sections": {}})
    assert md.startswith("# robbench GPU check") and "Projected GPU-hours" in md


# ---------------------------------------------------------------------------------------------- projection
ENTRIES = ("baseline_resnet20_x3", "baseline_resnet20_x3_holdout", "dverge_resnet20_x3", "eio_resnet20",
           "eio_resnet20_pretrain", "eio_resnet20_ft40", "eio_resnet20_ft20")
PROTOCOLS = ("dverge-whitebox", "dverge-blackbox", "dverge-transferability")


@pytest.fixture(scope="module")
def small_plan():  # noqa: ANN201
    from gpucheck.costs import Keys, _info
    from robbench.config import load_entry
    from robbench.evaluate.protocol import load_protocol

    entries = {n: load_entry(n) for n in ENTRIES}
    protocols = {n: load_protocol(n) for n in PROTOCOLS}
    views = [{"paper": "dverge", "table": "5", "title": "white-box", "protocol": "dverge-whitebox",
              "rows": {"baseline/3": "baseline_resnet20_x3", "DVERGE/3": "dverge_resnet20_x3", "missing": ""}},
             {"paper": "dverge", "table": "4", "title": "black-box", "protocol": "dverge-blackbox",
              "rows": {"baseline/3": "baseline_resnet20_x3", "DVERGE/3": "dverge_resnet20_x3"}},
             {"paper": "eio", "table": "2", "title": "derived", "protocol": "dverge-transferability",
              "rows": {"EIO/3": "eio_resnet20_ft20_ens3", "EIO/1": "eio_resnet20_path0", "gone": "no_such_run"}},
             {"paper": "demo", "table": "x", "rows": {"a": "baseline_resnet20_x3"}}]
    plan = pj.make_plan(entries, views, [], protocols, _info, Keys, lambda run: False)
    return SimpleNamespace(plan=plan, entries=entries, protocols=protocols, info=_info)


def _steps(e, info) -> int:  # noqa: ANN001
    return e.train.epochs * math.ceil(info(e).train_size / e.data.batch_size)


def test_training_steps_and_init_from_chain(small_plan) -> None:  # noqa: ANN001
    p, e = small_plan.plan, small_plan.entries
    w = p.work["train:dverge_resnet20_x3"]
    assert w.steps == _steps(e["dverge_resnet20_x3"], small_plan.info)
    assert w.steps == 200 * 391  # 200 epochs of ceil(50000 / 128) CIFAR-10 batches
    table5 = next(g for g in p.groups if g.paper == "dverge" and g.name == "Table 5")
    # DVERGE starts from the trained baseline: its training is part of the table's work
    assert "train:baseline_resnet20_x3" in table5.work and "train:dverge_resnet20_x3" in table5.work
    assert any("1 row(s) have no zoo entry" in n for n in table5.notes)
    assert not any(g.paper == "demo" for g in p.groups)


def test_whitebox_gradient_count(small_plan) -> None:  # noqa: ANN001
    proto = small_plan.protocols["dverge-whitebox"]
    a = proto.attacks[0].params_parsed
    e = small_plan.entries["dverge_resnet20_x3"]
    n = min(proto.samples.n, small_plan.info(e).test_size)
    w = small_plan.plan.work["eval:dverge_resnet20_x3:dverge-whitebox"]
    assert w.grad_mi == n * len(proto.eps) * a.steps * a.restarts * e.model.members
    assert w.grad_mi == 1000 * 7 * 50 * 5 * 3


def test_transfer_sets_are_generated_once_for_every_target(small_plan) -> None:  # noqa: ANN001
    p, proto = small_plan.plan, small_plan.protocols["dverge-blackbox"]
    gens = [w for w in p.work.values() if w.kind == "generate" and "dverge-blackbox" in w.label]
    on_sources = [a for a in proto.attacks if proto.attack_on(a) == "sources"]
    known = [s for s in proto.sources if s in small_plan.entries]  # the fixture loads the x3 hold-out only
    assert known == ["baseline_resnet20_x3_holdout"]
    assert len(gens) == len(on_sources) * len(known)  # two targets, one set per source and attack
    assert all(w.grad_mi == 1000 * 7 * 100 * 3 for w in gens if '"steps": 100' in w.id)
    table4 = next(g for g in p.groups if g.name == "Table 4")
    assert "train:baseline_resnet20_x3_holdout" in table4.work  # the hold-out surrogate is trained too
    assert any("baseline_resnet20_x5_holdout" in n for n in small_plan.plan.notes)  # unknown: said, not counted


def test_derived_runs(small_plan) -> None:  # noqa: ANN001
    p = small_plan.plan
    g = next(g for g in p.groups if g.paper == "eio")
    # three fine-tuned paths of the RGN, which (with its pre-training) is trained once
    for k in range(3):
        assert f"train:eio_resnet20_ft20_path{k}" in g.work
    assert "train:eio_resnet20" in g.work and "train:eio_resnet20_pretrain" in g.work
    assert "train:eio_resnet20_path0" not in g.work  # a path of the RGN itself needs no training
    assert any("no_such_run" in n for n in p.notes)
    ens = p.work["eval:eio_resnet20_ft20_ens3:dverge-transferability"]
    one = p.work["eval:eio_resnet20_path0:dverge-transferability"]
    assert json.loads(ens.key)[1] == 3 and json.loads(one.key)[1] == 1
    assert json.loads(one.key)[3] is None  # the derived path is a plain network (no RGN transform)


def test_summary_hours_and_estimates(small_plan) -> None:  # noqa: ANN001
    p = small_plan.plan
    train = {w.key: {"seconds_per_step": 0.1, "batch": w.batch} for w in p.work.values() if w.kind == "train"}
    model = {w.key: {"grad_s_per_member_image": 1e-5, "fwd_s_per_member_image": 4e-6}
             for w in p.work.values() if w.kind != "train"}
    out = pj.summarize(p, train, model)
    g5 = next(g for g in out["groups"] if g["name"] == "Table 5")
    ids = next(g for g in p.groups if g.name == "Table 5").work
    # training: steps x seconds per step + each epoch's clean test pass (forwards), where that model is priced
    want_train = sum(0.1 * w.steps + (w.epochs * w.test_fwd_per_epoch * 4e-6 if w.model_key in model else 0.0)
                     for w in (p.work[i] for i in ids) if w.kind == "train") / 3600
    want_eval = sum(1e-5 * p.work[i].grad_mi + 4e-6 * p.work[i].fwd_mi for i in ids if p.work[i].kind == "eval") / 3600
    assert g5["train_h"] == pytest.approx(want_train) and g5["eval_h"] == pytest.approx(want_eval)
    assert g5["unmeasured"] == 0
    # a paper's total counts shared work once (Tables 4 and 5 both train the baseline)
    total = out["papers"]["dverge"]
    assert total["train_h"] < sum(g["train_h"] for g in out["groups"] if g["paper"] == "dverge")
    # without costs, work is unmeasured rather than free
    empty = pj.summarize(p, {}, {})
    assert empty["papers"]["dverge"]["unmeasured"] == empty["papers"]["dverge"]["units"] > 0
    # estimates scale a measured step linearly in members (x3 -> x8) and batch
    k3 = p.work["train:baseline_resnet20_x3"].key
    k8 = k3.replace('\\"resnet20\\", 3,', '\\"resnet20\\", 8,')
    assert k8 != k3
    est = pj.estimate_train(k8, {k3: {"seconds_per_step": 0.3, "batch": 128}})
    assert est is not None and est["seconds_per_step"] == pytest.approx(0.8)
    assert pj.estimate_train(k8.replace('"baseline"', '"gal"', 1), {k3: {"seconds_per_step": 0.3, "batch": 128}}) is None


def test_attack_gradient_counts() -> None:
    from robbench.attacks import AutoAttackOptions, DeepFoolOptions

    g, f, _ = pj.attack_grads("autoattack", AutoAttackOptions(), 10)
    assert (g, f) == (100 * (1 + 2 * 9), 5000)  # APGD-CE + APGD-T x9 + FAB-T x9, Square 5000 queries
    g, f, _ = pj.attack_grads("deepfool", DeepFoolOptions(), 10)
    assert g == 50 * 10
    assert pj.attack_grads("pgd", SimpleNamespace(steps=20, restarts=3), 10)[:2] == (60, 3)


def test_paper_times_are_quoted_with_citations() -> None:
    rows = {t["row"]: t["hours"] for t in pj.PAPER_TIMES if t["paper"] == "dverge"}
    assert rows == {"Baseline": 1.0, "ADP": 2.0, "GAL": 7.5, "AdvT": 11.5, "DVERGE": 10.5}  # DVERGE App. A Table 1
    assert all("Table 1" in t["citation"] for t in pj.PAPER_TIMES if t["paper"] == "dverge")


# ---------------------------------------------------------------------------------------------- CPU quick run
def test_cpu_quick_run_of_a_subset(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    sections = "env,cuda_vs_cpu,vmap_equivalence,pgd_whitebox"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--tiny", "--device", "cpu",
                           "--sections", sections, "--budget-s", "150", "--out", str(out)],
                          capture_output=True, text=True, timeout=240, env=env, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rec = json.loads((out / "gpu_check.json").read_text())
    s = rec["sections"]
    assert s["env"]["status"] == "ok" and s["env"]["data"]["cuda_available"] in (True, False)
    assert s["cuda_vs_cpu"]["status"] == "skipped: no CUDA"
    assert s["compile"]["status"].startswith("skipped: not selected")
    v = s["vmap_equivalence"]
    assert v["status"] == "ok", v["status"]
    assert v["data"]["vmap_ran"] and v["data"]["strict"]["logits"] <= 1e-4
    assert v["data"]["dverge_step"]["update_rel_error"] <= 5e-2
    pgd = s["pgd_whitebox"]
    assert pgd["status"] == "ok", pgd["status"]
    from robbench.evaluate.protocol import load_protocol

    a = load_protocol("dverge-whitebox").attacks[0].params_parsed
    # tiny: 8 samples, one eps, the protocol's PGD cut to at most 3 steps x 2 restarts, 3 members
    assert pgd["data"]["grad_member_images"] == 8 * 1 * min(a.steps, 3) * min(a.restarts, 2) * 3
    assert list(pgd["data"]["run_ids"]) == ["dverge_resnet20_x3"]  # the engine evaluated the run
    md = (out / "gpu_check.md").read_text()
    assert "QUICK mode" in md and "vmap vs loop" in md


def test_the_documented_tiny_cpu_command_passes_and_writes_both_files(tmp_path: Path) -> None:
    """The issue's command as a user types it: every section either passes or says why it was skipped."""
    out = tmp_path / "x"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--tiny", "--device", "cpu",
                           "--out", str(out)], capture_output=True, text=True, timeout=900, env=env, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rec = json.loads((out / "gpu_check.json").read_text())
    bad = {k: v["status"] for k, v in rec["sections"].items()
           if not (v["status"] == "ok" or v["status"].startswith("skipped: no CUDA"))}
    assert not bad, bad
    assert (out / "gpu_check.md").read_text().strip()
