"""The evaluation engine on tiny digits models: aggregation, resume after a kill, transfer-set cache,
transferability rows, record_steps, early stop, sharding over 2 processes."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import torch

from tiny_runs import train_tiny_run  # tests/tiny_runs.py
from robbench.attacks.capabilities import Capabilities
from robbench.attacks.core import AttackResult
from robbench.config import opt
from robbench.errors import DataError, UserError
from robbench.registry import ATTACKS
from robbench.evaluate import engine, execute, sources, transfer
from robbench.evaluate.aggregations import aggregate, groups_from_record
from robbench.evaluate.plan import plan_attacks
from robbench.models.eot import is_randomized
from robbench.outcomes import BatchKey, OutcomeKey
from robbench.store import Store


# ---------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("engine")
    zoo = base / "zoo"
    zoo.mkdir()
    root = base / "runs"
    train_tiny_run(root, zoo, "t_x2", 2, 0)
    train_tiny_run(root, zoo, "t_one", 1, 2)
    train_tiny_run(root, zoo, "t_src", 1, 1, tags=["holdout"])
    return root


def _proto(tmp: Path, name: str, text: str) -> str:
    f = tmp / f"{name}.toml"
    f.write_text(text)
    return str(f)


WB = """
kind = "whitebox"
datasets = ["digits"]
eps = [0.2]
batch_size = 10
[samples]
selection = "dverge"
n = 40
[[attacks]]
id = "pgd"
attack = "pgd"
[attacks.params]
steps = 3
restarts = 2
"""


def _rows(db: Path, run_id: int) -> pd.DataFrame:
    with Store(db) as s:
        return s.outcomes(run_id).drop(columns=["run_id"]).reset_index(drop=True)


def _ev(proto: str, entries, runs: Path, tmp: Path, db: str = "r.db", **kw):
    return engine.evaluate_protocol(proto, entries, runs_dir=runs, db=tmp / db, cache_root=tmp / "cache",
                                    quiet=True, **kw)


# -------------------------------------------------------------------------------------- aggregation

def test_all_or_nothing_by_hand():
    # samples 0..3 at eps 0.1; attacks a, b1, b2 (b1, b2 one and-group "b")
    rows = [
        ("clean", 0.0, s, -1, c) for s, c in enumerate([1, 1, 1, 0])
    ] + [
        ("a", 0.1, 0, -1, 1), ("a", 0.1, 1, -1, 1), ("a", 0.1, 2, -1, 0), ("a", 0.1, 3, -1, 0),
        ("b1", 0.1, 0, -1, 1), ("b1", 0.1, 1, -1, 0), ("b1", 0.1, 2, -1, 1), ("b1", 0.1, 3, -1, 0),
        ("b2", 0.1, 0, -1, 1), ("b2", 0.1, 1, -1, 1), ("b2", 0.1, 2, -1, 1), ("b2", 0.1, 3, -1, 0),
    ]
    df = pd.DataFrame(rows, columns=["attack", "eps", "sample", "member", "correct"]).assign(margin=None)
    aon = aggregate("all_or_nothing", df).set_index("attack")
    assert aon.loc["all", "accuracy"] == pytest.approx(1 / 4)  # only sample 0 survives a, b1 and b2
    assert aon.loc["clean", "accuracy"] == pytest.approx(3 / 4)  # clean is reported, not AND-ed in
    per = aggregate("per_attack", df, {"b1": "b", "b2": "b"}).set_index("attack")
    assert per.loc["a", "accuracy"] == pytest.approx(2 / 4)
    assert per.loc["b", "accuracy"] == pytest.approx(2 / 4)  # samples 0 and 2 survive b1 AND b2
    assert set(per.index) == {"clean", "a", "b"}


# ------------------------------------------------------------------------------------ resume, force

def test_resume_after_kill_recomputes_nothing_committed(runs: Path, tmp_path: Path, monkeypatch):
    proto = _proto(tmp_path, "wb", WB)
    ref = _ev(proto, ["t_x2"], runs, tmp_path, "ref.db")["t_x2"]

    real = execute.run_attack
    calls: list[int] = []

    def flaky(attack, model, x, y, eps, **kw):
        b = kw["seed_parts"][2]
        calls.append(b)
        if b == 2 and len(calls) > 0 and fail["on"]:
            raise RuntimeError("killed")
        return real(attack, model, x, y, eps, **kw)

    fail = {"on": True}
    monkeypatch.setattr(execute, "run_attack", flaky)
    with pytest.raises(RuntimeError, match="killed"):
        _ev(proto, ["t_x2"], runs, tmp_path)
    assert set(calls) == {0, 1, 2}
    with Store(tmp_path / "r.db") as s:
        (run_id,) = s.runs()["run_id"]
        assert s.run(run_id)["status"] == "failed"
        done = s.done_batches(run_id)
        assert {BatchKey("pgd", batch=0), BatchKey("pgd", batch=1), BatchKey("clean", batch=2)} <= done
        assert BatchKey("pgd", batch=2) not in done
    calls.clear()
    fail["on"] = False
    again = _ev(proto, ["t_x2"], runs, tmp_path)["t_x2"]
    assert again == run_id and set(calls) == {2, 3}  # batches 0 and 1 were not recomputed
    pd.testing.assert_frame_equal(_rows(tmp_path / "r.db", run_id), _rows(tmp_path / "ref.db", ref))
    with Store(tmp_path / "r.db") as s:
        assert s.run(run_id)["status"] == "done"
        meta = s.run(run_id)["meta"]
        assert "early stop" in meta["early_stop"] and meta["samples"]["n"] == 40
    calls.clear()
    assert _ev(proto, ["t_x2"], runs, tmp_path)["t_x2"] == run_id and calls == []  # done: not redone
    forced = _ev(proto, ["t_x2"], runs, tmp_path, force=True)["t_x2"]
    assert forced != run_id and set(calls) == {0, 1, 2, 3}
    pd.testing.assert_frame_equal(_rows(tmp_path / "r.db", forced), _rows(tmp_path / "ref.db", ref))


def test_early_stop_changes_no_all_or_nothing_result(runs: Path, tmp_path: Path):
    # two deterministic attacks (no random init): skipping samples already fooled changes nothing
    text = WB.replace('restarts = 2', 'init = "none"') + """
