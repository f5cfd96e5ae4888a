"""Seeded fuzz of the command line's input handling (issue #17): malformed zoo entries, protocols and flags.

Each case is built to be invalid (a wrong type, an out-of-range or non-finite number, an unknown key or
name, broken TOML, non-UTF-8 bytes, a missing or cyclic ``extends``, a malformed or conflicting flag) and
must give exit code 2, exactly one ``error: ...`` line on stderr, no traceback, and no new file. The
cases run in-process through the same ``main()`` the ``robbench`` script runs (click's test runner), so
60 of them take seconds; ``tests/test_integrity.py`` runs the same contract in subprocesses.
"""
from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from robbench.cli import main

SEED = 17
N_CASES = 60
WORDS = ["banana", "nope_xyz", "l3", "Linf", "avg", "", "rotate", "resnet9000", "cuda:99", "@pgd", "1e"]


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v == math.inf else "-inf" if v == -math.inf else repr(v))
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f'"{k}" = {toml_value(x)}' for k, x in v.items()) + " }"
    raise TypeError(v)


def toml_text(doc: dict[str, Any]) -> str:
    """Top-level keys first, then one [table] per dict value (dotted names for nested tables)."""
    lines = [f"{k} = {toml_value(v)}" for k, v in doc.items() if not isinstance(v, dict)]

    def tables(prefix: str, d: dict[str, Any]) -> None:
        lines.append(f"[{prefix}]")
        lines.extend(f"{k} = {toml_value(v)}" for k, v in d.items() if not isinstance(v, dict))
        for k, v in d.items():
            if isinstance(v, dict):
                tables(f"{prefix}.{k}", v)

    for k, v in doc.items():
        if isinstance(v, dict):
            tables(k, v)
    return "\n".join(lines) + "\n"


