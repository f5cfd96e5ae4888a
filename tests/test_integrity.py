"""Integrity under tampering, damage and bad input (issue #17): what fails its hash is refused, files have
stable identities, and every user error is one line on stderr, exit code 2, no traceback, nothing written.

The promises are about the command line, so most cases run ``python -m robbench`` in a subprocess (cwd a
temp folder: nothing is written in the checkout). One tiny trained run is made once per module and copied.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest
import torch

from robbench.registry import METHODS
from robbench.train.run import train_entry

TINY = ["model.width=0.25", "data.batch_size=256", "train.epochs=1"]
# 3 batches of 256 synthetic 1x8x8 images per epoch (a partial run is made by stopping in epoch 2)
SYNTH = ["model.width=0.25", "data.batch_size=256", "data.dataset=synthetic", "data.test_batch_size=128",
         "data.options={ n_train = 768, n_test = 128, channels = 1 }", "train.epochs=2"]
NAME = "demo_baseline_x3"


def sets(overrides: list[str]) -> list[str]:
    return [a for s in overrides for a in ("--set", s)]


def cli(*args: str, cwd: Path, proc: bool = False, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    """``robbench ARGS`` in ``cwd``: in a subprocess (``proc``), or in this process through the same
    ``main()`` (click's runner; an exception other than the exit is reported as a traceback)."""
    if proc:
        env = dict(os.environ, OMP_NUM_THREADS="1")
        return subprocess.run([sys.executable, "-m", "robbench", *args], cwd=cwd, env=env, capture_output=True,
                              text=True, timeout=timeout)
    import traceback

    from click.testing import CliRunner

    from robbench.cli import main

    here = os.getcwd()
    os.chdir(cwd)
    try:
        res = CliRunner().invoke(main, list(args))
    finally:
        os.chdir(here)
    err = res.stderr
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        err += "\nTraceback (in-process):\n" + "".join(traceback.format_exception(res.exception))
    return subprocess.CompletedProcess(list(args), res.exit_code, res.stdout, err)


def assert_one_line_error(r: subprocess.CompletedProcess[str], *needles: str) -> str:
    err = r.stderr.strip()
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    assert err.count("\n") == 0 and err.startswith("error: "), err
    for n in needles:
        assert n in err, (n, err)
    return err


def tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` with its size and mtime (to prove nothing was written)."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """runs/ with one complete tiny demo_baseline_x3 run."""
    runs = tmp_path_factory.mktemp("trained") / "runs"
    train_entry(NAME, TINY, device="cpu", runs_dir=runs, progress=False)
    return runs


@pytest.fixture
def runs(trained: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "runs"
    shutil.copytree(trained, dst)
    return dst


class _Stop(Exception):
    pass


@pytest.fixture(scope="module")
def partial_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """runs/ with a demo_baseline_x3 run stopped in epoch 2 of 2 (resume state after epoch 1)."""
    runs = tmp_path_factory.mktemp("partial") / "runs"
    cls = METHODS.get("baseline")
    original, calls = cls.step, {"n": 0}

    def stop_in_epoch_2(self, ctx, batch):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 4:
            raise _Stop
        return original(self, ctx, batch)

    cls.step = stop_in_epoch_2
    try:
        with pytest.raises(_Stop):
            train_entry(NAME, SYNTH, device="cpu", runs_dir=runs, progress=False)
    finally:
        cls.step = original
    m = json.loads((runs / NAME / "manifest.json").read_text())
    assert m["status"] == "training" and "train_state.pt" in m["files"]
    return runs


@pytest.fixture
def partial(partial_run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "runs"
    shutil.copytree(partial_run, dst)
    return dst


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[None]:
    """Make ``path`` unwritable: chmod for ordinary users; root ignores modes, so the immutable flag
    (chattr +i) there. Skips when neither takes effect on this filesystem."""
    mode = path.stat().st_mode
    path.chmod(0o555 if path.is_dir() else 0o444)
    used_chattr = False
    probe = (path / ".probe") if path.is_dir() else path
    try:
        def writable() -> bool:
            try:
                with open(probe, "a"):
                    pass
                if path.is_dir():
                    probe.unlink()
                return True
            except OSError:
                return False

        if writable() and shutil.which("chattr"):
            used_chattr = subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0
        if writable():
            pytest.skip("cannot make a path read-only here (root without chattr support)")
        yield
    finally:
        if used_chattr:
            subprocess.run(["chattr", "-i", str(path)], capture_output=True)
        path.chmod(mode)


# ------------------------------------------------------------------- 1-2: resume state that fails its hash
def _edit_a_tensor(state_file: Path) -> None:
    state = torch.load(state_file, map_location="cpu", weights_only=True)
    k = next(iter(state["model"]))
    state["model"][k] = state["model"][k] + 1.0
    torch.save(state, state_file)


def test_edited_resume_state_is_refused_naming_the_file_and_fresh(partial: Path, tmp_path: Path) -> None:
    run = partial / NAME
    _edit_a_tensor(run / "train_state.pt")
    before = tree(run)
    r = cli("train", f"zoo/{NAME}", "--device", "cpu", "--runs-dir", str(partial), *sets(SYNTH), cwd=tmp_path,
            proc=True)
    assert_one_line_error(r, "train_state.pt", "sha256", "--fresh")
    assert tree(run) == before and not (run / "model.safetensors").exists()


def test_fresh_moves_a_tampered_run_aside_and_trains_anew(partial: Path, tmp_path: Path) -> None:
    _edit_a_tensor(partial / NAME / "train_state.pt")
    r = cli("train", f"zoo/{NAME}", "--device", "cpu", "--runs-dir", str(partial), "--fresh", *sets(SYNTH),
            cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    (aside,) = partial.glob(f"{NAME}.stale-*")
    assert (aside / "train_state.pt").is_file()  # the tampered run is kept, not deleted
    m = json.loads((partial / NAME / "manifest.json").read_text())
    assert m["status"] == "complete" and m["epochs_done"] == 2


@pytest.mark.parametrize("damage", ["garbage", "truncated", "malicious"])
def test_damaged_resume_state_is_one_line(partial: Path, tmp_path: Path, damage: str) -> None:
    f = partial / NAME / "train_state.pt"
    if damage == "garbage":
        f.write_bytes(os.urandom(4096))
    elif damage == "truncated":
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    else:
        import pickle

        class Boom:
            def __reduce__(self):  # type: ignore[no-untyped-def]
                return (os.system, (f"touch {tmp_path / 'pwned'}",))

        f.write_bytes(pickle.dumps({"format": "robbench-train-state/1", "x": Boom()}, protocol=2))
    r = cli("train", f"zoo/{NAME}", "--device", "cpu", "--runs-dir", str(partial), *sets(SYNTH), cwd=tmp_path,
            proc=damage == "malicious")
    assert_one_line_error(r, "train_state.pt")
    assert not (tmp_path / "pwned").exists()


def test_state_announced_before_a_kill_is_resumed(partial: Path) -> None:
    """A kill between writing a new resume state and recording its hash leaves a state the manifest
    announced (``pending``): that one is accepted, any other bytes are not."""
    from robbench.checkpoint import RunDir

    run = RunDir(partial, NAME)
    m = run.read_manifest()
    state = run.load_train_state()
    state["step"] = 1  # a newer state than the manifest records
    import io

    buf = io.BytesIO()
    torch.save(state, buf)
    import hashlib

    m["pending"] = {"train_state.pt": hashlib.sha256(buf.getvalue()).hexdigest()}
    run.write_manifest(m)
    run.train_state_path.write_bytes(buf.getvalue())
    assert run.load_train_state()["step"] == 1


# ------------------------------------------------------------------- 3: stable bytes across processes
_SAVE = """
import sys, torch
from robbench.checkpoint import save_state_dict_file
g = torch.Generator().manual_seed(0)
t = {f"members.{i}.w": torch.randn(3, 4, generator=g) for i in range(5)}
meta = {k: f"value-{k}" for k in ("entry", "entry_sha256", "alpha", "beta", "gamma", "delta", "omega", "zeta")}
save_state_dict_file(sys.argv[1], t, meta)
"""


def test_same_weights_give_the_same_file_in_every_process(tmp_path: Path) -> None:
    files = [tmp_path / f"w{i}.safetensors" for i in range(3)]
    procs = [subprocess.Popen([sys.executable, "-c", _SAVE, str(f)], cwd=tmp_path) for f in files]
    assert all(p.wait(120) == 0 for p in procs)
    blobs = {f.read_bytes() for f in files}
    assert len(blobs) == 1
    from safetensors.torch import load_file

    assert load_file(str(files[0]))["members.2.w"].shape == (3, 4)  # still a valid safetensors file


_RUN_SAVE = """
import sys, torch
from robbench.checkpoint import RunDir
from robbench.config import load_entry
from robbench.data import get_info
from robbench.models import build_model
entry = load_entry("demo_baseline_x3", ["model.width=0.25"])
torch.manual_seed(0)
model = build_model(entry, get_info("digits"))
run = RunDir(sys.argv[1], entry.name)
run.begin(entry)
print(run.save_weights(model))
"""


def test_run_weights_hash_is_a_function_of_the_weights(tmp_path: Path) -> None:
    procs = [subprocess.Popen([sys.executable, "-c", _RUN_SAVE, str(tmp_path / f"r{i}")], cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(3)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-500:] for _, err in outs]
    assert len({out.strip() for out, _ in outs}) == 1


# ------------------------------------------------------------------- 4: weights without a manifest
def test_run_without_manifest_is_refused_then_moved_aside(runs: Path, tmp_path: Path) -> None:
    run = runs / NAME
    (run / "manifest.json").unlink()
    before = tree(run)
    r = cli("train", f"zoo/{NAME}", "--device", "cpu", "--runs-dir", str(runs), *sets(TINY), cwd=tmp_path)
    assert_one_line_error(r, "manifest.json", "--fresh")
    assert tree(run) == before  # the finished weights and the log are untouched
    r = cli("train", f"zoo/{NAME}", "--device", "cpu", "--runs-dir", str(runs), "--fresh", *sets(TINY),
            cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    (aside,) = runs.glob(f"{NAME}.stale-*")
    assert (aside / "model.safetensors").is_file()
    assert len((run / "log.jsonl").read_text().splitlines()) == 1  # a new log, not appended to the old one


# ------------------------------------------------------------------- 5: non-finite eps, attacks that do nothing
@pytest.mark.parametrize("flags,needle", [
    (["--eps", "nan"], "--eps nan"),
    (["--eps", "inf"], "--eps inf"),
    (["--eps", "0.1,-inf"], "--eps 0.1,-inf"),
    (["--set", "attacks.pgd-ce.params.steps=0"], "0 steps"),
    (["--eps", "0"], "cannot change the input"),
])
def test_evaluation_inputs_that_are_not_results_are_refused(runs: Path, tmp_path: Path, flags: list[str],
                                                            needle: str) -> None:
    db = tmp_path / "results" / "r.db"
    r = cli("evaluate", "--protocol", "demo-whitebox", NAME, "--n", "8", "--device", "cpu", "--runs-dir",
            str(runs), "--db", str(db), *flags, cwd=tmp_path)
    assert_one_line_error(r, needle)
    assert not db.exists() and not db.parent.exists()


# ------------------------------------------------------------------- 6: damaged and foreign databases
@pytest.fixture(scope="module")
def evaluated(trained: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from robbench.evaluate.engine import evaluate_protocol

    db = tmp_path_factory.mktemp("db") / "r.db"
    evaluate_protocol("demo-whitebox", [NAME], n=40, runs_dir=trained, db=db, device="cpu", quiet=True)
    with sqlite3.connect(db) as c:  # fold the WAL into the file
        c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return db


def _damaged_copy(db: Path, dst: Path) -> Path:
    """``db`` with its last pages overwritten (outcome rows: the schema on page 1 still reads)."""
    data = bytearray(db.read_bytes())
    page = int.from_bytes(data[16:18], "big") or 65536
    for off in range(len(data) - 2 * page, len(data)):
        data[off] = 0xA5
    dst.write_bytes(bytes(data))
    return dst


def test_damaged_store_in_report_is_one_line_with_the_remedy(evaluated: Path, trained: Path, tmp_path: Path) -> None:
    bad = _damaged_copy(evaluated, tmp_path / "bad.db")
    r = cli("report", "--paper", "demo-whitebox", "--db", str(bad), "--runs-dir", str(trained), "--out",
            str(tmp_path / "rep"), "--no-screenshot", cwd=tmp_path, proc=True)
    assert_one_line_error(r, "bad.db", "malformed", ".recover", "--db")


def test_damaged_store_in_evaluate_is_one_line_with_the_remedy(evaluated: Path, trained: Path, tmp_path: Path) -> None:
    bad = _damaged_copy(evaluated, tmp_path / "bad.db")
    r = cli("evaluate", "--protocol", "demo-whitebox", NAME, "--n", "40", "--device", "cpu", "--runs-dir",
            str(trained), "--db", str(bad), cwd=tmp_path)
    assert_one_line_error(r, "bad.db", ".recover")


def test_foreign_sqlite_file_is_not_written(runs: Path, tmp_path: Path) -> None:
    foreign = tmp_path / "mine.sqlite"
    with sqlite3.connect(foreign) as c:
        c.execute("CREATE TABLE notes (id INTEGER, text TEXT)")
        c.execute("INSERT INTO notes VALUES (1, 'keep me')")
    before = foreign.read_bytes()
    r = cli("evaluate", "--protocol", "demo-whitebox", NAME, "--n", "8", "--device", "cpu", "--runs-dir",
            str(runs), "--db", str(foreign), cwd=tmp_path)
    assert_one_line_error(r, "not a robbench results store", "--db")
    assert foreign.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.sqlite", "runs"]


def test_new_store_carries_the_application_id(tmp_path: Path) -> None:
    from robbench.store import Store

    Store(tmp_path / "s.db").close()
    with sqlite3.connect(tmp_path / "s.db") as c:
        assert c.execute("PRAGMA application_id").fetchone()[0] != 0
        assert c.execute("PRAGMA user_version").fetchone()[0] == 2


# ------------------------------------------------------------------- 7: filesystem trouble
def test_runs_path_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "runs").write_text("not a folder")
    r = cli("train", f"zoo/{NAME}", "--device", "cpu", "--runs-dir", str(tmp_path / "runs"), *sets(TINY),
            cwd=tmp_path)
    assert_one_line_error(r, "runs")
    assert (tmp_path / "runs").read_text() == "not a folder"


def test_read_only_runs_folder_new_run(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    runs.mkdir()
    with read_only(runs):
        r = cli("train", f"zoo/{NAME}", "--device", "cpu", "--runs-dir", str(runs), *sets(TINY), cwd=tmp_path)
    assert_one_line_error(r, "writable")
    assert not any(runs.iterdir())


def test_read_only_runs_folder_resume(partial: Path, tmp_path: Path) -> None:
    run = partial / NAME
    before = tree(run)
    with read_only(run):
        r = cli("train", f"zoo/{NAME}", "--device", "cpu", "--runs-dir", str(partial), *sets(SYNTH), cwd=tmp_path)
    assert_one_line_error(r, "writable")
    assert tree(run) == before


def test_read_only_store_is_one_line_and_leaves_no_wal(evaluated: Path, trained: Path, tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    db = folder / "r.db"
    shutil.copy(evaluated, db)
    with read_only(db):  # the folder stays writable: SQLite would leave -wal/-shm files there
        r = cli("evaluate", "--protocol", "demo-whitebox", NAME, "--n", "8", "--device", "cpu", "--runs-dir",
                str(trained), "--db", str(db), cwd=tmp_path)
    assert_one_line_error(r, "r.db")
    assert sorted(p.name for p in folder.iterdir()) == ["r.db"]


@pytest.mark.parametrize("where", ["under_a_file", "a_folder"])
def test_db_path_that_cannot_be_a_store(runs: Path, tmp_path: Path, where: str) -> None:
    (tmp_path / "afile").write_text("x")
    (tmp_path / "afolder").mkdir()
    db = tmp_path / "afile" / "r.db" if where == "under_a_file" else tmp_path / "afolder"
    r = cli("evaluate", "--protocol", "demo-whitebox", NAME, "--n", "8", "--device", "cpu", "--runs-dir",
            str(runs), "--db", str(db), cwd=tmp_path)
    assert_one_line_error(r, "afile" if where == "under_a_file" else "afolder")
    assert not any((tmp_path / "afolder").iterdir())


def test_filesystem_refusal_in_atomic_save_is_a_user_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Also where no test can make a folder read-only: the OS error becomes one line naming the path."""
    import errno
    import tempfile

    from robbench.checkpoint import atomic_write_bytes
    from robbench.errors import UserError

    def refuse(*a, **k):  # type: ignore[no-untyped-def]
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path))

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(UserError) as e:
        atomic_write_bytes(tmp_path / "x.bin", b"1")
    assert e.value.reason == "filesystem" and str(tmp_path) in str(e.value) and "\n" not in str(e.value)


# ------------------------------------------------------------------- 8: devices, encodings, usage errors
@pytest.mark.parametrize("device", ["banana", "cuda:97"])
@pytest.mark.parametrize("command", ["train", "evaluate"])
def test_bad_device_is_one_line(runs: Path, tmp_path: Path, device: str, command: str) -> None:
    if command == "train":
        args = ["train", f"zoo/{NAME}", *sets(TINY), "--runs-dir", str(tmp_path / "new_runs")]
    else:
        args = ["evaluate", "--protocol", "demo-whitebox", NAME, "--runs-dir", str(runs), "--db",
                str(tmp_path / "r.db")]
    r = cli(*args, "--device", device, cwd=tmp_path, proc=device == "banana" and command == "evaluate")
    assert_one_line_error(r, "--device", device)
    assert not (tmp_path / "new_runs").exists() and not (tmp_path / "r.db").exists()


def test_non_utf8_zoo_file_is_one_line(tmp_path: Path) -> None:
    f = tmp_path / "latin.toml"
    f.write_bytes('description = "Schrödinger"\n'.encode("latin-1") + b"[model]\narch = 'resnet20'\n")
    r = cli("train", str(f), "--device", "cpu", "--runs-dir", str(tmp_path / "runs"), cwd=tmp_path)
    assert_one_line_error(r, "latin.toml", "UTF-8")


@pytest.mark.parametrize("args", [["evaluate", "--bogus"], ["train"], ["evaluate", "--protocol", "x", "--n", "abc"],
                                  ["nosuchcommand"], ["zoo", "list", "extra"]])
def test_click_usage_errors_are_one_line(tmp_path: Path, args: list[str]) -> None:
    r = cli(*args, cwd=tmp_path, proc=args == ["evaluate", "--bogus"])
    assert_one_line_error(r, "--help")


# ------------------------------------------------------------------- 9: messages that point the right way
def test_missing_extends_target_names_the_file_and_field(tmp_path: Path) -> None:
    f = tmp_path / "child.toml"
    f.write_text('extends = "no_such_parent"\n[train]\nepochs = 1\n')
    r = cli("zoo", "show", str(f), cwd=tmp_path)
    assert_one_line_error(r, "child.toml: extends:", "no_such_parent")


@pytest.mark.parametrize("flag,value", [("--n", "0"), ("--eps", "abc"), ("--eps", "-0.1"), ("--batch-size", "0")])
def test_shortcut_flag_errors_name_the_flag(runs: Path, tmp_path: Path, flag: str, value: str) -> None:
    r = cli("evaluate", "--protocol", "demo-whitebox", NAME, flag, value, "--runs-dir", str(runs), "--db",
            str(tmp_path / "r.db"), "--device", "cpu", cwd=tmp_path)
    err = assert_one_line_error(r, flag)
    assert "demo-whitebox.toml" not in err


def test_unknown_entry_is_not_told_to_train_it(runs: Path, tmp_path: Path) -> None:
    r = cli("evaluate", "--protocol", "demo-whitebox", "no_such_entry", "--runs-dir", str(runs), "--db",
            str(tmp_path / "r.db"), "--device", "cpu", cwd=tmp_path)
    err = assert_one_line_error(r, "no_such_entry")
    assert "robbench train zoo/no_such_entry" not in err


def test_allowed_keys_do_not_list_internal_fields(tmp_path: Path) -> None:
    r = cli("zoo", "show", NAME, "--set", "bogus=1", cwd=tmp_path)
    err = assert_one_line_error(r, "allowed here")
    for internal in ("_extends", "arch_params", "method_params", "overrides", "source"):
        assert internal not in err.split("allowed here:")[1].replace("description", "").split(", "), err


def test_internal_fields_cannot_be_set_from_a_file() -> None:
    from robbench.config import load_entry
    from robbench.errors import ConfigError

    with pytest.raises(ConfigError, match="method_params: unknown key"):
        load_entry(NAME, ["method_params={ a = 1 }"])


# ------------------------------------------------------------------- #12 item 5: --set reaches attacks; conflicts
def test_set_reaches_an_attacks_parameters() -> None:
    from robbench.evaluate.protocol import load_protocol

    p = load_protocol("demo-whitebox", ["attacks.pgd-ce.steps=3", "attacks.pgd-ce.params.restarts=1",
                                        "attacks.pgd-ce.eps=[0.1]"])
    (a,) = p.attacks
    assert a.params_parsed.steps == 3 and a.params_parsed.restarts == 1 and a.eps == [0.1]
    assert p.sha256() != load_protocol("demo-whitebox").sha256()  # recorded in the run identity


def test_set_reaches_autoattack_n_iter_from_the_command_line(tmp_path: Path) -> None:
    r = cli("protocols", "show", "robustbench-autoattack", "--set", "attacks.aa.n_iter=10", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    (aa,) = json.loads(r.stdout)["attacks"]
    assert aa["id"] == "aa" and aa["params"]["n_iter"] == 10
    r = cli("protocols", "show", "robustbench-autoattack", "--set", "attacks.aa.n_iter=0", cwd=tmp_path)
    assert_one_line_error(r, "--set attacks.aa.n_iter=0", "n_iter")


def test_conflicting_overrides_are_refused_naming_both(runs: Path, tmp_path: Path) -> None:
    r = cli("evaluate", "--protocol", "demo-whitebox", NAME, "--n", "30", "--set", "samples.n=20", "--runs-dir",
            str(runs), "--db", str(tmp_path / "r.db"), "--device", "cpu", cwd=tmp_path)
    assert_one_line_error(r, "--n 30", "--set samples.n=20")
    assert not (tmp_path / "r.db").exists()


def test_conflicting_epochs_flag_and_set_are_refused(tmp_path: Path) -> None:
    r = cli("train", f"zoo/{NAME}", "--epochs", "3", "--set", "train.epochs=5", "--runs-dir", str(tmp_path / "runs"),
            cwd=tmp_path)
    assert_one_line_error(r, "--epochs 3", "--set train.epochs=5")
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------- 10: bounded commit units
def test_unit_samples_bound_the_costliest_unit() -> None:
    from robbench.evaluate.plan import UNIT_SECONDS, plan_attacks, unit_passes, unit_samples
    from robbench.evaluate.protocol import load_protocol

    attacks = plan_attacks(load_protocol("dverge-whitebox"))  # PGD-50 x 5 restarts over 7 eps
    passes = max(unit_passes(a, 3) for a in attacks)
    assert passes == 51 * 5 * 7
    spp = 1 / 347  # one CIFAR ResNet-20 on this 2-core CPU: 347 input-gradient passes per second
    u = unit_samples(attacks, 200, 3, spp)
    assert 1 <= u < 200 and u * spp * passes <= UNIT_SECONDS < (u + 1) * spp * passes
    assert unit_samples(attacks, 200, 3, 1e-7) == 200  # a fast device keeps the protocol's batches
    assert unit_samples(attacks, 200, 3, None) == 200  # not measured: as before
    assert unit_samples(attacks, 200, 3, 10.0) == 1


def test_sub_batched_units_give_the_same_outcomes(trained: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A unit of 7 samples gives exactly the outcomes of one 40-sample batch (random starts continue
    over the sample order, so where a batch starts does not matter), and each unit has its own key."""
    from robbench.data import load_split
    from robbench.evaluate import execute
    from robbench.evaluate.execute import Batch, BatchState, Executor, Work

    skips: list[int] = []
    real = execute.continued_generators

    def recording(attack, skip_elements, device):  # type: ignore[no-untyped-def]
        skips.append(skip_elements)
        return real(attack, skip_elements, device)

    monkeypatch.setattr(execute, "continued_generators", recording)
    from robbench.evaluate.plan import plan_attacks, plan_target
    from robbench.evaluate.protocol import load_protocol
    from robbench.evaluate.targets import load_target, select_samples

    dev = torch.device("cpu")
    t = load_target(NAME, trained, dev, None, "contiguous")
    proto = load_protocol("demo-whitebox", n=40)
    data = load_split(t.dataset, proto.samples.split, None, t.data_options)
    ids = select_samples(proto, data, t.dataset, t, dev)

    def outcomes(unit: int | None) -> tuple[list[tuple], int]:
        plan = plan_target(plan_attacks(proto), ids, proto.batch_size, len(t.members), [], unit=unit)
        ex = Executor(proto, t, Work(), True, unit=plan.unit)
        rows: list = []
        for b, batch_ids in enumerate(plan.batches):
            x, y = data.get(list(batch_ids))
            batch = Batch(b, list(batch_ids), t.fmt.prepare(x.to(dev)), y.to(dev))
            state = BatchState(len(batch_ids), dev)
            for u in plan.per_batch[b]:
                rows += ex.clean(u, batch) if u.kind == "clean" else ex.target(u, batch, state)
        return sorted((k.attack, k.steps, e, s, m, c) for k, e, s, m, c, _ in rows), len(plan.keys())

    whole, whole_keys = outcomes(None)
    assert set(skips) == {0}
    skips.clear()
    small, small_keys = outcomes(7)
    # each unit's random starts continue the restart streams past the samples before it (8x8 digits)
    assert set(skips) == {b * 7 * 64 for b in range(6)}
    assert whole == small and len(whole) == 40 * (1 + 4)
    assert (whole_keys, small_keys) == (2, 2 * 6)  # clean + pgd per batch: 1 batch vs ceil(40/7) = 6


def test_unknown_entry_creates_no_store(runs: Path, tmp_path: Path) -> None:
    """The targets are resolved before the store is opened: a wrong name leaves no new database."""
    db = tmp_path / "fresh" / "r.db"
    r = cli("evaluate", "--protocol", "demo-whitebox", "nope_not_an_entry", "--device", "cpu", "--runs-dir",
            str(runs), "--db", str(db), cwd=tmp_path)
    assert_one_line_error(r, "nope_not_an_entry")
    assert not db.exists() and not db.parent.exists()


def test_report_out_that_is_a_file_is_one_line(evaluated: Path, trained: Path, tmp_path: Path) -> None:
    out = tmp_path / "report.txt"
    out.write_text("keep me")
    r = cli("report", "--paper", "demo-whitebox", "--db", str(evaluated), "--runs-dir", str(trained), "--out",
            str(out), "--no-screenshot", cwd=tmp_path)
    assert_one_line_error(r, "report.txt")
    assert out.read_text() == "keep me"