[[attacks]]
id = "fgsm"
attack = "fgsm"
"""
    on = _ev(_proto(tmp_path, "es_on", text), ["t_x2"], runs, tmp_path)["t_x2"]
    off = _ev(_proto(tmp_path, "es_off", text + "\n"), ["t_x2"], runs, tmp_path, overrides=["early_stop=false"])["t_x2"]
    a, b = _rows(tmp_path / "r.db", on), _rows(tmp_path / "r.db", off)
    ta, tb = aggregate("all_or_nothing", a), aggregate("all_or_nothing", b)
    pd.testing.assert_frame_equal(ta, tb)
    assert (ta[ta["attack"] == "all"]["accuracy"] < 1).all()  # the attacks do fool some samples
    # with early stop, samples fooled by 'pgd' are stored as fooled for 'fgsm' without running it
    m = a.pivot_table(index=["eps", "sample"], columns="attack", values="correct")
    assert ((m["pgd"] == 0) <= (m["fgsm"] == 0)).all()


def test_no_trained_entry_names_the_train_command(tmp_path: Path, runs: Path):
    text = 'kind = "whitebox"\ndatasets = ["digits"]\neps = [0.1]\n[applies_to]\npapers = ["nobody"]\n' \
           '[[attacks]]\nid = "pgd"\nattack = "pgd"\n'
    with pytest.raises(UserError, match="no trained entry"):
        _ev(_proto(tmp_path, "none", text), [], runs, tmp_path)
    demo = _proto(tmp_path, "demo", text.replace('"nobody"', '"demo"'))
    with pytest.raises(UserError, match=r"train one first: robbench train zoo/demo_\w+"):
        _ev(demo, [], tmp_path / "no_runs", tmp_path)  # names the zoo entries to train
    ok = _proto(tmp_path, "any", 'kind = "whitebox"\ndatasets = ["digits"]\neps = [0.1]\nbatch_size = 50\n'
                                  '[samples]\nn = 20\n[applies_to]\nexclude_tags = ["holdout"]\n'
                                  '[[attacks]]\nid = "f"\nattack = "fgsm"\n')
    assert set(_ev(ok, [], runs, tmp_path)) == {"t_x2", "t_one"}  # every trained entry it applies to


# ---------------------------------------------------------------------------------------- transfer

BB = """
kind = "transfer"
datasets = ["digits"]
eps = [0.1, 0.2]
batch_size = 20
sources = ["t_src"]
[samples]
selection = "dverge"
n = 40
[[attacks]]
id = "mpgd-0"
attack = "pgd"
and_group = "mpgd@source={source}"
[attacks.params]
steps = 4
momentum = 1.0
early_stop = false
[[attacks]]
id = "mpgd-1"
attack = "pgd"
and_group = "mpgd@source={source}"
[attacks.params]
steps = 4
momentum = 1.0
seed = 1
early_stop = false
"""


def test_transfer_sets_are_cached_and_checked(runs: Path, tmp_path: Path, monkeypatch):
    proto = _proto(tmp_path, "bb", BB)
    made: list[str] = []
    real = sources.make_attack

    def counting(attack, options=None):
        made.append(attack.id)
        return real(attack, options)

    monkeypatch.setattr(sources, "make_attack", counting)
    r1 = _ev(proto, ["t_x2"], runs, tmp_path)["t_x2"]
    assert sorted(made) == ["mpgd-0", "mpgd-1"]
    sets = sorted(p for p in (tmp_path / "cache").iterdir() if not p.name.startswith("."))
    assert len(sets) == 4  # 2 attacks x 2 eps, one directory each
    made.clear()
    r2 = _ev(proto, ["t_one"], runs, tmp_path)["t_one"]  # a second target reads the same sets
    assert made == []
    df = _rows(tmp_path / "r.db", r2)
    assert set(zip(df["attack"], df["source"])) == {("clean", ""), ("mpgd-0", "t_src"), ("mpgd-1", "t_src")}
    assert len(df) == 40 + 2 * 2 * 40
    with Store(tmp_path / "r.db") as s:
        src = s.runs(entry="t_src")
        # each source's own accuracy, under the source, as a run of role 'source'
        assert list(src["protocol"]) == ["bb"] and list(src["role"]) == ["source"]
        src_rows = s.outcomes(int(src["run_id"][0]))
        assert len(src_rows) == 2 * 2 * 40
        groups = groups_from_record(s.run(r1)["meta"]["and_groups"])
        assert groups[OutcomeKey("mpgd-1", "t_src")] == "mpgd@source=t_src"
    # alignment and integrity checks on load
    key = sets[0].name
    ts = transfer.load_set(key, root=tmp_path / "cache")
    ids = ts.sample_ids.tolist()
    assert transfer.load_set(key, root=tmp_path / "cache", expect_ids=ids, expect_labels=ts.labels).key == key
    with pytest.raises(DataError, match="not aligned"):
        transfer.load_set(key, root=tmp_path / "cache", expect_ids=ids[::-1])
    with pytest.raises(DataError, match="labels do not match"):
        transfer.load_set(key, root=tmp_path / "cache", expect_labels=(ts.labels + 1) % 10)
    f = sets[0] / transfer.TENSORS
    blob = bytearray(f.read_bytes())
    blob[-1] ^= 0xFF
    f.write_bytes(bytes(blob))
    with pytest.raises(DataError, match="hash"):
        transfer.load_set(key, root=tmp_path / "cache")


def test_transfer_set_content_does_not_depend_on_which_eps_were_generated_together(runs: Path, tmp_path: Path):
    """The cache key names one eps; its tensors must not depend on the other eps crafted in the same pass
    (dverge-convergence reuses dverge-blackbox's eps-0.03 sets by key): every eps block draws the random
    start a separate run at that eps would draw."""
    one = BB.replace("eps = [0.1, 0.2]", "eps = [0.2]")
    _ev(_proto(tmp_path, "both", BB), ["t_one"], runs, tmp_path, db="a.db")
    alone = tmp_path / "alone"
    alone.mkdir()
    engine.evaluate_protocol(_proto(alone, "one", one), ["t_one"], runs_dir=runs, db=alone / "b.db",
                             cache_root=alone / "cache", quiet=True)
    keys = sorted(p.name for p in (alone / "cache").iterdir() if not p.name.startswith("."))
    assert len(keys) == 2  # 2 attacks at eps 0.2, same keys as in the two-eps cache
    for k in keys:
        a = transfer.load_set(k, root=tmp_path / "cache")
        b = transfer.load_set(k, root=alone / "cache")
        assert torch.equal(a.x_adv, b.x_adv)


def test_transfer_set_manifest_documents_itself(runs: Path, tmp_path: Path):
    _ev(_proto(tmp_path, "bb", BB.replace("eps = [0.1, 0.2]", "eps = [0.1]")), ["t_one"], runs, tmp_path)
    sets = [p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]
    assert len(sets) == 2  # one set per attack at the one eps
    d = sets[0]
    import json

    m = json.loads((d / transfer.MANIFEST).read_text())
    assert m["format"] == transfer.FORMAT and m["key"] == d.name == transfer.set_key(m["fields"])
    assert m["fields"]["eps"] == 0.1 and m["fields"]["attack"] == "pgd" and m["fields"]["n"] == 40
    assert m["shape"] == [40, 1, 8, 8] and 0.0 <= m["source_accuracy"] <= 1.0
    assert not list((tmp_path / "cache").glob(".partial/*"))  # partial batches removed once published


# -------------------------------------------------------------------------- transferability, steps

def test_transferability_rows(runs: Path, tmp_path: Path):
    text = """
kind = "transferability"
datasets = ["digits"]
eps = [0.2]
batch_size = 20
aggregation = "per_attack"
[samples]
selection = "all_correct"
n = 30
[[attacks]]
id = "pgd"
attack = "pgd"
restarts_as_runs = 2
[attacks.params]
steps = 4
"""
    from robbench.store import transfer_matrix

    rid = _ev(_proto(tmp_path, "tr", text), ["t_x2"], runs, tmp_path)["t_x2"]
    df = _rows(tmp_path / "r.db", rid)
    clean = df[df["attack"] == "clean"]
    assert len(clean) == 30 * 3 and clean["correct"].all()  # every member right on every sample
    m = transfer_matrix(df, "pgd", value="success")
    assert m.shape == (2, 3) and list(m.columns) == [0, 1, "ensemble"]
    assert m.loc[0, 0] > 0.5 and m.loc[1, 1] > 0.5  # white-box on the member itself mostly succeeds

    # the command line prints the same matrix, in the heatmaps' unit (attack success rate), not accuracy
    from click.testing import CliRunner

    from robbench.cli import main

    out = CliRunner().invoke(main, ["evaluate", "--protocol", _proto(tmp_path, "tr", text), "t_x2", "--runs-dir",
                                    str(runs), "--db", str(tmp_path / "r.db")])
    assert out.exit_code == 0, out.output
    assert "attack success rate" in out.output and "t_x2 - tr (transferability" in out.output
    row0 = next(line for line in out.output.splitlines() if line.split() and line.split()[0] == "0")
    assert [float(c.rstrip("%")) for c in row0.split()[1:]] == [round(100 * float(v), 1) for v in m.loc[0]]


def test_record_steps_equal_a_separate_run(runs: Path, tmp_path: Path):
    rec = WB.replace("restarts = 2", "record_steps = [2, 6]\nearly_stop = false").replace("steps = 3", "steps = 6")
    sep = WB.replace("restarts = 2", "early_stop = false").replace("steps = 3", "steps = 6")
    r = _ev(_proto(tmp_path, "rec", rec.replace('kind = "whitebox"', 'kind = "whitebox"\naggregation = "per_attack"')),
            ["t_one"], runs, tmp_path)["t_one"]
    s = _ev(_proto(tmp_path, "sep", sep.replace('kind = "whitebox"', 'kind = "whitebox"\naggregation = "per_attack"')),
            ["t_one"], runs, tmp_path)["t_one"]
    a, b = _rows(tmp_path / "r.db", r), _rows(tmp_path / "r.db", s)
    assert set(zip(a["attack"], a["steps"])) == {("clean", -1), ("pgd", 2), ("pgd", 6)}
    six = a[(a["attack"] == "pgd") & (a["steps"] == 6)].drop(columns=["attack", "steps"]).reset_index(drop=True)
    ref = b[b["attack"] == "pgd"].drop(columns=["attack", "steps"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(six, ref)


# ------------------------------------------------------------------------------------ randomized

def test_randomized_model_uses_eot_and_is_seeded(runs: Path, tmp_path: Path, monkeypatch):
    class Noisy(torch.nn.Module):
        randomized = True

        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x) + 0.5 * torch.randn(x.shape[0], 10)

    real = engine.load_target

    def load(name, runs_dir, device, member=None, memory_format="auto"):
        t = real(name, runs_dir, device, member, memory_format)
        t.model = Noisy(t.model).eval()
        t.randomized = is_randomized(t.model)
        return t

    monkeypatch.setattr(engine, "load_target", load)
    text = WB.replace("batch_size = 10", "batch_size = 20\neot_samples = 3")
    r1 = _ev(_proto(tmp_path, "rnd", text), ["t_one"], runs, tmp_path, "a.db")["t_one"]
    r2 = _ev(_proto(tmp_path, "rnd", text), ["t_one"], runs, tmp_path, "b.db")["t_one"]
    pd.testing.assert_frame_equal(_rows(tmp_path / "a.db", r1), _rows(tmp_path / "b.db", r2))
    with Store(tmp_path / "a.db") as s:
        eot = s.run(r1)["meta"]["eot"]
    assert eot["randomized"] and eot["samples"] == 3


# ---------------------------------------------------------------------------------------- sharding

def _worker(rank: int, world: int, init_file: str, proto: str, runs: str, tmp: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        engine.evaluate_protocol(proto, ["t_x2"], runs_dir=runs, db=Path(tmp) / "dist.db",
                                 cache_root=Path(tmp) / "cache", quiet=True)
    finally:
        dist.destroy_process_group()


def test_two_process_sharding_matches_one_process(runs: Path, tmp_path: Path):
    import torch.multiprocessing as mp

    proto = _proto(tmp_path, "wb", WB)
    one = _ev(proto, ["t_x2"], runs, tmp_path, "one.db")["t_x2"]
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), proto, str(runs), str(tmp_path)), nprocs=2, join=True)
    with Store(tmp_path / "dist.db") as s:
        (rid,) = s.runs()["run_id"]
        assert s.run(rid)["status"] == "done" and s.run(rid)["meta"]["world_size"] == 2
    pd.testing.assert_frame_equal(_rows(tmp_path / "dist.db", rid), _rows(tmp_path / "one.db", one))


# ------------------------------------------------------------------------------------ CLI, AutoAttack

def test_cli_evaluate_and_one_line_errors(runs: Path, tmp_path: Path):
    from click.testing import CliRunner

    from robbench.cli import main

    proto = _proto(tmp_path, "wb", WB)
    args = ["evaluate", "--protocol", proto, "--runs-dir", str(runs), "--db", str(tmp_path / "c.db")]
    ok = CliRunner().invoke(main, args + ["t_one", "--n", "10", "--eps", "0.1,0.2"])
    assert ok.exit_code == 0, ok.output
    assert "t_one - wb (all_or_nothing, n=10" in ok.output and "clean" in ok.output
    with Store(tmp_path / "c.db") as s:
        run = s.runs().iloc[0]
        assert run["overrides"] == ["samples.n=10", "eps=[0.1, 0.2]"] and run["status"] == "done"
    bad = CliRunner().invoke(main, args + ["nope"])
    assert bad.exit_code == 2 and "no trained run for 'nope'" in bad.output and "Traceback" not in bad.output
    too_many = CliRunner().invoke(main, args + ["t_one", "--n", "5000"])
    assert too_many.exit_code == 2 and "samples.n" in too_many.output and "450" in too_many.output


def test_autoattack_through_the_engine_matches_a_direct_call(runs: Path, tmp_path: Path):
    from robbench.checkpoint import load_trained
    from robbench.data import load_split
    from robbench.registry import ATTACKS

    text = """
kind = "autoattack"
datasets = ["digits"]
eps = [0.15]
batch_size = 20
[samples]
selection = "first"
n = 20
[[attacks]]
id = "aa"
attack = "autoattack"
[attacks.params]
version = "custom"
attacks = ["apgd-ce"]
n_iter = 3
"""
    p = engine.load_protocol(_proto(tmp_path, "aa", text))
    rid = _ev(p.source_file, ["t_one"], runs, tmp_path)["t_one"]
    df = _rows(tmp_path / "r.db", rid)
    got = df[df["attack"] == "aa"].sort_values("sample")["correct"].to_numpy()
    model, _ = load_trained("t_one", runs, "cpu")
    x, y = load_split("digits", "test").get(list(range(20)))
    res = ATTACKS.get("autoattack")(p.attacks[0].params_parsed)(model, x, y, 0.15)
    assert (got == (~res.fooled).numpy().astype(int)).all() and got.sum() < 20
    with Store(tmp_path / "r.db") as s:
        assert s.get_meta(rid, "work")["attack_seconds"] > 0
        assert s.get_meta(rid, "attack_warnings") == (sorted(set(res.warnings)) or None)


def test_whitebox_equals_the_reference_loop_over_several_batches(runs: Path, tmp_path: Path):
    """DVERGE eval_wbox.py: for each eps and restart r, torch.manual_seed(r), then advertorch
    LinfPGDAttack over every batch; robust = correct under all restarts. The engine (early stop, resume-
    safe batching) gives the same per-sample outcome: restart r's stream continues over the batches."""
    import advertorch_shim  # noqa: F401  (tests/advertorch_shim.py, before advertorch)
    from advertorch.attacks import LinfPGDAttack

    from robbench.checkpoint import load_trained
    from robbench.data import load_split

    text = WB.replace("n = 40", "n = 30").replace("eps = [0.2]", "eps = [0.1, 0.2]")
    p = engine.load_protocol(_proto(tmp_path, "ref", text))
    rid = _ev(p.source_file, ["t_x2"], runs, tmp_path)["t_x2"]
    got = _rows(tmp_path / "r.db", rid)
    model, _ = load_trained("t_x2", runs, "cpu")
    data = load_split("digits", "test")
    ids = engine.select_samples(p, data, "digits")
    for eps in (0.1, 0.2):
        atk = LinfPGDAttack(model, loss_fn=torch.nn.CrossEntropyLoss(reduction="sum"), eps=eps, nb_iter=3,
                            eps_iter=eps / 5, rand_init=True, clip_min=0.0, clip_max=1.0)
        robust = torch.ones(len(ids), dtype=torch.bool)
        for r in range(2):
            torch.manual_seed(r)
            for b in range(0, len(ids), 10):
                x, y = data.get(ids[b:b + 10])
                adv = atk.perturb(x, y)
                with torch.no_grad():
                    robust[b:b + 10] &= model(adv).argmax(1) == y
        mine = got[(got["attack"] == "pgd") & (got["eps"] == eps)].set_index("sample").loc[ids, "correct"]
        assert mine.tolist() == robust.int().tolist()
        assert 0 < robust.sum() < len(ids)  # the comparison is not trivial


def test_restart_generators_continue_the_stream():
    attack = plan_attacks(engine.load_protocol("dverge-whitebox"))[0]
    (g0, *_), x_shape = execute.continued_generators(attack, 2 * 12, torch.device("cpu")), (3, 4)
    torch.manual_seed(0)
    torch.empty(2, *x_shape).uniform_(-1, 1)  # two earlier "batches" of 12 elements
    want = torch.empty(*x_shape).uniform_(-1, 1)
    assert torch.equal(torch.empty(*x_shape).uniform_(-1, 1, generator=g0), want)


def test_random_target_attack_does_not_depend_on_the_batching(runs: Path, tmp_path: Path):
    """Xie & Yuille's targeted PGD: targets are drawn per sample id (not the same offsets in every batch),
    so a run in batches of 10 equals a run in one batch of 40, and the targets reach the attack."""
    tg = WB.replace("restarts = 2", "targeted = \"random\"\nearly_stop = false").replace(
        'kind = "whitebox"', 'kind = "whitebox"\naggregation = "per_attack"')
    small = _ev(_proto(tmp_path, "tg10", tg), ["t_one"], runs, tmp_path)["t_one"]
    big = _ev(_proto(tmp_path, "tg40", tg.replace("batch_size = 10", "batch_size = 40")), ["t_one"], runs,
              tmp_path)["t_one"]
    a, b = _rows(tmp_path / "r.db", small), _rows(tmp_path / "r.db", big)
    pd.testing.assert_frame_equal(a, b)
    untargeted = _ev(_proto(tmp_path, "ut", tg.replace('targeted = "random"\n', "")), ["t_one"], runs,
                     tmp_path)["t_one"]
    u = _rows(tmp_path / "r.db", untargeted)
    pgd_t, pgd_u = a[a["attack"] == "pgd"], u[u["attack"] == "pgd"]
    assert pgd_t["correct"].sum() >= pgd_u["correct"].sum()  # a random target is a weaker goal than any wrong class
    assert not pgd_t["correct"].equals(pgd_u["correct"]) or pgd_u["correct"].all()


# ------------------------------------------------------------------ a new attack, declared, not wired in

@dataclass
class ToyOptions:
    restarts: int = opt(2, min=1, help="random sign patterns tried; a sample is fooled if any fools it")
    seed: int = opt(0, min=0, help="pattern r is drawn from a generator seeded seed + r")


TOY_CALLS: list[dict] = []


def toy_capabilities(p: ToyOptions) -> Capabilities:
    return Capabilities(per_sample_eps=True, restarts=p.restarts, seed=p.seed,
                        for_restart=lambda r: dataclasses.replace(p, restarts=1, seed=p.seed + r))


def make_toy(p: ToyOptions):
    """x + eps * sign(w_r) for a fixed pattern w_r per restart: deterministic per sample, so its outcome
    cannot depend on how the engine batches, packs, resumes or shards."""
    def toy(model, x, y, eps, **kw):
        TOY_CALLS.append({"options": p, "eps": eps, "kw": dict(kw), "n": len(x)})
        e = torch.as_tensor(eps, dtype=x.dtype).reshape(-1, *([1] * (x.dim() - 1))).expand(len(x), *([1] * (x.dim() - 1)))
        fooled = torch.zeros(len(x), dtype=torch.bool)
        x_adv = x.clone()
        for r in range(p.restarts):
            w = torch.randn(x.shape[1:], generator=torch.Generator().manual_seed(p.seed + r))
            xr = (x + e * w.sign()).clamp(0, 1)
            with torch.no_grad():
                f = model(xr).argmax(-1) != y
            x_adv = torch.where((f & ~fooled).reshape(-1, *([1] * (x.dim() - 1))), xr, x_adv)
            fooled |= f
        return AttackResult(x_adv=x_adv, fooled=fooled, fooled_per_restart=fooled[None], stats={"eval": len(x)})
    return toy


if "toy" not in ATTACKS:  # registered once per process (the sharding workers import this module too)
    ATTACKS.register("toy", params=ToyOptions, capabilities=toy_capabilities)(make_toy)

TOY = """
kind = "whitebox"
datasets = ["digits"]
eps = [0.1, 0.2, 0.3]
batch_size = 10
[samples]
selection = "dverge"
n = 40
[[attacks]]
id = "fgsm"
attack = "fgsm"
[[attacks]]
id = "toy"
attack = "toy"
[attacks.params]
restarts = 3
"""


def test_a_new_attack_gets_batching_restarts_resume_and_sharding(runs: Path, tmp_path: Path, monkeypatch):
    proto = _proto(tmp_path, "toy", TOY)
    TOY_CALLS.clear()
    ref = _ev(proto, ["t_x2"], runs, tmp_path, "ref.db")["t_x2"]
    # eps batching: after fgsm fooled some samples, the rest at several eps share calls (per-sample eps)
    assert any(isinstance(c["eps"], torch.Tensor) and len(set(c["eps"].tolist())) > 1 for c in TOY_CALLS)
    assert all(c["n"] <= 10 and c["kw"] == {} for c in TOY_CALLS)  # nothing it did not declare
    # early stop skipped fooled samples and the all-or-nothing result is that of a run without it
    off = _ev(_proto(tmp_path, "toy_off", TOY + "\n"), ["t_x2"], runs, tmp_path, "ref.db",
              overrides=["early_stop=false"])["t_x2"]
    ta = aggregate("all_or_nothing", _rows(tmp_path / "ref.db", ref))
    pd.testing.assert_frame_equal(ta, aggregate("all_or_nothing", _rows(tmp_path / "ref.db", off)))
    assert (ta[ta["attack"] == "all"]["accuracy"] < 1).all()

    # resume: killed at batch 2, the rerun computes only what was not committed, with the same rows
    real = execute.run_attack
    seen: list[int] = []

    def flaky(attack, model, x, y, eps, **kw):
        seen.append(kw["seed_parts"][2])
        if attack.id == "toy" and kw["seed_parts"][2] == 2 and kill["on"]:
            raise RuntimeError("killed")
        return real(attack, model, x, y, eps, **kw)

    kill = {"on": True}
    monkeypatch.setattr(execute, "run_attack", flaky)
    with pytest.raises(RuntimeError, match="killed"):
        _ev(proto, ["t_x2"], runs, tmp_path, "resume.db")
    seen.clear()
    kill["on"] = False
    rid = _ev(proto, ["t_x2"], runs, tmp_path, "resume.db")["t_x2"]
    assert set(seen) == {2, 3}
    pd.testing.assert_frame_equal(_rows(tmp_path / "resume.db", rid), _rows(tmp_path / "ref.db", ref))
    monkeypatch.setattr(execute, "run_attack", real)

    # restarts as separate runs (transferability): restart r alone is the attack's own for_restart(r)
    TOY_CALLS.clear()
    tr = TOY.replace('kind = "whitebox"', 'kind = "transferability"\naggregation = "per_attack"').replace(
        'selection = "dverge"', 'selection = "all_correct"').replace("restarts = 3", "restarts = 3\n").replace(
        'id = "toy"\nattack = "toy"', 'id = "toy"\nattack = "toy"\nrestarts_as_runs = 3').replace(
        '[[attacks]]\nid = "fgsm"\nattack = "fgsm"\n', "")
    trid = _ev(_proto(tmp_path, "toy_tr", tr), ["t_x2"], runs, tmp_path, "tr.db")["t_x2"]
    assert sorted({(c["options"].restarts, c["options"].seed) for c in TOY_CALLS}) == [(1, 0), (1, 1), (1, 2)]
    df = _rows(tmp_path / "tr.db", trid)
    assert set(df.loc[df["attack"] == "toy", "source_member"]) == {0, 1}

    # sharding over 2 processes: the same rows as one process
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(2, str(tmp_path / "init"), proto, str(runs), str(tmp_path)), nprocs=2, join=True)
    with Store(tmp_path / "dist.db") as s:
        (drid,) = s.runs()["run_id"]
    pd.testing.assert_frame_equal(_rows(tmp_path / "dist.db", drid), _rows(tmp_path / "ref.db", ref))