def put(doc: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    node = doc
    *path, last = dotted.split(".")
    for p in path:
        node = node.setdefault(p, {})
    node[last] = value
    return doc


# (field, values that must be refused)
ZOO_BAD = [
    ("model.members", [0, -1, "three", 1.5, 65]),
    ("model.width", [math.nan, math.inf, -1.0, "wide", 0.0]),
    ("model.combine", WORDS),
    ("model.arch", ["nope_xyz", "resnet9000", 3]),
    ("model.norm_layer", ["batchnorm", 1]),
    ("train.method", ["nope_xyz", 7]),
    ("train.epochs", [-1, "ten", 1.5, True]),
    ("train.seed", [-3, "s"]),
    ("data.batch_size", [0, -5, "big", 70000]),
    ("data.augment", WORDS),
    ("data.dataset", ["nope_xyz", 0]),
    ("train.optimizer.lr", [math.nan, -0.1, "fast", math.inf]),
    ("train.optimizer.name", ["adagrad"]),
    ("train.schedule.gamma", [2.0, math.nan]),
    ("model.bogus_key", [1]),
    ("data.shuffle_mode", ["x"]),
    ("train.params.not_an_option", [1]),
]
PROTO_BAD = [
    ("eps", [[math.nan], ["x"], [-0.1], [], [0.1, math.inf], [0.0], 0.1]),
    ("samples.n", [0, "x", -4, 1.5]),
    ("samples.selection", WORDS),
    ("batch_size", [0, 2 ** 21, "x"]),
    ("kind", WORDS),
    ("norm", ["l3", "L2"]),
    ("seed", [-1]),
    ("eot_samples", [0]),
    ("aggregation", ["nope_xyz"]),
    ("bogus_key", [1]),
    ("attacks", [[], [{"id": "a", "attack": "nope_xyz"}], [{"id": "a", "attack": "pgd", "params": {"steps": 0}}],
                 [{"id": "a", "attack": "pgd", "params": {"bogus": 1}}],
                 [{"id": "a", "attack": "pgd"}, {"id": "a", "attack": "pgd"}],
                 [{"id": "p@q", "attack": "pgd"}], [{"id": "a", "attack": "pgd", "on": "elsewhere"}],
                 [{"id": "a", "attack": "pgd", "params": {"rel_step": math.nan}}]]),
]
EVAL_FLAGS = [
    ["--n", "0"], ["--n", "-3"], ["--n", "x"], ["--eps", "abc"], ["--eps", "nan"], ["--eps", "inf"],
    ["--eps", "0.1,,x"], ["--eps", "-0.2"], ["--eps", "0"], ["--eps", ""], ["--batch-size", "0"],
    ["--batch-size", "big"], ["--device", "banana"], ["--device", "cuda:99"], ["--device", "gpu0"],
    ["--set", "noequals"], ["--set", "a..b=1"], ["--set", "=3"], ["--set", "samples.n=0"],
    ["--set", "samples.n=abc"], ["--set", "bogus=1"], ["--set", "eps=nan"], ["--set", "attacks.nope.steps=1"],
    ["--set", "attacks.pgd-ce.params.steps=-1"], ["--set", "attacks.pgd-ce.steps=0"], ["--n", "5", "--set", "samples.n=6"],
    ["--frobnicate"], ["--memory-format", "weird"], ["--set", "eps.x=1"],
]
TRAIN_FLAGS = [
    ["--epochs", "-1"], ["--epochs", "x"], ["--set", "train.epochs=-2"], ["--memory-format", "weird"],
    ["--set", "model.width=nan"], ["--epochs", "3", "--set", "train.epochs=4"], ["--device", "banana"],
    ["--set", "model=3"], ["--set", "model.members.x=1"], ["--bogus"],
]


def make_cases(rng: random.Random, tmp: Path, n: int) -> list[tuple[str, list[str], dict[str, bytes]]]:
    runs, db = str(tmp / "runs"), str(tmp / "results" / "r.db")
    cases: list[tuple[str, list[str], dict[str, bytes]]] = []
    for i in range(n):
        family = ["zoo", "zoo", "protocol", "protocol", "eval_flags", "train_flags", "file"][i % 7]
        name = f"case{i:02d}"
        if family == "zoo":
            field, values = rng.choice(ZOO_BAD)
            doc = put({"extends": "demo_baseline_x3", "model": {"width": 0.25}, "train": {"epochs": 1}},
                      field, rng.choice(values))
            files = {f"{name}.toml": toml_text(doc).encode()}
            cmd = rng.choice([["zoo", "show", str(tmp / f"{name}.toml")],
                              ["train", str(tmp / f"{name}.toml"), "--runs-dir", runs, "--device", "cpu"]])
            cases.append((f"zoo {field}", cmd, files))
        elif family == "protocol":
            field, values = rng.choice(PROTO_BAD)
            doc = put({"extends": "demo-whitebox"}, field, rng.choice(values))
            files = {f"{name}.toml": toml_text(doc).encode()}
            cases.append((f"protocol {field}", ["evaluate", "--protocol", str(tmp / f"{name}.toml"), "--runs-dir",
                                                runs, "--db", db, "--device", "cpu"], files))
        elif family == "eval_flags":
            flags = rng.choice(EVAL_FLAGS)
            cases.append((f"evaluate {' '.join(flags)}", ["evaluate", "--protocol", "demo-whitebox", "--runs-dir",
                                                          runs, "--db", db, *flags], {}))
        elif family == "train_flags":
            flags = rng.choice(TRAIN_FLAGS)
            cases.append((f"train {' '.join(flags)}", ["train", "zoo/demo_baseline_x3", "--runs-dir", runs, *flags], {}))
        else:  # files that are not valid TOML or not text, and broken extends chains
            kind = rng.choice(["syntax", "utf8", "missing_extends", "cycle", "not_a_table", "truncated"])
            path = tmp / f"{name}.toml"
            text = toml_text({"extends": "demo_baseline_x3", "model": {"width": 0.25}})
            data = {
                "syntax": text + "key = = 1\n",
                "utf8": None,
                "missing_extends": text.replace("demo_baseline_x3", f"missing_{rng.randrange(10**6)}"),
                "cycle": text.replace("demo_baseline_x3", str(path)),
                "not_a_table": 'extends = "demo_baseline_x3"\nmodel = 3\n',
                "truncated": text[: text.index("[model]") + 3],
            }[kind]
            raw = ('description = "caf\u00e9"\n' + text).encode("latin-1") if data is None else data.encode()
            cmd = rng.choice([["zoo", "show", str(path)], ["train", str(path), "--runs-dir", runs, "--device", "cpu"]])
            cases.append((f"file {kind}", cmd, {path.name: raw}))
    return cases


def snapshot(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")}


def test_fuzzed_inputs_are_one_line_exit_2_and_write_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cases = make_cases(random.Random(SEED), tmp_path, N_CASES)
    assert len(cases) >= 50
    runner = CliRunner()
    failures = []
    for label, args, files in cases:
        for fname, data in files.items():
            (tmp_path / fname).write_bytes(data)
        before = snapshot(tmp_path)
        result = runner.invoke(main, args, catch_exceptions=True)
        err = result.stderr.strip()
        problems = []
        if result.exit_code != 2:
            problems.append(f"exit {result.exit_code}")
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            problems.append(f"raised {type(result.exception).__name__}: {result.exception}")
        if "Traceback" in result.stderr or err.count("\n") != 0 or not err.startswith("error: "):
            problems.append(f"stderr {err[:300]!r}")
        if snapshot(tmp_path) != before:
            problems.append(f"wrote {sorted(set(snapshot(tmp_path)) - set(before))}")
        if problems:
            failures.append(f"{label} {args[:1] + args[-3:]}: {'; '.join(problems)}")
    assert not failures, f"{len(failures)} of {len(cases)} cases:\n" + "\n".join(failures)
