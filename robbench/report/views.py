"""Which reproduced numbers go in which paper table: ``protocols/reference/views/*.toml``, as data.

A *view* is one table of a paper: its rows name zoo entries, its columns name measures (clean accuracy,
all-or-nothing robust accuracy at an eps over a set of attack ids, ...). Column labels are the
reference CSV's, so a cell's published value is ``(paper, table, row, column)`` of the CSV (or of
``reference = "paper:table"`` when a view borrows another table's published numbers, as the digits demo
does for shape). Plots, heatmaps and the training-time table are declared the same way.
"""
from __future__ import annotations

import dataclasses
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from robbench.config import opt, parse_dataclass
from robbench.errors import ConfigError
from robbench.report.reference import reference_dir

_EPS = re.compile(r"^\d*\.?\d+$")


@dataclass
class Measure:
    """How one cell is computed from a run's per-sample outcomes."""
    kind: Literal["clean", "robust", "meta", "mean", "none"] = opt(
        "robust", help="clean: attack 'clean'; robust: all-or-nothing over the selected attacks; "
                       "meta: a number the evaluation run recorded in its meta (key, scale, unit; e.g. EED's "
                       "measured speed-up); mean: the mean per-sample value (the margin column) of the "
                       "selected outcome rows at eps, e.g. a distillation protocol's distance; none: not "
                       "measured by robbench (published value shown alone)")
    protocol: str = opt("", help="protocol of the run (default: the view's protocol)")
    eps: float | None = opt(None, min=0.0, help="eps of the outcomes (robust measures)")
    attacks: list[str] = opt(["*"], help="fnmatch patterns over the protocol's attack ids, AND-ed "
                                         "(all-or-nothing over every source and step count of each)")
    steps: int | None = opt(None, min=0, help="only the outcomes recorded after this many iterations "
                                              "(an attack's record_steps); default: every step count")
    member: int = opt(-1, min=-1, help="-1 = the whole model (mean measures: every member's rows); j = member j")
    key: str = opt("", help="meta measures: dotted path in the evaluation run's meta, e.g. 'eed_cost.flops_speedup'")
    scale: float = opt(1.0, help="meta measures: the recorded value is multiplied by this (1e-6: parameters in M)")
    unit: str = opt("", help="meta measures: unit of the scaled value, as protocols/reference/<paper>.csv "
                             "writes it ('x', 'M params'); a published value is differenced only in the same unit")

    def validate(self, file: str) -> None:
        if self.kind == "mean" and self.steps is not None:
            raise ConfigError("a mean measure reads final values; steps is for robust measures", file=file,
                              field="steps")
        if self.kind == "meta" and not self.key:
            raise ConfigError("a meta measure names the recorded number: key = 'a.b'", file=file, field="key")
        for i, p in enumerate(self.attacks):
            if "@" in p:
                raise ConfigError(f"{p!r}: attack patterns name attack ids only; select a step count with "
                                  f"steps = K", file=file, field=f"attacks[{i}]")