def test_progress_moves_per_unit_and_autoattack_lines_stream(runs: Path, tmp_path: Path, monkeypatch, capsys):
    """One sample batch (the bar used to jump 0 -> 100% at its end): the bar moves after each unit of work
    (clean, then each attack); AutoAttack's per-attack lines stream while it runs unless quiet; a run's
    meta records its origin."""
    updates: list[int] = []

    class Bar:
        def __init__(self, total: int) -> None:
            self.total = total

        def update(self, k: int) -> None:
            updates.append(k)

        def close(self) -> None:
            pass

    totals: list[int] = []

    def progress(self, total: int, desc: str) -> Bar:
        totals.append(total)
        return Bar(total)

    monkeypatch.setattr(engine.Settings, "progress", progress)
    text = "early_stop = false\n" + WB.replace("batch_size = 10", "batch_size = 20").replace("n = 40", "n = 12") + """
[[attacks]]
id = "aa"
attack = "autoattack"
[attacks.params]
version = "custom"
attacks = ["apgd-ce"]
n_iter = 3
"""
    p = _proto(tmp_path, "two", text)
    rid = engine.evaluate_protocol(p, ["t_one"], runs_dir=runs, db=tmp_path / "p.db", cache_root=tmp_path / "cache",
                                   quiet=False, memory_format="contiguous")["t_one"]
    assert totals == [36] and [k for k in updates if k] == [12, 12, 12]  # clean, pgd, aa: 12 samples each
    err = capsys.readouterr().err
    assert "autoattack: robust accuracy after APGD-CE" in err
    with Store(tmp_path / "p.db") as s:
        assert s.run(rid)["meta"]["origin"] == "trained"
    updates.clear()
    _ev(p, ["t_one"], runs, tmp_path, db="q.db", memory_format="contiguous")  # quiet
    assert "autoattack:" not in capsys.readouterr().err


