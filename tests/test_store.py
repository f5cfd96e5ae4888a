"""Results store: schema, run identity and resume, per-batch transactions, crash safety, query helpers."""
from __future__ import annotations

import math
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from robbench.errors import UserError
from robbench.outcomes import BatchKey, OutcomeKey
from robbench.store import (SCHEMA_VERSION, Store, all_or_nothing, latest_runs, per_attack_accuracy,
                            per_member_accuracy, transfer_matrix, wilson_interval)

FIXTURE_V1 = Path(__file__).parent / "fixtures" / "robbench_v1.db"

IDENT = dict(entry="e1", checkpoint_sha256="c" * 64, protocol="p", protocol_sha256="h" * 64)


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path / "deep" / "dir" / "r.db")
    yield s
    s.close()


def test_schema_wal_meta_and_index(store: Store, tmp_path: Path) -> None:
    assert store.path.is_file()  # parent dirs created
    c = store.conn
    assert c.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store.schema_version() == SCHEMA_VERSION
    tables = {r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"runs", "outcomes", "batches", "meta", "run_meta"} <= tables
    cols = [r[1] for r in c.execute("PRAGMA table_info(outcomes)")]
    assert cols == ["run_id", "attack", "source", "source_member", "steps", "eps", "sample", "member", "correct",
                    "margin"]
    bcols = [r[1] for r in c.execute("PRAGMA table_info(batches)")]
    assert bcols == ["run_id", "attack", "source", "source_member", "batch", "eps", "committed_at"]
    run_cols = {r[1] for r in c.execute("PRAGMA table_info(runs)")}
    assert {"entry", "checkpoint_sha256", "protocol", "protocol_sha256", "overrides", "seed", "versions",
            "started", "finished", "status", "meta", "role"} <= run_cols
    plan = " ".join(str(r[-1]) for r in c.execute(
        "EXPLAIN QUERY PLAN SELECT correct FROM outcomes WHERE run_id = 1 AND attack = 'a' AND source = '' "
        "AND source_member = -1 AND steps = -1 AND eps = 0.1"))
    # served by the clustered key, outcome key columns first
    assert "PRIMARY KEY" in plan and "run_id=? AND attack=? AND source=? AND source_member=? AND steps=? AND eps=?" in plan
    assert int(c.execute("PRAGMA busy_timeout").fetchone()[0]) >= 10_000


def test_newer_schema_and_non_database_are_user_errors(tmp_path: Path) -> None:
    p = tmp_path / "r.db"
    Store(p).close()
    c = sqlite3.connect(p)
    c.execute("UPDATE meta SET value='99' WHERE key='schema_version'")
    c.commit()
    c.close()
    with pytest.raises(UserError, match="schema version 99"):
        Store(p)
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(UserError, match="junk.db"):
        Store(junk)


def test_start_run_identity_resume_and_force(store: Store) -> None:
    a = store.start_run(**IDENT, overrides={"n": 10, "eps": [0.01]}, seed=0, meta={"note": "x"})
    # Same identity (overrides in another key order) -> same run.
    assert store.start_run(**IDENT, overrides={"eps": [0.01], "n": 10}, seed=0) == a
    assert store.find_run(**IDENT, overrides={"eps": [0.01], "n": 10}, seed=0) == a
    # Any identity field differing -> a new run.
    b = store.start_run(**IDENT, overrides={"n": 10, "eps": [0.01]}, seed=1)
    c = store.start_run(**{**IDENT, "checkpoint_sha256": "d" * 64}, overrides={"n": 10, "eps": [0.01]}, seed=0)
    assert len({a, b, c}) == 3
    assert store.find_run(**IDENT, overrides=[], seed=0) is None
    run = store.run(a)
    assert run["status"] == "running" and run["meta"] == {"note": "x"} and run["overrides"] == {"n": 10, "eps": [0.01]}
    assert run["versions"]["torch"] and run["versions"]["python"]
    store.finish_run(a)
    assert store.run(a)["status"] == "done" and store.run(a)["finished"]
    # A done run is returned as is (the engine skips it) ...
    assert store.start_run(**IDENT, overrides={"n": 10, "eps": [0.01]}, seed=0) == a
    # ... unless forced: the old one is superseded, a new one starts.
    a2 = store.start_run(**IDENT, overrides={"n": 10, "eps": [0.01]}, seed=0, force=True)
    assert a2 != a and store.run(a)["status"] == "superseded" and store.run(a2)["status"] == "running"
    assert store.find_run(**IDENT, overrides={"n": 10, "eps": [0.01]}, seed=0) == a2
    # A failed run resumes.
    store.fail_run(a2, "killed by test")
    assert store.get_meta(a2, "failure") == "killed by test"
    assert store.start_run(**IDENT, overrides={"n": 10, "eps": [0.01]}, seed=0) == a2
    assert store.run(a2)["status"] == "running"


