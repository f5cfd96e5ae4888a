"""Checkpoints: atomic files, round trip, manifest, tamper and architecture checks, pickle refusal, RNG state."""
from __future__ import annotations

import json
import os
import pickle
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from robbench.checkpoint import (RunDir, atomic_save, atomic_write_bytes, checkpoint_sha256, file_sha256,
                                 load_state_dict_file, load_trained, rng_state, save_state_dict_file,
                                 set_rng_state, state_dict_for_save)
from robbench.config import load_entry
from robbench.errors import CheckpointError

TINY = """
paper = "demo"
[model]
arch = "resnet20"
members = {members}
width = {width}
[data]
dataset = "digits"
[train]
method = "baseline"
epochs = 2
seed = 3
"""


def make_entry(tmp: Path, name: str = "tiny_ck", members: int = 2, width: float = 0.25, overrides=None):
    p = tmp / "zoo" / f"{name}.toml"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(TINY.format(members=members, width=width))
    return load_entry(str(p), overrides)


def trained_model(entry, seed: int = 0) -> nn.Module:
    from robbench.data import get_info
    from robbench.models import build_model

    torch.manual_seed(seed)
    model = build_model(entry, get_info(entry.data.dataset))
    with torch.no_grad():  # make every tensor (BN stats too) differ from a fresh init
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.add_(torch.randn_like(t) * 0.1)
            else:
                t.add_(5)
    return model


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


# ---------------------------------------------------------------------------------------- atomic files
def test_atomic_write_and_failing_writer_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "f.bin"
    atomic_write_bytes(target, b"v1")
    assert target.read_bytes() == b"v1"
    mask = os.umask(0)
    os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~mask  # the usual mode, not mkstemp's 0600

    def failing(fh):
        fh.write(b"partial data")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_save(target, failing)
    assert target.read_bytes() == b"v1"  # the old file is untouched
    fresh = tmp_path / "sub" / "new.bin"
    with pytest.raises(RuntimeError):
        atomic_save(fresh, failing)
    assert not fresh.exists()
    assert sorted(p.name for p in target.parent.iterdir()) == ["f.bin"]  # no temp files left


# ---------------------------------------------------------------------------------------- round trip
def test_round_trip_manifest_and_sha(tmp_path: Path) -> None:
    entry = make_entry(tmp_path, overrides=["train.epochs=2"])
    model = trained_model(entry)
    run = RunDir(tmp_path / "runs", entry.name)
    run.begin(entry, extra={"note": "test"})
    assert run.read_manifest()["status"] == "training"
    run.save_final(model, entry, extra={"train_seconds": 1.5})

    loaded, m = load_trained(entry.name, runs_dir=tmp_path / "runs", device="cpu")
    assert not loaded.training
    ref, got = model.state_dict(), loaded.state_dict()
    assert list(ref) == list(got)
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
    x = torch.rand(4, 1, 8, 8)
    model.eval()
    assert torch.equal(model(x), loaded(x))

    # Manifest content.
    assert m["entry"] == "tiny_ck" and m["status"] == "complete" and m["epochs_done"] == 2
    assert m["config"] == json.loads(json.dumps(entry.resolved()))
    assert m["entry_sha256"] == entry.sha256() and m["overrides"] == ["train.epochs=2"] and m["seed"] == 3
    assert m["extra"] == {"note": "test", "train_seconds": 1.5}
    assert m["files"]["model.safetensors"] == file_sha256(run.weights_path) == checkpoint_sha256(run)
    assert checkpoint_sha256(run.path) == m["files"]["model.safetensors"]
    assert {"python", "torch", "torchvision", "robbench", "numpy"} <= set(m["versions"])
    assert m["versions"]["torch"] == torch.__version__
    assert m["git_commit"] is None or re.fullmatch(r"[0-9a-f]{40}", m["git_commit"])
    assert m["created"] and m["updated"]
    # Also addressable as zoo/NAME and by the entry object.
    assert load_trained(f"zoo/{entry.name}", runs_dir=tmp_path / "runs")[1]["entry"] == "tiny_ck"
    assert load_trained(entry, runs_dir=tmp_path / "runs")[1]["entry"] == "tiny_ck"


def test_missing_and_incomplete_runs(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError) as e:
        load_trained("zoo/nothing_here", runs_dir=tmp_path / "runs")
    # no zoo entry of that name: not told to train it, told where entries are listed
    assert "robbench train zoo/nothing_here" not in one_line(e) and "robbench zoo list" in str(e.value)
    with pytest.raises(CheckpointError) as e:
        load_trained("demo_baseline_x3", runs_dir=tmp_path / "runs")
    assert "robbench train zoo/demo_baseline_x3" in one_line(e)
    entry = make_entry(tmp_path)
    run = RunDir(tmp_path / "runs", entry.name)
    run.begin(entry)
    run.save_weights(trained_model(entry), epochs_done=1)
    with pytest.raises(CheckpointError) as e:
        load_trained(entry.name, runs_dir=tmp_path / "runs")
    assert "not complete (epoch 1 of 2)" in one_line(e) and "robbench train zoo/tiny_ck" in str(e.value)
    model, m = load_trained(entry.name, runs_dir=tmp_path / "runs", require_complete=False)
    assert m["status"] == "training" and not model.training