# ------------------------------------------------------------------------------ bounded commit units

def test_units_are_cut_to_bounded_time_without_changing_a_result(runs: Path, tmp_path: Path, monkeypatch):
    """A slow device (here: a measured pass of 1 s per sample) cuts the protocol's 10-sample batches into
    units of ~30 s, each committed on its own, so a kill loses at most one; every outcome equals the
    uncut run's. An attack seeded per call is never cut (its draws depend on the batch)."""
    from robbench.evaluate.plan import plan_attacks
    from robbench.evaluate.protocol import load_protocol

    proto = _proto(tmp_path, "wb", WB)
    whole = _ev(proto, ["t_one"], runs, tmp_path, "whole.db")["t_one"]
    monkeypatch.setattr(engine, "seconds_per_sample_pass", lambda *a, **k: 1.0)
    cut = _ev(proto, ["t_one"], runs, tmp_path, "cut.db")["t_one"]
    with Store(tmp_path / "whole.db") as s:
        assert s.run(whole)["meta"]["unit_samples"] == 10 and len(s.done_batches(whole)) == 2 * 4
    with Store(tmp_path / "cut.db") as s:
        # PGD-3 x 2 restarts at one eps: 8 passes per sample -> 3 samples (24 s) per unit
        assert s.run(cut)["meta"]["unit_samples"] == 3 and len(s.done_batches(cut)) == 2 * 14
    pd.testing.assert_frame_equal(_rows(tmp_path / "cut.db", cut), _rows(tmp_path / "whole.db", whole))

    assert engine.batching_invariant(plan_attacks(load_protocol(proto)))
    assert not engine.batching_invariant(plan_attacks(load_protocol("demo-autoattack")))
