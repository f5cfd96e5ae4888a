"""Config system: validation errors name file and field, extends, overrides, registries."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from robbench.config import apply_overrides, config_hash, load_entry, parse_override
from robbench.errors import ConfigError
from robbench.registry import Registry

GOOD = """
description = "tiny digits baseline"
paper = "demo"
[model]
arch = "resnet20"
members = 2
width = 0.25
[data]
dataset = "digits"
batch_size = 64
[train]
method = "baseline"
epochs = 2
[train.optimizer]
lr = 0.05
"""


def write(tmp: Path, name: str, text: str) -> Path:
    p = tmp / f"{name}.toml"
    p.write_text(text)
    return p


def test_good_entry_fills_defaults(tmp_path: Path) -> None:
    e = load_entry(str(write(tmp_path, "tiny", GOOD)))
    assert e.name == "tiny"
    assert e.model.members == 2 and e.model.width == 0.25
    assert e.model.combine == "log_mean_softmax"  # DVERGE default
    assert e.train.optimizer.lr == 0.05 and e.train.optimizer.momentum == 0.9
    assert e.train.schedule.milestones == [100, 150]
    assert len(e.sha256()) == 64


@pytest.mark.parametrize(
    "patch, field, words",
    [
        (("[model]", "[model]\nfoo = 1"), "model.foo", "unknown key"),
        (("members = 2", 'members = "two"'), "model.members", "integer"),
        (("members = 2", "members = 0"), "model.members", "out of range"),
        (('arch = "resnet20"', 'arch = "resnet21"'), "model.arch", "resnet20"),
        (('dataset = "digits"', 'dataset = "mnist"'), "data.dataset", "digits"),
        (('method = "baseline"', 'method = "magic"'), "train.method", "baseline"),
        (("lr = 0.05", "lr = -1.0"), "train.optimizer.lr", "out of range"),
        (("[model]", "[model]\ncombine = 'median'"), "model.combine", "log_mean_softmax"),
    ],
)
def test_bad_values_name_file_field_and_allowed(tmp_path: Path, patch: tuple[str, str], field: str,
                                                 words: str) -> None:
    p = write(tmp_path, "bad", GOOD.replace(*patch, 1))
    with pytest.raises(ConfigError) as ei:
        load_entry(str(p))
    msg = str(ei.value)
    assert str(p) in msg and field in msg and words in msg
    assert "\n" not in msg


def test_missing_table_and_bad_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="data: required"):
        load_entry(str(write(tmp_path, "nodata", '[model]\narch = "resnet20"\n')))
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_entry(str(write(tmp_path, "broken", "[model\n")))


def test_extends_merges_tables_and_detects_cycles(tmp_path: Path) -> None:
    write(tmp_path, "base", GOOD)
    child = write(tmp_path, "child", 'extends = "base"\n[model]\nmembers = 5\n[train]\nepochs = 7\n')
    e = load_entry(str(child))
    assert e.name == "child"
    assert (e.model.members, e.model.width, e.train.epochs, e.train.optimizer.lr) == (5, 0.25, 7, 0.05)
    write(tmp_path, "a", 'extends = "b"\n')
    write(tmp_path, "b", 'extends = "a"\n')
    with pytest.raises(ConfigError, match="extends cycle: a -> b -> a"):
        load_entry(str(tmp_path / "a.toml"))


def test_overrides_apply_and_are_recorded(tmp_path: Path) -> None:
    p = write(tmp_path, "tiny", GOOD)
    e = load_entry(str(p), ["train.epochs=3", "model.combine=mean_logits", "train.optimizer.lr=1e-3"])
    assert (e.train.epochs, e.model.combine, e.train.optimizer.lr) == (3, "mean_logits", 1e-3)
    assert e.overrides == ["train.epochs=3", "model.combine=mean_logits", "train.optimizer.lr=1e-3"]
    assert e.sha256() != load_entry(str(p)).sha256()
    with pytest.raises(ConfigError, match=r"--set train.epochs=soon\): train.epochs: expected an integer"):
        load_entry(str(p), ["train.epochs=soon"])
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("train.epochs")
    assert apply_overrides({"a": {"b": 1}}, ["a.c=[1, 2]"]) == {"a": {"b": 1, "c": [1, 2]}}


def test_config_hash_is_order_independent() -> None:
    assert config_hash({"a": 1, "b": [1, 2]}) == config_hash({"b": [1, 2], "a": 1})
    assert config_hash({"a": 1}) != config_hash({"a": 2})


def test_registry_rejects_duplicates_and_unknown_names() -> None:
    reg: Registry[object] = Registry("widget")
    reg.register("x")(object())
    with pytest.raises(ValueError, match="duplicate widget name 'x'"):
        reg.register("x")(object())
    with pytest.raises(ConfigError, match="unknown widget 'y'; allowed: x"):
        reg.get("y")


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "robbench", *args], cwd=cwd, capture_output=True, text=True)


def test_cli_user_error_is_one_line_exit_2(tmp_path: Path) -> None:
    p = write(tmp_path, "bad", GOOD.replace("members = 2", "members = -3"))
    r = _cli("zoo", "show", str(p), cwd=tmp_path)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0
    assert "model.members" in r.stderr and "out of range" in r.stderr
    r = _cli("zoo", "show", "no_such_entry", cwd=tmp_path)
    assert r.returncode == 2 and "no zoo entry named 'no_such_entry'" in r.stderr


def test_cli_entry_by_path_or_name_from_any_directory(tmp_path: Path) -> None:
    from robbench.config import list_entries

    names = list_entries()
    assert names, "the zoo ships entries"
    name = names[0]
    for spec in (name, f"zoo/{name}", f"zoo/{name}.toml"):
        r = _cli("zoo", "show", spec, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        assert f'"name": "{name}"' in r.stdout
    r = _cli("zoo", "list", cwd=tmp_path)
    assert r.returncode == 0 and name in r.stdout
