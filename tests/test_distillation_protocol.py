"""The ``distillation`` protocol kind (DVERGE Table 2): the stored values equal direct calls of robbench's
distillation and DVERGE's loss, the eps trend, resume, the CLI and report end to end, the view's mapping
and the one-line errors. Tiny digits models trained a few Adam steps."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from tiny_runs import train_tiny_run  # tests/tiny_runs.py
from robbench.errors import ConfigError
from robbench.evaluate import engine
from robbench.evaluate.distill_run import DistillationUnits
from robbench.evaluate.distillation import DISTANCE, DIVERSITY_LOSS, DistillationSpec, pair_layers, pairs
from robbench.evaluate.protocol import load_protocol
from robbench.store import Store


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("distill")
    zoo = base / "zoo"
    zoo.mkdir()
    root = base / "runs"
    train_tiny_run(root, zoo, "d_x2", 2, 0)
    train_tiny_run(root, zoo, "d_one", 1, 1)
    train_tiny_run(root, zoo, "demo_baseline_x3", 3, 0, steps=15, entry_spec="demo_baseline_x3")
    return root


PROTO = """
kind = "distillation"
datasets = ["digits"]
eps = [0.1, 0.2]
batch_size = 10
aggregation = "per_attack"
[samples]
selection = "dverge"
n = 30
[distillation]
layer_group = 10
"""


def _proto(tmp: Path, name: str, text: str) -> str:
    f = tmp / f"{name}.toml"
    f.write_text(text)
    return str(f)


def _ev(proto: str, entries, runs: Path, db: Path, **kw):
    return engine.evaluate_protocol(proto, entries, runs_dir=runs, db=db, quiet=True, device="cpu", **kw)


def _rows(db: Path, run_id: int) -> pd.DataFrame:
    with Store(db) as s:
        return s.outcomes(run_id)


# ------------------------------------------------------------------------------- the values

def test_stored_values_equal_direct_distillation_and_dverge_loss(runs: Path, tmp_path: Path):
    from robbench.checkpoint import load_trained
    from robbench.data import load_split
    from robbench.train.distill import distill, feature_distance
    from robbench.train.methods.dverge import all_pairs_losses

    db = tmp_path / "r.db"
    run_id = _ev(_proto(tmp_path, "p", PROTO), ["d_x2"], runs, db)["d_x2"]
    df = _rows(db, run_id)
    with Store(db) as s:
        meta = s.run(run_id)["meta"]["distillation"]
    assert meta["members"] == [0, 1] and meta["ordered_pairs"] == [[0, 1], [1, 0]]
    model, _ = load_trained("d_x2", runs, torch.device("cpu"))
    members = [m.eval() for m in model.members]
    data = load_split("digits", "test")
    checked = 0
    for eps in (0.1, 0.2):
        for g in range(3):  # batch_size = layer_group = 10: each unit is one layer group, one distill call
            ks = range(10 * g, 10 * g + 10)
            (layer,) = {meta["layers"][k][0] for k in ks}
            x_t, y_t = data.get([meta["pairs"][k][0] for k in ks])
            x_s, y_s = data.get([meta["pairs"][k][1] for k in ks])
            xs = distill(members, x_s, x_t, layer, eps=eps, step_size=eps / 10, steps=10, momentum=1.0, iterate="x")
            logits = [[members[i](xs[j]) for j in range(2)] for i in range(2)]  # logits[i][j] = f_i(x'_j)
            dverge_loss = all_pairs_losses(logits, y_s)  # DVERGE's training loss of member i
            at = df[(df["eps"] - eps).abs() < 1e-9]
            for i in range(2):
                got = at[(at["attack"] == DISTANCE) & (at["source_member"] == i)].set_index("sample")["margin"]
                want = feature_distance(members[i], xs[i], x_t, layer)
                assert torch.allclose(torch.tensor([got[meta["pairs"][k][0]] for k in ks], dtype=torch.float32), want.float(), atol=1e-6)
                j = 1 - i
                rows = at[(at["attack"] == DIVERSITY_LOSS) & (at["source_member"] == i) & (at["member"] == j)]
                got_l = torch.tensor(rows.set_index("sample").loc[[meta["pairs"][k][0] for k in ks], "margin"].to_numpy())
                want_l = F.cross_entropy(members[j](xs[i]), y_s, reduction="none")
                assert torch.allclose(got_l.float(), want_l.detach(), atol=1e-5)
                # the mean over the group is the reference's all-pairs loss of member j (2 members: one term)
                assert abs(float(got_l.mean()) - float(dverge_loss[j].detach())) < 1e-5
                ok = rows.set_index("sample").loc[[meta["pairs"][k][0] for k in ks], "correct"].to_numpy()
                assert (ok == (members[j](xs[i]).argmax(-1) == y_s).numpy()).all()
                checked += 1
    assert checked == 12
    # every x once, values at each eps for both directions, plus clean rows
    assert set(df["attack"]) == {"clean", DISTANCE, DIVERSITY_LOSS}
    assert len(df[df["attack"] == DIVERSITY_LOSS]) == 2 * 2 * 30


def test_pairs_and_layers_follow_the_reference_draws():
    import random

    ids = list(range(100, 130))
    spec = DistillationSpec()
    ps = pairs(ids, spec)
    assert sorted(t for t, _ in ps) == ids and sorted(s for _, s in ps) == ids  # each sample x once, x_s once
    rng = random.Random(0)
    assert [s for _, s in ps] == rng.sample(ids, 30) and [t for t, _ in ps] == rng.sample(ids, 30)
    layers = pair_layers(25, spec, 20)
    rng = random.Random(0)  # eval_diversity.py: random.seed(0), then randint(1, depth) per batch of 10
    draws = [rng.randint(1, 20) for _ in range(3)]
    assert layers == [(draws[k // 10],) for k in range(25)]
    assert pair_layers(3, DistillationSpec(layers=[3, 7]), 20) == [(3, 7)] * 3
    nxt = pairs(ids, DistillationSpec(pairing="next"))
    assert nxt[0] == (100, 101) and nxt[-1] == (129, 100) and all(t != s for t, s in nxt)


def test_fixed_layers_average_over_the_listed_layers(runs: Path, tmp_path: Path):
    db = tmp_path / "r.db"
    one = {}
    for layer in (2, 5):
        text = PROTO.replace("layer_group = 10", f"layers = [{layer}]").replace("eps = [0.1, 0.2]", "eps = [0.1]")
        rid = _ev(_proto(tmp_path, f"l{layer}", text), ["d_x2"], runs, db)["d_x2"]
        one[layer] = _rows(db, rid).query("attack != 'clean'").set_index(["attack", "source_member", "member", "sample"])["margin"]
    text = PROTO.replace("layer_group = 10", "layers = [2, 5]").replace("eps = [0.1, 0.2]", "eps = [0.1]")
    rid = _ev(_proto(tmp_path, "l25", text), ["d_x2"], runs, db)["d_x2"]
    both = _rows(db, rid).query("attack != 'clean'").set_index(["attack", "source_member", "member", "sample"])["margin"]
    pd.testing.assert_series_equal(both.sort_index(), ((one[2] + one[5]) / 2).sort_index(), check_names=False, atol=1e-6)


# ------------------------------------------------------------------------------- the trend

def test_distance_shrinks_and_loss_grows_with_eps(runs: Path, tmp_path: Path):
    """DVERGE Table 2's trend on a fixed set of pairs: a larger eps distils closer to x's features and
    the distilled input costs the other member more (measured on digits: see the report)."""
    db = tmp_path / "r.db"
    text = PROTO.replace("eps = [0.1, 0.2]", "eps = [0.05, 0.1, 0.2, 0.3]").replace("n = 30", "n = 60")
    rid = _ev(_proto(tmp_path, "trend", text), ["d_x2"], runs, db)["d_x2"]
    df = _rows(db, rid)
    dist = df[df["attack"] == DISTANCE].groupby("eps")["margin"].mean().to_numpy()
    loss = df[df["attack"] == DIVERSITY_LOSS].groupby("eps")["margin"].mean().to_numpy()
    assert (dist[1:] < dist[:-1]).all(), dist
    assert (loss[1:] > loss[:-1]).all(), loss
    # per pair too, between the smallest and the largest eps, for most pairs (steps of eps/10 from x_s)
    d = df[df["attack"] == DISTANCE].pivot_table(index=["source_member", "sample"], columns="eps", values="margin")
    assert (d[0.3] < d[0.05]).mean() > 0.9


# ------------------------------------------------------------------------------- resume

def test_resume_after_a_kill_computes_only_the_rest_and_matches(runs: Path, tmp_path: Path, monkeypatch):
    proto = _proto(tmp_path, "p", PROTO)
    full = _rows(tmp_path / "full.db", _ev(proto, ["d_x2"], runs, tmp_path / "full.db")["d_x2"])
    calls = []
    real = DistillationUnits.unit

    def dying(self, b, eps):
        calls.append((b, eps))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, b, eps)

    monkeypatch.setattr(DistillationUnits, "unit", dying)
    db = tmp_path / "k.db"
    with pytest.raises(KeyboardInterrupt):
        _ev(proto, ["d_x2"], runs, db)
    monkeypatch.setattr(DistillationUnits, "unit", lambda self, b, eps: (calls.append((b, eps)), real(self, b, eps))[1])
    rid = _ev(proto, ["d_x2"], runs, db)["d_x2"]
    assert len(calls) == 3 + 4  # 6 units: 2 committed before the kill, the killed one and 3 more after
    cols = ["attack", "source_member", "eps", "sample", "member"]
    a = _rows(db, rid).drop(columns=["run_id"]).sort_values(cols).reset_index(drop=True)
    b = full.drop(columns=["run_id"]).sort_values(cols).reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b)


# ------------------------------------------------------------------------------- CLI and report

def test_cli_evaluate_demo_distillation_and_report(runs: Path, tmp_path: Path):
    from robbench.cli import main

    db = tmp_path / "c.db"
    out = CliRunner().invoke(main, ["evaluate", "--protocol", "demo-distillation", "demo_baseline_x3", "--n", "40",
                                    "--runs-dir", str(runs), "--db", str(db), "--device", "cpu"])
    assert out.exit_code == 0, out.output
    assert "demo_baseline_x3 - demo-distillation (distillation" in out.output and "diversity loss" in out.output
    with Store(db) as s:
        run = s.runs().iloc[0]
        df = s.outcomes(int(run["run_id"]))
    assert run["status"] == "done" and set(df.loc[df["attack"] != "clean", "source_member"]) == {0, 1}
    rep = CliRunner().invoke(main, ["report", "--paper", "dverge", "--out", str(tmp_path / "rep"), "--db", str(db),
                                    "--runs-dir", str(runs), "--no-screenshot", "--format", "json"])
    assert rep.exit_code == 0, rep.output
    import json

    files = list((tmp_path / "rep").rglob("*.json"))
    cells = [c for f in files for c in _records(json.loads(f.read_text())) if c.get("table") == "distillation"]
    assert len(cells) == 6 and all(c["status"] == "done" for c in cells), cells
    for eps, row in ((0.09, "eps=0.09 (cf. 0.03)"), (0.21, "eps=0.21 (cf. 0.07)")):
        at = df[(df["eps"] - eps).abs() < 1e-9]
        for col, attack in (("distillation feature distance", DISTANCE), ("diversity loss", DIVERSITY_LOSS)):
            cell = next(c for c in cells if c["row"] == row and c["column"] == col)
            want = at[at["attack"] == attack].groupby("sample")["margin"].mean().mean()
            assert abs(cell["reproduced"] - want) < 1e-5 and cell["n"] == 40 and cell["measure"] == f"mean:{attack}"
            assert cell["delta"] is None  # the published numbers are CIFAR-10's: listed for shape, never differenced
    # the paper's own table on the same page: not run, published numbers kept
    t2 = [c for f in files for c in _records(json.loads(f.read_text())) if c.get("table") == "2" and c.get("paper") == "dverge"]
    assert {c["status"] for c in t2} == {"not run"} and {c["published"] for c in t2} >= {1.056, 4.738}
    md = CliRunner().invoke(main, ["report", "--paper", "dverge", "--out", str(tmp_path / "md"), "--db", str(db),
                                   "--runs-dir", str(runs), "--no-screenshot"])
    assert md.exit_code == 0, md.output
    text = "\n".join(f.read_text() for f in (tmp_path / "md").rglob("*.md"))
    assert "not run (1.056)" in text and "not run (4.738)" in text
    row = next(line for line in text.splitlines() if line.startswith("| eps=0.09 (cf. 0.03) |"))
    assert row.endswith("| 40 | 0 |") and "n=40" not in row  # n and seed in their columns, once per row
    assert "Cell: reproduced mean over the samples, then the 95% normal interval of the mean" in text
    assert "Cell: reproduced accuracy" not in text.split("Feature distillation and diversity loss")[1].split("##")[0]
    # the protocol's own page: one row per (entry, eps), mean distance and loss, not accuracies
    page = CliRunner().invoke(main, ["report", "--paper", "demo-distillation", "--out", str(tmp_path / "pp"), "--db",
                                     str(db), "--runs-dir", str(runs), "--no-screenshot", "--format", "json"])
    assert page.exit_code == 0, page.output
    own = [c for f in (tmp_path / "pp").rglob("*.json") for c in _records(json.loads(f.read_text()))]
    assert {c["row"] for c in own} == {f"demo_baseline_x3 eps={e:g}" for e in (0.09, 0.15, 0.21)}, own
    for c in own:
        at = df[((df["eps"] - float(c["row"].split("=")[1])).abs() < 1e-9)
                & (df["attack"] == (DISTANCE if c["column"] == "distance" else DIVERSITY_LOSS))]
        assert abs(c["reproduced"] - at.groupby("sample")["margin"].mean().mean()) < 1e-5


def _records(obj) -> list[dict]:
    """Cell records anywhere in a report JSON file."""
    if isinstance(obj, list):
        return [r for o in obj for r in _records(o)]
    if isinstance(obj, dict):
        if "column" in obj and "row" in obj and "status" in obj:
            return [obj]
        return [r for v in obj.values() for r in _records(v)]
    return []


def test_one_member_target_is_one_line_exit_2(runs: Path, tmp_path: Path):
    from robbench.cli import main

    out = CliRunner().invoke(main, ["evaluate", "--protocol", "demo-distillation", "d_one", "--n", "10",
                                    "--runs-dir", str(runs), "--db", str(tmp_path / "e.db"), "--device", "cpu"])
    assert out.exit_code == 2 and "Traceback" not in out.output
    lines = [ln for ln in out.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "d_one has 1 member" in lines[0] and ">= 2 members" in lines[0]
    assert "demo-distillation.toml" in lines[0] and "applies_to.members" in lines[0]


def test_protocol_errors_name_the_field(tmp_path: Path):
    with pytest.raises(ConfigError, match="attacks"):
        load_protocol(_proto(tmp_path, "a", PROTO + '[[attacks]]\nid = "pgd"\nattack = "pgd"\n'))
    with pytest.raises(ConfigError, match="distillation"):
        load_protocol(_proto(tmp_path, "b", PROTO.replace('kind = "distillation"', 'kind = "whitebox"')))
    with pytest.raises(ConfigError, match="distillation.members"):
        load_protocol(_proto(tmp_path, "c", PROTO + "members = [1]\n"))
    with pytest.raises(ConfigError, match="distillation.label"):
        load_protocol(_proto(tmp_path, "d", PROTO + 'label = "banana"\n'))
    # other kinds keep their resolved protocol (and hash) without the distillation table
    assert "distillation" not in load_protocol("demo-whitebox").resolved()


# ------------------------------------------------------------------------------- the mapping

def test_table_2_view_names_the_entry_and_members_the_paper_used():
    from robbench.config import load_entry
    from robbench.report.views import load_views

    spec = load_views()
    t2 = next(v for v in spec.view if v.paper == "dverge" and v.table == "2")
    assert t2.protocol == "dverge-distillation"
    assert t2.rows == {"eps=0.03": "baseline_resnet20_x3", "eps=0.05": "baseline_resnet20_x3",
                       "eps=0.07": "baseline_resnet20_x3"}
    assert t2.row_eps == {"eps=0.03": 0.03, "eps=0.05": 0.05, "eps=0.07": 0.07}
    for col, attack in (("distillation feature distance", DISTANCE), ("diversity loss", DIVERSITY_LOSS)):
        m = t2.measure(col, "eps=0.05")
        assert m.kind == "mean" and m.attacks == [attack] and m.eps == 0.05
    proto = load_protocol("dverge-distillation")
    assert proto.eps == [0.03, 0.05, 0.07] and proto.samples.n == 1000 and proto.datasets == ["cifar10"]
    d = proto.distillation
    assert (d.members, d.steps, d.rel_step, d.label, d.distance) == ([0, 1], 10, 0.1, "source", "mse")
    entry = load_entry("baseline_resnet20_x3")  # two standard ResNet-20s: members of the baseline ensemble
    assert entry.train.method == "baseline" and entry.model.arch == "resnet20" and entry.model.members >= 2
    assert proto.applies(entry)
    demo = next(v for v in spec.view if v.paper == "demo" and v.table == "distillation")
    assert set(demo.rows.values()) == {"demo_baseline_x3"} and "dverge" in demo.also_on
    assert demo.reference == "dverge:2" and not demo.compare
    assert sorted(demo.row_eps.values()) == load_protocol("demo-distillation").eps
