"""Bring your own model from the command line: a model module and safetensors weights in a temp folder,
``robbench add``, evaluated with demo-whitebox and demo-autoattack, ranked in leaderboard.md; every bad
input one line, exit 2, nothing written."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from robbench.cli import main

MODEL_PY = '''
import torch
from torch import nn


class SmallCNN(nn.Module):
    """A digits CNN (1x8x8 in [0, 1] -> 10 logits), normalisation inside."""

    def __init__(self, width: int = 8, num_classes: int = 10):
        super().__init__()
        self.register_buffer("mean", torch.tensor(0.3))
        self.conv = nn.Conv2d(1, width, 3, padding=1)
        self.fc = nn.Linear(width * 16, num_classes)

    def forward(self, x):
        x = torch.relu(self.conv((x - self.mean) / 0.37))
        return self.fc(nn.functional.max_pool2d(x, 2).flatten(1))


class SoftmaxCNN(SmallCNN):
    def forward(self, x):
        return super().forward(x).softmax(1)
'''


def _write_model(folder: Path, width: int = 8, train_steps: int = 60) -> Path:
    """my_models/cnn.py + cnn.safetensors (a few Adam steps on digits, so the ranks mean something)."""
    from safetensors.torch import save_file

    (folder / "my_models").mkdir(parents=True, exist_ok=True)
    (folder / "my_models" / "cnn.py").write_text(MODEL_PY)
    ns: dict = {}
    exec(compile(MODEL_PY, "cnn.py", "exec"), ns)
    torch.manual_seed(0)
    model = ns["SmallCNN"](width)
    from robbench.data import load_split

    data = load_split("digits", "train")
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(train_steps):
        x, y = data.get(torch.randint(0, len(data), (64,), generator=g))
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    w = folder / "cnn.safetensors"
    save_file(model.state_dict(), str(w))
    return w


def _entry(folder: Path, name: str = "my_cnn", arch: str = "file:my_models/cnn.py:SmallCNN",
           options: str = "{ width = 8 }", weights: str = "cnn.safetensors", extra: str = "") -> Path:
    f = folder / f"{name}.toml"
    f.write_text(f'description = "my own CNN"\n{extra}[model]\narch = "{arch}"\noptions = {options}\n'
                 f'weights = "{weights}"\n[data]\ndataset = "digits"\n')
    return f


def _env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ, ROBBENCH_RUNS=str(tmp / "runs"), ROBBENCH_DB=str(tmp / "results.db"),
               ROBBENCH_CACHE=str(tmp / "cache"), OMP_NUM_THREADS="1")
    env.pop("ROBBENCH_ZOO", None)
    return env


def _robbench(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "robbench", *args], cwd=tmp, env=_env(tmp), capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow
def test_cli_route_add_evaluate_rank(tmp_path: Path) -> None:
    """The issue's 'done when': add, demo-whitebox, demo-autoattack, ranked in leaderboard.md."""
    _write_model(tmp_path)
    _entry(tmp_path)
    r = _robbench(tmp_path, "add", "my_cnn.toml")
    assert r.returncode == 0, r.stderr
    assert "added my_cnn" in r.stdout
    manifest = json.loads((tmp_path / "runs" / "my_cnn" / "manifest.json").read_text())
    assert manifest["origin"] == "imported"
    imp = manifest["imported"]
    assert imp["factory"] == f"file:{(tmp_path / 'my_models' / 'cnn.py').resolve()}:SmallCNN"
    assert len(imp["source_sha256"]) == 64 and len(imp["weights_sha256"]) == 64
    assert imp["weights_file"].endswith("cnn.safetensors")
    assert "train" not in manifest["config"] and "epochs" not in manifest  # no training claim

    for proto in ("demo-whitebox", "demo-autoattack"):
        r = _robbench(tmp_path, "evaluate", "--protocol", proto, "my_cnn", "--n", "20", "--memory-format", "contiguous")
        assert r.returncode == 0, r.stderr
        assert f"my_cnn - {proto}" in r.stdout
    assert "autoattack: robust accuracy after APGD-CE" in r.stderr  # AutoAttack's lines streamed live

    r = _robbench(tmp_path, "results", "list", "--origin", "imported")
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stdout.splitlines() if "my_cnn" in ln]
    assert len(lines) == 2 and all("imported" in ln and "done" in ln for ln in lines)

    r = _robbench(tmp_path, "report", "--paper", "all", "--out", "rep")
    assert r.returncode == 0, r.stderr
    board = (tmp_path / "rep" / "leaderboard.md").read_text()
    for proto in ("demo-whitebox", "demo-autoattack"):
        section = board.split(f"## {proto}", 1)[1].split("\n## ", 1)[0]
        rows = [ln for ln in section.splitlines() if ln.startswith("|") and " my_cnn " in ln]
        assert len(rows) == 1 and rows[0].startswith("| 1 | my_cnn"), section  # ranked (the only entry)


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    _write_model(tmp_path, train_steps=0)
    return tmp_path