@dataclass
class View:
    paper: str = opt(help="report folder the view belongs to (dverge | eio | eed | xie | demo)")
    table: str = opt(help="table id in protocols/reference/<paper>.csv (or the view's own id)")
    title: str = opt(help="caption")
    protocol: str = opt("", help="default protocol of the cells")
    dataset: str = opt("", help="dataset of the published numbers (default: the protocol's only dataset; "
                                "needed where the protocol covers several, e.g. eed-suite)")
    reference: str = opt("", help="'paper:table' whose published numbers the cells show (default: own)")
    compare: bool = opt(True, help="false: published numbers are from another setting (the digits demo) "
                                   "and are shown beside, not differenced")
    columns: list[str] = opt([], help="column labels (default: the reference table's columns)")
    rows: dict[str, str] = opt({}, help="row label -> zoo entry name (paper order); run 1 of a row with seeds")
    seeds: dict[str, list[str]] = opt({}, help="row label -> the entries of its further independent runs "
                                               "(e.g. DVERGE Tables 4/5 average three runs): the cell shows "
                                               "the mean +- std over the runs beside the published mean")
    measures: dict[str, Any] = opt({}, help="column label -> measure table; default: 'clean' -> clean, "
                                            "a number -> robust at that eps, anything else -> none")
    row_eps: dict[str, float] = opt({}, min=0.0, help="row label -> the eps of that row's cells, for tables "
                                                       "whose rows are eps values (DVERGE Table 2); it "
                                                       "replaces the eps of every measure of the row")
    curves: bool = opt(False, help="also plot accuracy vs eps, one panel per ensemble size ('X/N' rows)")
    also_on: list[str] = opt([], help="further report pages that show this view (e.g. a digits demo table also "
                                      "on its paper's page)")
    own_runs: bool = opt(True, help="also list every entry the store has for the view's protocol that no view "
                                    "row names (a user's own models), under the paper's rows")
    note: str = opt("", help="one line printed under the table")

    def validate(self, file: str) -> None:
        for k, v in list(self.measures.items()):
            if not isinstance(v, Measure):
                if not isinstance(v, dict):
                    raise ConfigError("expected a table", file=file, field=f"measures.{k}")
                self.measures[k] = parse_dataclass(Measure, v, file=file, prefix=f"measures.{k}")
        if self.reference and ":" not in self.reference:
            raise ConfigError(f"{self.reference!r}: expected 'paper:table'", file=file, field="reference")
        for label in self.row_eps:
            if label not in self.rows:
                raise ConfigError(f"row {label!r} is not in this view's rows", file=file, field=f"row_eps.{label}")
        for label, entries in self.seeds.items():
            if label not in self.rows:
                raise ConfigError(f"row {label!r} is not in this view's rows", file=file, field=f"seeds.{label}")
            if not isinstance(entries, list) or not all(isinstance(e, str) and e for e in entries):
                raise ConfigError("expected a list of entry names", file=file, field=f"seeds.{label}")

    def runs_of(self, row: str) -> list[str]:
        """The entries of a row's independent runs: its entry, then its ``seeds`` (empty: no entry)."""
        first = self.rows.get(row, "")
        return [first, *self.seeds.get(row, [])] if first else []

    @property
    def ref_paper_table(self) -> tuple[str, str]:
        if self.reference:
            p, _, t = self.reference.partition(":")
            return p, t
        return self.paper, self.table

    def measure(self, column: str, row: str | None = None) -> Measure:
        """The measure of a column (of ``row``'s cell when the view sets that row's eps)."""
        m = self._measure(column)
        if row is not None and row in self.row_eps and m.kind in ("robust", "mean"):
            m = dataclasses.replace(m, eps=float(self.row_eps[row]), attacks=list(m.attacks))
        return m

    def _measure(self, column: str) -> Measure:
        if column in self.measures:
            m = self.measures[column]
        elif column == "clean":
            m = Measure(kind="clean")
        elif _EPS.match(column):
            m = Measure(kind="robust", eps=float(column))
        else:
            m = Measure(kind="none")
        if not m.protocol:
            m = dataclasses.replace(m, protocol=self.protocol, attacks=list(m.attacks))
        return m


@dataclass
class Heatmap:
    paper: str = opt(help="report folder")
    protocol: str = opt(help="a transferability protocol (attack crafted on member i, tested on member j)")
    eps: float = opt(0.03, min=0.0, help="DVERGE Figure 3: eps 0.03")
    attack: str = opt("pgd", help="the protocol's attack id")
    entries: list[str] = opt([], help="entries to draw (empty: every entry with a run)")
    title: str = opt("Within-ensemble transferability (attack success rate)")


@dataclass
class Iterations:
    paper: str = opt(help="report folder")
    protocol: str = opt(help="protocol whose attacks record accuracy after several step counts (record_steps)")
    title: str = opt("Accuracy vs attack iterations")
    eps: float | None = opt(None, help="only outcomes at this eps (default: all)")
    also_on: list[str] = opt([], help="further report pages that show these curves")
    published_view: str = opt("", help="table id of a [[view]] of this paper: for each run its rows name, the "
                                       "view's published numbers are drawn dashed, each column at its "
                                       "measure's step count on the series of its measure's attack")