def rows_for(batch: int, size: int = 4) -> list[tuple]:
    return [("pgd", 0.03, batch * size + i, -1, i % 2, 0.5 - i) for i in range(size)]


def test_write_batch_once_and_types(store: Store) -> None:
    r = store.start_run(**IDENT, seed=0)
    assert store.write_batch(r, "b0", rows_for(0)) is True
    # Second write of a committed key is a no-op, even with different rows.
    assert store.write_batch(r, "b0", rows_for(7)) is False
    assert store.done_batches(r) == {BatchKey("b0")}
    # numpy / bool / None inputs are converted.
    store.write_batch(r, "b1", [("clean", np.float32(0.0), np.int64(9), np.int32(-1), np.bool_(True), None)])
    df = store.outcomes(r)
    assert len(df) == 5
    assert list(df.columns) == ["run_id", "attack", "source", "source_member", "steps", "eps", "sample", "member",
                                "correct", "margin"]
    clean = df[df.attack == "clean"].iloc[0]
    assert clean["correct"] == 1 and math.isnan(clean["margin"]) and clean["sample"] == 9
    assert sorted(df[df.attack == "pgd"]["sample"]) == [0, 1, 2, 3]
    assert df[df.attack == "pgd"]["margin"].tolist() == [0.5, -0.5, -1.5, -2.5]


def test_failed_batch_leaves_nothing(store: Store) -> None:
    r = store.start_run(**IDENT, seed=0)
    store.write_batch(r, "b0", rows_for(0))

    def bad_rows():
        yield ("pgd", 0.03, 100, -1, 1, None)
        raise RuntimeError("attack crashed mid batch")

    with pytest.raises(RuntimeError):
        store.write_batch(r, "b1", bad_rows())
    # A row colliding with a committed one aborts the whole batch too.
    with pytest.raises(sqlite3.IntegrityError):
        store.write_batch(r, "b2", [("pgd", 0.03, 200, -1, 1, None), *rows_for(0)[:1]])
    assert store.done_batches(r) == {BatchKey("b0")}
    assert store.count_outcomes(r) == 4
    assert set(store.outcomes(r)["sample"]) == {0, 1, 2, 3}


def test_outcome_filters_and_runs_filters(store: Store) -> None:
    r1 = store.start_run(**IDENT, seed=0)
    r2 = store.start_run(**{**IDENT, "entry": "e2"}, seed=0)
    store.write_batch(r1, "b", [("a", 0.01, 0, -1, 1, None), ("a", 0.02, 0, -1, 0, None), ("b", 0.01, 0, 0, 1, None)])
    store.write_batch(r2, "b", [("a", 0.01, 0, -1, 0, None)])
    assert len(store.outcomes()) == 4
    assert len(store.outcomes(r1, attack="a")) == 2
    assert len(store.outcomes(attack="a", eps=0.01)) == 2
    assert len(store.outcomes(entry="e2")) == 1
    assert len(store.outcomes([r1, r2], member=-1)) == 3
    assert store.runs(entry=["e1", "e2"])["run_id"].tolist() == [r1, r2]
    with pytest.raises(TypeError, match="unknown filter"):
        store.outcomes(colour="red")
    store.put_meta(r1, "autoattack_checks", ["randomized output"])
    store.put_meta(r1, "autoattack_checks", ["none"])
    assert store.get_meta(r1) == {"autoattack_checks": ["none"]}


def test_concurrent_reader_while_writer_holds_transaction(tmp_path: Path) -> None:
    w = Store(tmp_path / "r.db")
    r = w.start_run(**IDENT, seed=0)
    w.write_batch(r, "b0", rows_for(0))
    w.conn.execute("BEGIN IMMEDIATE")  # writer mid-transaction
    w.conn.execute("INSERT INTO batches VALUES (?, 'half', '', -1, -1, -1.0, 'now')", (r,))
    reader = Store(tmp_path / "r.db")
    assert reader.done_batches(r) == {BatchKey("b0")}  # readers see committed data, are not blocked
    w.conn.execute("ROLLBACK")
    reader.close()
    w.close()