def _add(folder: Path, *args: str):
    return CliRunner().invoke(main, ["add", *args, "--runs-dir", str(folder / "runs")], catch_exceptions=False)


def _one_line_exit2(res, *words: str) -> None:
    assert res.exit_code == 2, res.output
    out = res.output.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("error: "), res.output
    for w in words:
        assert w in out[0], out[0]


def _nothing_written(folder: Path) -> None:
    runs = folder / "runs"
    assert not runs.exists() or not any(runs.iterdir()), list(runs.iterdir())


def test_add_refuses_missing_module(folder: Path) -> None:
    _entry(folder, arch="python:no_such_pkg.models:SmallCNN")
    _one_line_exit2(_add(folder, str(folder / "my_cnn.toml")), "model.arch", "no_such_pkg.models")
    _nothing_written(folder)


def test_add_refuses_wrong_class(folder: Path) -> None:
    _entry(folder, arch="file:my_models/cnn.py:BigCNN")
    _one_line_exit2(_add(folder, str(folder / "my_cnn.toml")), "BigCNN", "SmallCNN")  # names what it defines
    _nothing_written(folder)


def test_add_refuses_unknown_option(folder: Path) -> None:
    _entry(folder, options="{ widht = 8 }")
    _one_line_exit2(_add(folder, str(folder / "my_cnn.toml")), "model.options.widht", "width")
    _nothing_written(folder)


def test_add_refuses_shape_mismatch(folder: Path) -> None:
    _entry(folder, options="{ width = 16 }")  # the weights were saved from width 8
    _one_line_exit2(_add(folder, str(folder / "my_cnn.toml")), "shape mismatch", "conv.weight")
    _nothing_written(folder)


def test_add_refuses_pickle_with_code(folder: Path) -> None:
    class Payload:  # any class: unpickling it would import and run code
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"conv.weight": Payload()}, folder / "evil.pt")
    _entry(folder, weights="evil.pt")
    res = _add(folder, str(folder / "my_cnn.toml"))
    _one_line_exit2(res, "refused", "evil.pt")
    assert "pwned" not in res.output
    _nothing_written(folder)


def test_add_refuses_train_table(folder: Path) -> None:
    _entry(folder, extra="[train]\nepochs = 1\n")
    _one_line_exit2(_add(folder, str(folder / "my_cnn.toml")), "train", "not trained by robbench")
    _nothing_written(folder)


def test_add_accepts_pt_state_dict_and_python_module(folder: Path, monkeypatch) -> None:
    from safetensors.torch import load_file

    torch.save(load_file(str(folder / "cnn.safetensors")), folder / "cnn.pt")
    monkeypatch.syspath_prepend(str(folder))
    _entry(folder, arch="python:my_models.cnn:SmallCNN", weights="cnn.pt")
    res = _add(folder, str(folder / "my_cnn.toml"))
    assert res.exit_code == 0, res.output
    imp = json.loads((folder / "runs" / "my_cnn" / "manifest.json").read_text())["imported"]
    assert imp["factory"] == "python:my_models.cnn:SmallCNN"
    assert imp["source_file"] == str((folder / "my_models" / "cnn.py").resolve())
    # a second add of the same name is refused; --force moves the old run aside
    _one_line_exit2(_add(folder, str(folder / "my_cnn.toml")), "exists already")
    assert _add(folder, str(folder / "my_cnn.toml"), "--force").exit_code == 0
    assert len([p for p in (folder / "runs").iterdir() if p.name.startswith("my_cnn.stale-")]) == 1