# ---------------------------------------------------------------------------------------- tampering
@pytest.fixture
def saved(tmp_path: Path):
    entry = make_entry(tmp_path)
    run = RunDir(tmp_path / "runs", entry.name)
    run.save_final(trained_model(entry), entry)
    return entry, run


def test_tampered_weights_are_refused(saved) -> None:
    entry, run = saved
    data = bytearray(run.weights_path.read_bytes())
    data[-10] ^= 0xFF  # flip one byte of tensor data: the file still parses, only the hash tells
    run.weights_path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as e:
        load_trained(entry.name, runs_dir=run.root)
    assert "model.safetensors" in one_line(e) and "sha256 mismatch" in str(e.value)


def test_tampered_train_state_and_edited_manifest(saved) -> None:
    entry, run = saved
    run.save_train_state({"epoch": 1, "t": torch.ones(3)}, epochs_done=1)
    assert torch.equal(run.load_train_state()["t"], torch.ones(3))
    torch.save({"epoch": 1, "t": torch.zeros(3)}, run.train_state_path)
    with pytest.raises(CheckpointError) as e:
        run.load_train_state()
    assert "train_state.pt" in one_line(e)
    with pytest.raises(CheckpointError, match="train_state.pt"):
        load_trained(entry.name, runs_dir=run.root)  # every recorded file is verified
    run.train_state_path.unlink()  # resume state may be deleted after training
    load_trained(entry.name, runs_dir=run.root)
    m = json.loads(run.manifest_path.read_text())
    m["config"]["model"]["members"] = 3
    run.manifest_path.write_text(json.dumps(m))
    with pytest.raises(CheckpointError) as e:
        load_trained(entry.name, runs_dir=run.root)
    assert "manifest.json" in one_line(e) and "edited" in str(e.value)
    run.manifest_path.write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt manifest"):
        load_trained(entry.name, runs_dir=run.root)


def replace_weights(run: RunDir, model: nn.Module) -> None:
    """A consistent but wrong checkpoint: other weights, manifest hash updated to match."""
    sha = save_state_dict_file(run.weights_path, state_dict_for_save(model))
    m = json.loads(run.manifest_path.read_text())
    m["files"]["model.safetensors"] = sha
    run.manifest_path.write_text(json.dumps(m))


def test_wrong_architecture_is_refused(saved, tmp_path: Path) -> None:
    entry, run = saved
    replace_weights(run, trained_model(make_entry(tmp_path / "b", members=3)))
    with pytest.raises(CheckpointError) as e:
        load_trained(entry.name, runs_dir=run.root)
    msg = one_line(e)
    assert "unexpected keys members.2." in msg and "more)" in msg and "missing" not in msg
    replace_weights(run, trained_model(make_entry(tmp_path / "c", width=0.5)))
    with pytest.raises(CheckpointError) as e:
        load_trained(entry.name, runs_dir=run.root)
    assert "shape mismatch" in one_line(e)
    replace_weights(run, nn.Linear(2, 2))
    with pytest.raises(CheckpointError) as e:
        load_trained(entry.name, runs_dir=run.root)
    assert "missing keys members.0." in one_line(e) and "unexpected keys bias, weight" in str(e.value)


def test_begin_refuses_a_different_config(tmp_path: Path) -> None:
    entry = make_entry(tmp_path)
    run = RunDir(tmp_path / "runs", entry.name)
    run.begin(entry)
    run.save_train_state({"epoch": 1})
    assert run.begin(entry)["files"]  # same config: continue, state kept
    other = make_entry(tmp_path, overrides=["train.epochs=5"])
    with pytest.raises(CheckpointError, match="different configuration"):
        run.begin(other)
    m = run.begin(other, fresh=True)
    assert m["files"] == {} and not run.train_state_path.exists() and run.load_train_state() is None