def test_wilson_interval() -> None:
    lo, hi = wilson_interval(5, 10)
    # Closed form for p=0.5, n=10, z=1.96: 0.5 ± 1.96*sqrt(0.025+0.0096)/1.384
    z = 1.959963984540054
    half = z * math.sqrt(0.25 / 10 + z * z / 400) / (1 + z * z / 10)
    assert lo == pytest.approx(0.5 - half) and hi == pytest.approx(0.5 + half)
    lo0, hi0 = wilson_interval(0, 20)
    assert lo0 == 0.0 and 0.1 < hi0 < 0.2
    lo1, hi1 = wilson_interval(20, 20)
    assert hi1 == 1.0 and 0.8 < lo1 < 0.9
    assert all(math.isnan(v) for v in wilson_interval(0, 0))
    los, his = wilson_interval(np.array([1, 9]), np.array([10, 10]))
    assert los[0] == pytest.approx(1 - his[1]) and his[0] == pytest.approx(1 - los[1])


def df_rows(rows: list[tuple], run_id: int = 1) -> pd.DataFrame:
    """Rows (key or attack id, eps, sample, member, correct, margin) as Store.outcomes returns them."""
    out = []
    for key, *rest in rows:
        k = OutcomeKey.of(key)
        out.append((run_id, k.attack, k.source, k.source_member, k.steps, *rest))
    return pd.DataFrame(out, columns=["run_id", "attack", "source", "source_member", "steps", "eps", "sample",
                                      "member", "correct", "margin"])


def test_all_or_nothing_hand_computed() -> None:
    rows = []
    # eps 0.01: sample 0 robust to both, 1 fooled by b only, 2 fooled by both, 3 robust -> 2/4
    for s, (a, b) in enumerate([(1, 1), (1, 0), (0, 0), (1, 1)]):
        rows += [("a", 0.01, s, -1, a, None), ("b", 0.01, s, -1, b, None)]
    # eps 0.02: sample 0 robust, others fooled -> 1/4
    for s, (a, b) in enumerate([(1, 1), (0, 1), (1, 0), (0, 0)]):
        rows += [("a", 0.02, s, -1, a, None), ("b", 0.02, s, -1, b, None)]
    rows += [("a", 0.01, s, 0, 0, None) for s in range(4)]  # member rows are ignored by default
    df = df_rows(rows)
    out = all_or_nothing(df)
    assert out["eps"].tolist() == [0.01, 0.02]
    assert out["accuracy"].tolist() == [0.5, 0.25]
    assert out["n"].tolist() == [4, 4] and out["correct"].tolist() == [2, 1]
    assert (out["ci_low"] < out["accuracy"]).all() and (out["ci_high"] > out["accuracy"]).all()
    # Only attack a: eps .01 -> 3/4, eps .02 -> 2/4
    assert all_or_nothing(df, attacks=["a"])["accuracy"].tolist() == [0.75, 0.5]
    # Member 0 under attack a: all fooled.
    m0 = all_or_nothing(df, members=(0,))
    assert m0["member"].tolist() == [0] and m0["accuracy"].tolist() == [0.0]


def test_all_or_nothing_missing_rows() -> None:
    rows = [("a", 0.01, 0, -1, 1, None), ("b", 0.01, 0, -1, 1, None),
            ("a", 0.01, 1, -1, 0, None),  # fooled by a; b skipped (early stop) -> fine, not robust
            ("a", 0.01, 2, -1, 1, None)]  # robust to a, b missing -> must not count as robust
    with pytest.raises(ValueError, match=r"sample 2 .*misses \['b'\]"):
        all_or_nothing(df_rows(rows))
    ok = all_or_nothing(df_rows(rows[:3]))
    assert ok["accuracy"].tolist() == [0.5]
    # An attack listed but absent for a not-yet-fooled sample is an error as well.
    with pytest.raises(ValueError, match="misses"):
        all_or_nothing(df_rows(rows[:3]), attacks=["a", "b", "c"])


def test_per_attack_and_per_member() -> None:
    rows = [("a", 0.01, s, m, int(s < k), None) for m, k in ((-1, 3), (0, 1), (1, 2)) for s in range(4)]
    df = df_rows(rows)
    pa = per_attack_accuracy(df)
    assert pa.set_index("member")["accuracy"].to_dict() == {-1: 0.75, 0: 0.25, 1: 0.5}
    assert (pa["n"] == 4).all()
    pm = per_member_accuracy(df)
    assert pm.loc[(1, "a", "", -1, -1, 0.01)].to_dict() == {-1: 0.75, 0: 0.25, 1: 0.5}