@dataclass
class TrainingTime:
    paper: str = opt(help="report folder")
    table: str = opt("training-time")
    reference: str = opt("dverge:1", help="published training times (DVERGE Table 1)")
    column: str = opt("training time", help="reference column")
    baseline: str = opt("Baseline", help="row the ratios are relative to")
    rows: dict[str, str] = opt({}, help="row label -> zoo entry name")
    title: str = opt("Training time relative to the baseline")


@dataclass
class PaperInfo:
    title: str = opt(help="heading of the paper's report page")
    intro: str = opt("", help="a paragraph under the heading")
    training_curves: list[str] = opt([], help="entries whose run logs are plotted (empty: every entry "
                                              "of the paper's views that has a log)")


@dataclass
class ViewsFile:
    papers: dict[str, Any] = opt({}, help="paper id -> [papers.<id>] table (PaperInfo)")
    view: list[View] = opt([])
    heatmap: list[Heatmap] = opt([])
    iterations: list[Iterations] = opt([])
    training_time: list[TrainingTime] = opt([])
    headline_eps: dict[str, float] = opt({}, help="protocol -> eps ranked on the leaderboard "
                                                  "(default: the median eps of the protocol's outcomes)")
    leaderboard_exclude: list[str] = opt([], help="protocols not ranked (fnmatch), e.g. per-source "
                                                  "accuracy protocols")

    def validate(self, file: str) -> None:
        for k, v in list(self.papers.items()):
            if not isinstance(v, PaperInfo):
                if not isinstance(v, dict):
                    raise ConfigError("expected a table", file=file, field=f"papers.{k}")
                self.papers[k] = parse_dataclass(PaperInfo, v, file=file, prefix=f"papers.{k}")


def _check_view_papers(views: ViewsFile, files: list[tuple[Path, int]]) -> None:
    """Every view names a paper with a ``[papers.<id>]`` table somewhere in the folder (a paper's later
    tables may live in their own file); ``files[i]`` is (file, index in that file) of view i."""
    for v, (file, i) in zip(views.view, files):
        if v.paper not in views.papers:
            raise ConfigError(f"paper {v.paper!r} has no [papers.{v.paper}] table; known: "
                              f"{', '.join(sorted(views.papers))}", file=str(file), field=f"view[{i}].paper")


def views_path() -> Path:
    """The views folder: ``common.toml`` (ranking settings) and one file per paper."""
    return reference_dir() / "views"


def load_views(path: Path | None = None) -> ViewsFile:
    """Parse and validate a views file, or every ``*.toml`` of a views folder combined (ConfigError names
    the file and field on any mistake).

    Each file of a folder is checked on its own (a paper's views and its ``[papers.<id>]`` table live in
    one file), then lists are concatenated in file-name order and tables merged; a key two files both set
    is an error, since which one wins would otherwise depend on file names."""
    path = Path(path) if path is not None else views_path()
    if not path.is_dir():
        single = _load_views_file(path)
        _check_view_papers(single, [(path, i) for i in range(len(single.view))])
        return single
    files = sorted(path.glob("*.toml"))
    if not files:
        raise ConfigError("no views files (*.toml) in this folder", file=str(path))
    merged = ViewsFile()
    origin: dict[str, Path] = {}
    view_files: list[tuple[Path, int]] = []
    for f in files:
        part = _load_views_file(f)
        view_files.extend((f, i) for i in range(len(part.view)))
        for name in ("view", "heatmap", "iterations", "training_time", "leaderboard_exclude"):
            getattr(merged, name).extend(getattr(part, name))
        for name in ("papers", "headline_eps"):
            for key, value in getattr(part, name).items():
                if key in getattr(merged, name):
                    raise ConfigError(f"also set in {origin[f'{name}.{key}']}; set it in one file only",
                                      file=str(f), field=f"{name}.{key}")
                getattr(merged, name)[key] = value
                origin[f"{name}.{key}"] = f
    _check_view_papers(merged, view_files)
    return merged


def _load_views_file(path: Path) -> ViewsFile:
    try:
        with open(path, "rb") as fh:
            raw = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError("file not found", file=str(path)) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"not valid TOML ({e})", file=str(path)) from None
    return parse_dataclass(ViewsFile, raw, file=str(path))