def test_add_warns_on_probability_outputs(folder: Path) -> None:
    _entry(folder, arch="file:my_models/cnn.py:SoftmaxCNN")
    res = CliRunner().invoke(main, ["add", str(folder / "my_cnn.toml"), "--runs-dir", str(folder / "runs")])
    assert res.exit_code == 0, res.output
    assert "look like probabilities" in res.output
    imp = json.loads((folder / "runs" / "my_cnn" / "manifest.json").read_text())["imported"]
    assert any("probabilities" in w for w in imp["warnings"])


def test_changed_source_is_refused_and_missing_source_is_skipped_with_reason(folder: Path) -> None:
    from robbench.api import load_model
    from robbench.errors import CheckpointError, UserError
    from robbench.evaluate.protocol import load_protocol
    from robbench.evaluate.targets import resolve_targets

    src = folder / "my_models" / "cnn.py"
    (folder / "my_models" / "cnn2.py").write_text(src.read_text())
    _entry(folder)
    _entry(folder, name="other_cnn", arch="file:my_models/cnn2.py:SmallCNN")
    assert _add(folder, str(folder / "my_cnn.toml")).exit_code == 0
    assert _add(folder, str(folder / "other_cnn.toml")).exit_code == 0
    x = torch.rand(2, 1, 8, 8)
    assert load_model("my_cnn", runs_dir=folder / "runs")(x).shape == (2, 10)
    src.write_text(src.read_text() + "\n# edited\n")
    with pytest.raises(CheckpointError) as e:
        load_model("my_cnn", runs_dir=folder / "runs")
    assert e.value.reason == "checkpoint-hash"
    # a run whose model cannot be rebuilt is named, with why, when evaluate picks the runs itself
    src.unlink()
    proto = load_protocol("demo-whitebox", [])
    said: list[str] = []
    assert resolve_targets(proto, [], folder / "runs", say=said.append) == ["other_cnn"]
    assert len(said) == 1 and "skipped 1 run(s)" in said[0] and "my_cnn (" in said[0] and "not found" in said[0]
    (folder / "my_models" / "cnn2.py").unlink()
    with pytest.raises(UserError) as e2:
        resolve_targets(proto, [], folder / "runs")
    assert "skipped 2 run(s)" in str(e2.value) and "other_cnn (" in str(e2.value)


def test_results_list_filters(tmp_path: Path) -> None:
    from robbench.store import Store

    db = tmp_path / "r.db"
    with Store(db) as st:
        a = st.start_run("demo_baseline_x3", "a" * 64, "demo-whitebox", "p" * 64, [], 0, {"origin": "trained",
                         "samples": {"n": 100}})
        st.finish_run(a)
        st.start_run("my_cnn", "b" * 64, "demo-autoattack", "q" * 64, ["samples.n=20"], 0, {"origin": "imported"})
    run = lambda *args: CliRunner().invoke(main, ["results", "list", "--db", str(db), *args])  # noqa: E731
    out = run().output
    assert "demo_baseline_x3" in out and "my_cnn" in out
    out = run("--entry", "demo_*").output
    assert "demo_baseline_x3" in out and "my_cnn" not in out
    out = run("--origin", "imported", "--format", "json").output
    rows = json.loads(out)
    assert [r["entry"] for r in rows] == ["my_cnn"] and rows[0]["status"] == "running"
    assert rows[0]["overrides"] == "samples.n=20"
    assert "no runs match" in run("--protocol", "dverge-*").output
    missing = run("--db", str(tmp_path / "none.db"))
    assert missing.exit_code == 2 and "no results store" in missing.output
    assert not (tmp_path / "none.db").exists()