def test_transfer_matrix() -> None:
    rng = np.random.default_rng(0)
    n_members, n = 3, 20
    truth = rng.integers(0, 2, size=(n_members, n_members + 1, n))
    rows = []
    for i in range(n_members):
        for j in range(n_members + 1):
            member = j if j < n_members else -1
            rows += [(OutcomeKey("pgd", source_member=i), 0.03, s, member, int(truth[i, j, s]), None)
                     for s in range(n)]
    rows += [("pgd", 0.03, s, -1, 1, None) for s in range(n)]  # not crafted on a member: ignored
    rows += [(OutcomeKey("pgdx", source_member=0), 0.03, s, -1, 0, None) for s in range(n)]  # another attack
    m = transfer_matrix(df_rows(rows), "pgd")
    assert m.shape == (3, 4) and list(m.columns) == [0, 1, 2, "ensemble"]
    np.testing.assert_allclose(m.to_numpy(), truth.mean(axis=2))
    np.testing.assert_allclose(transfer_matrix(df_rows(rows), "pgd", value="success").to_numpy(),
                               1 - truth.mean(axis=2))
    two_eps = df_rows(rows + [(OutcomeKey("pgd", source_member=0), 0.01, 0, 0, 1, None)])
    with pytest.raises(ValueError, match="several eps"):
        transfer_matrix(two_eps, "pgd")
    assert transfer_matrix(two_eps, "pgd", eps=0.03).shape == (3, 4)


def test_latest_runs(store: Store) -> None:
    old = store.start_run(**IDENT, seed=0)
    store.finish_run(old)
    new = store.start_run(**{**IDENT, "checkpoint_sha256": "e" * 64}, seed=0)
    store.finish_run(new)
    other = store.start_run(**{**IDENT, "entry": "e2"}, seed=0)
    store.finish_run(other)
    store.start_run(**{**IDENT, "checkpoint_sha256": "f" * 64}, seed=0)  # running: not listed
    store.start_run(**{**IDENT, "protocol": "q"}, seed=0)
    lr = latest_runs(store, "p")
    assert lr["entry"].tolist() == ["e1", "e2"] and lr["run_id"].tolist() == [new, other]


WRITER = textwrap.dedent("""
    import sys
    from robbench.store import Store
    s = Store(sys.argv[1])
    r = s.start_run("e", "c", "p", "h", seed=0, versions={})  # versions={}: no torch import, faster start
    print("RUN", r, flush=True)
    size = int(sys.argv[2])
    for b in range(100000):
        rows = [("pgd", 0.03, b * size + i, -1, i % 2, float(i)) for i in range(size)]
        s.write_batch(r, f"batch{b}", rows)
        print("COMMITTED", f"batch{b}", flush=True)
""")