# ---------------------------------------------------------------------------------------- pickle safety
class Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("kind", ["torch_zip", "raw_pickle"])
def test_code_executing_pickle_is_refused(tmp_path: Path, kind: str) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    obj = {"weight": torch.ones(2), "x": Payload(marker)}
    if kind == "torch_zip":
        torch.save(obj, evil)
    else:
        evil.write_bytes(pickle.dumps(obj, protocol=2))
    with pytest.raises(CheckpointError) as e:
        load_state_dict_file(evil)
    assert "refused" in one_line(e) and "evil.pt" in str(e.value)
    assert not marker.exists()  # the payload never ran
    # Even with a manifest that vouches for it (sha updated), resume state goes through weights_only.
    entry = make_entry(tmp_path)
    run = RunDir(tmp_path / "runs", entry.name)
    run.begin(entry)
    run.save_train_state({"epoch": 0})
    run.train_state_path.write_bytes(evil.read_bytes())
    m = json.loads(run.manifest_path.read_text())
    m["files"]["train_state.pt"] = file_sha256(run.train_state_path)
    run.manifest_path.write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match="refused"):
        run.load_train_state()
    assert not marker.exists()


def test_load_state_dict_file_formats(tmp_path: Path) -> None:
    sd = {"a.weight": torch.randn(3, 2), "a.bias": torch.randn(3)}
    save_state_dict_file(tmp_path / "w.safetensors", sd)
    got = load_state_dict_file(tmp_path / "w.safetensors")
    assert set(got) == set(sd) and all(torch.equal(got[k], sd[k]) for k in sd)
    # DVERGE-style nested per-member dicts in a torch file are flattened with dots.
    torch.save({"model_0": sd, "model_1": sd}, tmp_path / "epoch_200.pth")
    got = load_state_dict_file(tmp_path / "epoch_200.pth")
    assert set(got) == {"model_0.a.weight", "model_0.a.bias", "model_1.a.weight", "model_1.a.bias"}
    torch.save({"state_dict": sd, "epoch": 3}, tmp_path / "lightning.pt")
    assert set(load_state_dict_file(tmp_path / "lightning.pt")) == set(sd)
    (tmp_path / "junk.pt").write_bytes(b"<html>quota exceeded</html>")
    with pytest.raises(CheckpointError, match="junk.pt: not a readable checkpoint"):
        load_state_dict_file(tmp_path / "junk.pt")
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{bad")
    with pytest.raises(CheckpointError, match="corrupt safetensors"):
        load_state_dict_file(tmp_path / "junk.safetensors")
    with pytest.raises(CheckpointError, match="file not found"):
        load_state_dict_file(tmp_path / "absent.safetensors")


def test_tied_tensors_are_saved_and_loaded(tmp_path: Path) -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)
            self.b.weight = self.a.weight  # shared storage, as the Ensemble-in-One reference's paths

    src = Tied()
    sha = save_state_dict_file(tmp_path / "t.safetensors", state_dict_for_save(src))
    assert sha == file_sha256(tmp_path / "t.safetensors")
    dst = Tied()
    dst.load_state_dict(load_state_dict_file(tmp_path / "t.safetensors"))
    assert torch.equal(dst.b.weight, src.a.weight) and dst.a.weight is dst.b.weight


# ---------------------------------------------------------------------------------------- resume state
def test_rng_state_round_trip_under_weights_only(tmp_path: Path) -> None:
    entry = make_entry(tmp_path)
    run = RunDir(tmp_path / "runs", entry.name)
    run.begin(entry)
    torch.manual_seed(1)
    random.seed(2)
    np.random.seed(3)
    random.gauss(0, 1)  # leaves a cached gaussian in Python's state
    np.random.standard_normal()  # and in numpy's legacy state
    run.save_train_state({"rng": rng_state(), "epoch": 4, "opt": {"lr": 0.1, "steps": [1, 2]}}, epochs_done=4)

    def draw():
        return (torch.rand(5), random.random(), random.gauss(0, 1), np.random.rand(3), np.random.standard_normal())

    first = draw()
    draw()
    state = run.load_train_state()
    assert state["epoch"] == 4 and state["opt"] == {"lr": 0.1, "steps": [1, 2]}
    set_rng_state(state["rng"])
    second = draw()
    assert torch.equal(first[0], second[0])
    assert first[1:3] == second[1:3]
    assert np.array_equal(first[3], second[3]) and first[4] == second[4]
    assert run.read_manifest()["epochs_done"] == 4


def test_train_state_must_be_weights_only_safe(tmp_path: Path) -> None:
    entry = make_entry(tmp_path)
    run = RunDir(tmp_path / "runs", entry.name)
    run.begin(entry)
    with pytest.raises(TypeError, match="plain Python"):
        run.save_train_state({"obj": Payload(tmp_path / "x")})
    assert not run.train_state_path.exists() and not (tmp_path / "x").exists()


def test_log_append_and_torn_line(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "runs", "e")
    run.append_log({"epoch": 1, "loss": 0.5})
    run.append_log({"epoch": 2, "loss": 0.4})
    with open(run.log_path, "a") as fh:
        fh.write('{"epoch": 3, "lo')  # killed mid-write
    assert [r["epoch"] for r in run.read_log()] == [1, 2]
