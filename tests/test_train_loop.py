"""The training loop end to end: run directory, log, no retraining, init_from, overrides, resume after an
interruption (exception and SIGKILL) to bit-identical weights, and 2-process data parallel under torchrun."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from robbench.errors import UserError
from robbench.registry import METHODS
from robbench.train.run import train_entry

ROOT = Path(__file__).resolve().parent.parent
# tiny and quick: width-0.25 members, 6 batches of 256 digits per epoch
TINY = ["model.width=0.25", "data.batch_size=256"]
# tinier for the resume tests: 3 batches of 256 synthetic 1x8x8 images per epoch
SYNTH = ["model.width=0.25", "data.batch_size=256", "data.dataset=synthetic", "data.test_batch_size=128",
         "data.options={ n_train = 768, n_test = 128, channels = 1 }"]


def _weights(runs: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(runs / name / "model.safetensors"))


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f"{len(diff)} tensors differ, e.g. {diff[:3]}"


def test_train_entry_writes_run_and_does_not_retrain(tmp_path, capsys):
    runs = tmp_path / "runs"
    m = train_entry("zoo/demo_baseline_x3", TINY + ["train.epochs=2"], device="cpu", runs_dir=runs, progress=False)
    assert m["status"] == "complete" and m["epochs_done"] == 2
    assert m["overrides"] == TINY + ["train.epochs=2"]  # --set/--epochs recorded
    assert m["config"]["train"]["epochs"] == 2 and m["config"]["model"]["width"] == 0.25
    log = [json.loads(line) for line in (runs / "demo_baseline_x3" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2]
    for r in log:
        assert set(r) >= {"epoch", "lr", "losses", "test_acc", "member_test_acc", "seconds", "peak_mem_mb"}
        assert 0 <= r["test_acc"] <= 1 and len(r["member_test_acc"]) == 3 and r["seconds"] > 0
    assert log[-1]["test_acc"] > 0.3  # it learns something in 12 steps (chance: 0.1)
    mtime = (runs / "demo_baseline_x3" / "model.safetensors").stat().st_mtime_ns
    capsys.readouterr()
    again = train_entry("demo_baseline_x3", TINY + ["train.epochs=2"], device="cpu", runs_dir=runs, progress=False)
    assert again["status"] == "complete"
    assert "already trained" in capsys.readouterr().err
    assert (runs / "demo_baseline_x3" / "model.safetensors").stat().st_mtime_ns == mtime


def test_init_from_missing_names_the_command(tmp_path):
    with pytest.raises(UserError, match=r"train\.init_from.*robbench train zoo/demo_baseline_x3"):
        train_entry("demo_dverge_x3", TINY + ["train.epochs=1"], device="cpu", runs_dir=tmp_path, progress=False)
    assert not (tmp_path / "demo_dverge_x3" / "model.safetensors").exists()


def test_init_from_loads_the_trained_weights(tmp_path):
    runs = tmp_path / "runs"
    train_entry("demo_baseline_x3", TINY + ["train.epochs=1"], device="cpu", runs_dir=runs, progress=False)
    base = _weights(runs, "demo_baseline_x3")
    # 0 DVERGE epochs: the saved weights are exactly the loaded baseline
    m = train_entry("demo_dverge_x3", TINY + ["train.epochs=0", "train.init_from=demo_baseline_x3"], device="cpu",
                    runs_dir=runs, progress=False)
    assert m["extra"]["init_from"]["entry"] == "demo_baseline_x3"
    _assert_same_weights(base, _weights(runs, "demo_dverge_x3"))


class _Interrupt(Exception):
    pass


@pytest.mark.parametrize("entry,sets", [
    ("demo_dverge_x3", ["train.params.steps=1", "train.params.layer=0"]),  # two streams, layer per epoch
    ("demo_gal_x3", ["train.params.clean_ce_second_forward=false"]),  # global-RNG noise
    ("demo_advt_x3", ["train.params.adv_steps=2"]),                        # random starts
    ("demo_baseline_x3", ["model.width=0.5"]),                             # no bad-kernel shortcut
])
def test_interrupted_run_resumes_to_identical_weights(tmp_path, monkeypatch, entry, sets):
    # 3 batches per epoch, state saved after every batch
    over = SYNTH + sets + ["train.epochs=2", "train.save_every_steps=1", "train.init_from=\"\""]
    # uninterrupted
    train_entry(entry, over, device="cpu", runs_dir=tmp_path / "a", progress=False)
    # interrupted at the 5th step (epoch 2, batch 2; last state saved after batch 1), then resumed
    cls = METHODS.get(entry.split("_")[1] if entry != "demo_dverge_x3" else "dverge")
    original = cls.step
    calls = {"n": 0}

    def flaky(self, ctx, batch):
        calls["n"] += 1
        if calls["n"] == 5:
            raise _Interrupt
        return original(self, ctx, batch)

    monkeypatch.setattr(cls, "step", flaky)
    with pytest.raises(_Interrupt):
        train_entry(entry, over, device="cpu", runs_dir=tmp_path / "b", progress=False)
    monkeypatch.setattr(cls, "step", original)
    manifest = json.loads((tmp_path / "b" / entry / "manifest.json").read_text())
    assert manifest["status"] == "training" and manifest["epochs_done"] == 1
    train_entry(entry, over, device="cpu", runs_dir=tmp_path / "b", progress=False)
    _assert_same_weights(_weights(tmp_path / "a", entry), _weights(tmp_path / "b", entry))
    log = [json.loads(x)["epoch"] for x in (tmp_path / "b" / entry / "log.jsonl").read_text().splitlines()]
    assert log == [1, 2]


@pytest.mark.parametrize("width", [0.25, 0.5])  # 0.25: the 1x1 stride-2 shortcut torch 2.14.1 gets wrong in channels_last
def test_sigkilled_run_resumes_to_identical_weights(tmp_path, width):
    over = SYNTH + ["train.epochs=4", "train.save_every_steps=2", f"model.width={width}"]
    train_entry("demo_baseline_x3", over, device="cpu", runs_dir=tmp_path / "a", progress=False)
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
    cmd = [sys.executable, "-m", "robbench", "train", "zoo/demo_baseline_x3", "--device", "cpu",
           "--runs-dir", str(tmp_path / "b")] + [a for s in over for a in ("--set", s)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    manifest = tmp_path / "b" / "demo_baseline_x3" / "manifest.json"
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            if manifest.is_file():
                try:
                    m = json.loads(manifest.read_text())
                except json.JSONDecodeError:
                    m = {}
                if "train_state.pt" in m.get("files", {}) and m.get("epochs_done", 0) >= 1:
                    break
            time.sleep(0.02)
        time.sleep(0.15)  # somewhere mid-run, between or during saves
        assert proc.poll() is None, "the run finished before it could be killed; " + proc.stderr.read().decode()[-500:]
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert json.loads(manifest.read_text())["status"] == "training"
    m = train_entry("demo_baseline_x3", over, device="cpu", runs_dir=tmp_path / "b", progress=False)
    assert m["status"] == "complete"
    _assert_same_weights(_weights(tmp_path / "a", "demo_baseline_x3"), _weights(tmp_path / "b", "demo_baseline_x3"))


def test_ddp_two_processes(tmp_path):
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "robbench", "train", "zoo/demo_baseline_x3",
           "--device", "cpu", "--runs-dir", str(tmp_path), "--epochs", "1"] + [a for s in TINY for a in ("--set", s)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    m = json.loads((tmp_path / "demo_baseline_x3" / "manifest.json").read_text())
    assert m["status"] == "complete" and m["extra"]["world_size"] == 2
    shas = m["extra"]["rank_weights_sha256"]
    assert len(shas) == 2 and shas[0] == shas[1]  # both ranks end with identical parameters and buffers
    log = [json.loads(x) for x in (tmp_path / "demo_baseline_x3" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 1 and log[0]["world_size"] == 2  # rank 0 alone writes