def test_crash_safety_sigkill_mid_run(tmp_path: Path) -> None:
    db = tmp_path / "crash.db"
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    size = 2000  # big batches: the kill most likely lands inside a transaction
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(script), str(db), str(size)], stdout=subprocess.PIPE, text=True, env=env)
    reported: list[str] = []
    run_id = None
    deadline = time.monotonic() + 60
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            kind, value = line.split()
            if kind == "RUN":
                run_id = int(value)
            else:
                reported.append(value)
            if len(reported) >= 6 or time.monotonic() > deadline:
                break
        time.sleep(0.05)  # let it get into the next transaction
        proc.send_signal(signal.SIGKILL)
        # Anything it printed before dying was committed too.
        rest = proc.stdout.read()
        reported += [ln.split()[1] for ln in rest.splitlines() if ln.startswith("COMMITTED")]
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert run_id is not None and len(reported) >= 6
    s = Store(db)
    done = s.done_batches(run_id)
    assert {BatchKey(r) for r in reported} <= done
    assert len(done) <= len(reported) + 1  # at most the batch in flight had committed unreported
    df = s.outcomes(run_id)
    assert len(df) == size * len(done)  # no half-written batch
    per_batch = (df["sample"] // size).value_counts()
    assert set(per_batch.index) == {int(k.attack[len("batch"):]) for k in done}
    assert (per_batch == size).all()
    # The store is writable after the crash and resumes the same run.
    assert s.start_run("e", "c", "p", "h", seed=0) == run_id
    assert s.write_batch(run_id, "after", [("clean", 0.0, 0, -1, 1, None)])
    s.close()


# ------------------------------------------------------------------------------------ migration

def _v1_rows(path: Path) -> tuple[list[tuple], list[tuple], list[tuple]]:
    c = sqlite3.connect(path)
    try:
        return (c.execute("SELECT run_id, attack, eps, sample, member, correct, margin FROM outcomes").fetchall(),
                c.execute("SELECT run_id, batch_key FROM batches").fetchall(),
                c.execute("SELECT run_id, protocol, status FROM runs ORDER BY run_id").fetchall())
    finally:
        c.close()


def test_version_1_store_written_by_the_old_engine_is_migrated_on_open(tmp_path: Path) -> None:
    """tests/fixtures/robbench_v1.db was written by the engine before outcome keys became columns (see
    tests/fixtures/README.md): every grammar it used (@source=, @source_member=, @steps=, |b<N>, |eps=,
    ':source' protocols) must land in the right columns, and nothing may be lost."""
    db = tmp_path / "old.db"
    db.write_bytes(FIXTURE_V1.read_bytes())
    old_rows, old_batches, old_runs = _v1_rows(db)
    with Store(db) as s:
        assert s.schema_version() == SCHEMA_VERSION == 2
        runs = s.runs()
        assert list(zip(runs["protocol"], runs["role"], runs["status"])) == [
            ("fx-wb", "target", "done"), ("fx-bb", "target", "done"), ("fx-bb", "source", "done"),
            ("fx-tr", "target", "done"), ("fx-killed", "target", "failed")]
        df = s.outcomes()
        assert len(df) == len(old_rows)
        keys = set(map(tuple, df[["run_id", "attack", "source", "source_member", "steps"]].drop_duplicates()
                       .itertuples(index=False, name=None)))
        assert keys == {
            (1, "clean", "", -1, -1), (1, "pgd", "", -1, 1), (1, "pgd", "", -1, 3),
            (2, "clean", "", -1, -1), (2, "mpgd-0", "t_src", -1, -1), (2, "mpgd-1", "t_src", -1, -1),
            (3, "mpgd-0", "", -1, -1), (3, "mpgd-1", "", -1, -1),
            (4, "clean", "", -1, -1), (4, "pgd", "", 0, -1), (4, "pgd", "", 1, -1),
            (5, "clean", "", -1, -1), (5, "pgd", "", -1, 1), (5, "pgd", "", -1, 3)}
        # the same outcomes, row for row, with the old id's parts in columns
        old = sorted((r, a.split("@")[0], e, smp, m, c) for r, a, e, smp, m, c, _ in old_rows)
        new = sorted(df[["run_id", "attack", "eps", "sample", "member", "correct"]].itertuples(index=False, name=None))
        assert old == new
        assert s.done_batches(5) == {BatchKey("clean", batch=0), BatchKey("clean", batch=1), BatchKey("pgd", batch=0)}
        assert BatchKey("mpgd-1", eps=0.1) in s.done_batches(3)
        assert BatchKey("pgd", source_member=1, batch=0) in s.done_batches(4)
        assert sum(len(s.done_batches(r)) for r in runs["run_id"]) == len(old_batches)
        # a migrated killed run resumes: start_run returns it, and the migrated keys are skipped
        run5 = s.runs(run_id=5).iloc[0]
        assert s.start_run("t_x2", run5["checkpoint_sha256"], "fx-killed", run5["protocol_sha256"], run5["overrides"],
                           int(run5["seed"])) == 5
        assert s.write_batch(5, BatchKey("pgd", batch=0), []) is False
    with Store(db) as s:  # opening the migrated store again changes nothing
        assert len(s.outcomes()) == len(old_rows)


def test_unmigratable_version_1_store_is_refused_in_one_line(tmp_path: Path) -> None:
    db = tmp_path / "old.db"
    db.write_bytes(FIXTURE_V1.read_bytes())
    c = sqlite3.connect(db)
    c.execute("UPDATE batches SET batch_key = 'no-separator' WHERE batch_key = (SELECT batch_key FROM batches LIMIT 1)")
    c.commit()
    c.close()
    with pytest.raises(UserError, match="cannot migrate") as e:
        Store(db)
    assert e.value.reason == "store-migration"
    c = sqlite3.connect(db)  # the failed migration rolled back: still version 1, nothing lost
    assert c.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0] == "1"
    c.close()
