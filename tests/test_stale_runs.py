"""A run on disk that no longer matches its entry (or its init_from weights) is refused or, with
--fresh, moved aside (kept) and retrained: never silently reused, never deleted."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from robbench.errors import CheckpointError
from robbench.train.run import train_entry

TINY = ["model.width=0.25", "data.batch_size=256", "train.epochs=1"]


def _train(name: str, runs: Path, extra: list[str] | None = None, fresh: bool = False) -> dict:
    return train_entry(name, TINY + (extra or []), device="cpu", runs_dir=runs, progress=False, fresh=fresh)


def test_changed_config_is_refused_then_moved_aside_with_fresh(tmp_path: Path) -> None:
    first = _train("demo_baseline_x3", tmp_path)
    with pytest.raises(CheckpointError, match="different configuration.*--fresh"):
        _train("demo_baseline_x3", tmp_path, ["train.seed=7"])
    second = _train("demo_baseline_x3", tmp_path, ["train.seed=7"], fresh=True)
    assert second["status"] == "complete" and second["entry_sha256"] != first["entry_sha256"]
    (old,) = tmp_path.glob("demo_baseline_x3.stale-*")
    assert (old / "model.safetensors").is_file()  # the earlier finished work is kept
    assert '"seed": 0' in (old / "manifest.json").read_text()
    from robbench.evaluate.engine import trained_entries

    assert [name for name, _ in trained_entries(tmp_path)] == ["demo_baseline_x3"]  # stale ones not evaluated


def test_retrained_init_from_makes_dependent_run_stale(tmp_path: Path) -> None:
    _train("demo_baseline_x3", tmp_path)
    dep = ["train.epochs=0"]
    m = _train("demo_dverge_x3", tmp_path, dep)
    assert _train("demo_dverge_x3", tmp_path, dep)["files"] == m["files"]  # unchanged: reused
    _train("demo_baseline_x3", tmp_path, ["train.seed=3"], fresh=True)  # the source changes
    with pytest.raises(CheckpointError, match="older weights of 'demo_baseline_x3'"):
        _train("demo_dverge_x3", tmp_path, dep)
    again = _train("demo_dverge_x3", tmp_path, dep, fresh=True)
    assert again["extra"]["init_from"]["weights_sha256"] != m["extra"]["init_from"]["weights_sha256"]
    assert len(list(tmp_path.glob("demo_dverge_x3.stale-*"))) == 1


def test_cli_stale_run_is_one_line_exit_2(tmp_path: Path) -> None:
    _train("demo_baseline_x3", tmp_path)
    cmd = [sys.executable, "-m", "robbench", "train", "zoo/demo_baseline_x3", "--runs-dir", str(tmp_path),
           "--device", "cpu", *[a for s in TINY + ["train.seed=9"] for a in ("--set", s)]]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and "--fresh" in r.stderr


def test_missing_data_leaves_no_run_behind(tmp_path: Path) -> None:
    from robbench.errors import DataError

    with pytest.raises(DataError, match="cifar-10-batches-py"):
        train_entry("baseline_resnet20_x3", ["data.options.download=false"], device="cpu",
                    runs_dir=tmp_path / "runs", data_root=tmp_path / "nodata", progress=False)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
