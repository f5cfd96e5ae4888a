"""Paper tables: every cell of a view computed from the store and set beside its published value.

A published value carries its setting (the dataset and protocol of the paper's table); a reproduced
cell is differenced against it only where the run's setting is the same (a digits demo run is shown
beside a CIFAR-10 number, never subtracted from it)."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from robbench.report.flags import Flag, protocol_info
from robbench.report.measures import Cell, MeanCell, SeedCell, ValueCell, compute, compute_seeds
from robbench.report.reference import RefValue, published, table_layout
from robbench.report.results import Results
from robbench.report.views import View, ViewsFile, load_views, views_path

_SIZE = re.compile(r"/(\d+)")
MEASURE = "accuracy"  # every table cell: accuracy in % (transferability heatmaps: attack success rate in %)
UNIT = "%"
OWN_MARK = "+ "  # row labels of store entries no paper row names


@dataclass(frozen=True)
class Setting:
    """Where a number comes from: dataset and protocol ('' = unknown)."""
    dataset: str
    protocol: str

    def matches(self, other: "Setting") -> bool:
        return bool(self.dataset and self.protocol) and self == other


@dataclass
class CellResult:
    row: str
    column: str
    entries: list[str]
    protocol: str
    cell: Cell | SeedCell | ValueCell | MeanCell | None
    ref: RefValue | None
    measurable: bool
    flags: list[Flag]
    setting: Setting = field(default_factory=lambda: Setting("", ""))
    published_setting: Setting = field(default_factory=lambda: Setting("", ""))
    meta_key: str = ""  # a meta measure's key, a mean measure's attack patterns (CSV/JSON name the measure by it)

    @property
    def entry(self) -> str:
        return self.entries[0] if self.entries else ""

    @property
    def status(self) -> str:
        if not self.entry:
            return "no entry"
        if not self.measurable:
            return "not measured"
        return "done" if self.cell is not None else "not run"

    @property
    def comparable(self) -> bool:
        """Published and reproduced numbers come from the same setting and are in the same unit
        (accuracy: both percentages; a meta measure: the unit it declares)."""
        if self.cell is None or self.ref is None or not self.setting.matches(self.published_setting):
            return False
        if isinstance(self.cell, ValueCell):
            return bool(self.cell.unit) and self.ref.unit == self.cell.unit
        if isinstance(self.cell, MeanCell):  # a loss or distance: unitless on both sides counts as the same
            return self.ref.unit == self.cell.unit
        return self.ref.unit in ("%", "pp")

    @property
    def delta(self) -> float | None:
        if not self.comparable:
            return None
        c = self.cell
        return (c.value if isinstance(c, (ValueCell, MeanCell)) else 100 * c.acc) - self.ref.value  # type: ignore[union-attr]

    @property
    def first(self) -> Cell | None:
        """The (first) accuracy cell: what carries n and the attack seed (a meta value carries neither)."""
        c = self.cell
        if isinstance(c, (ValueCell, MeanCell)):
            return None
        return c.cells[0] if isinstance(c, SeedCell) else c

    @property
    def counted(self) -> Any:
        """What carries this cell's sample count n and attack seed: its (first) accuracy cell, or its mean
        over samples; None for a recorded value."""
        return self.cell if isinstance(self.cell, MeanCell) else self.first

    @property
    def run(self) -> Any:
        c = self.cell
        return c.run if isinstance(c, (ValueCell, MeanCell)) else (None if self.first is None else self.first.run)

    def interval(self) -> tuple[float, float] | None:
        c = self.cell
        if c is None or isinstance(c, (ValueCell, MeanCell)):  # a mean's interval is in its own unit, not %
            return None
        return c.interval if isinstance(c, SeedCell) and len(c.cells) > 1 else (self.first.lo, self.first.hi)

    def record(self, paper: str, table: str) -> dict[str, Any]:
        c, one = self.cell, self.first
        iv, delta = self.interval(), self.delta
        multi = isinstance(c, SeedCell)
        if isinstance(c, MeanCell):
            return self._mean_record(paper, table, c, delta)
        return {
            "paper": paper, "table": table, "row": self.row, "column": self.column, "entry": self.entry,
            "protocol": self.protocol, "dataset": self.setting.dataset or None, "status": self.status,
            "measure": f"meta:{self.meta_key}" if isinstance(c, ValueCell) else MEASURE,
            "unit": c.unit if isinstance(c, ValueCell) else UNIT,
            "reproduced": None if c is None else round(c.value if isinstance(c, ValueCell) else 100 * c.acc, 4),
            "std": round(100 * c.std, 4) if multi and len(c.cells) > 1 else None,
            "runs": len(c.cells) if multi else (None if c is None else 1),
            "ci_low": None if iv is None else round(100 * iv[0], 4),
            "ci_high": None if iv is None else round(100 * iv[1], 4),
            "n": None if one is None else one.n, "correct": None if one is None or multi else one.k,
            "seed": None if one is None else one.run.seed, "run_id": None if self.run is None else self.run.run_id,
            "checkpoint_sha256": None if self.run is None else self.run.checkpoint_sha256,
            "published": None if self.ref is None else self.ref.value,
            "published_unit": None if self.ref is None else self.ref.unit,
            "published_dataset": self.published_setting.dataset or None,
            "published_protocol": self.published_setting.protocol or None,
            "delta": None if delta is None else round(delta, 4),
            "flags": "; ".join(f.code for f in self.flags),
        }


    def _mean_record(self, paper: str, table: str, c: MeanCell, delta: float | None) -> dict[str, Any]:
        """The record of a mean cell: the value, interval and delta in the value's own unit (not %)."""
        return {
            "paper": paper, "table": table, "row": self.row, "column": self.column, "entry": self.entry,
            "protocol": self.protocol, "dataset": self.setting.dataset or None, "status": self.status,
            "measure": f"mean:{self.meta_key}", "unit": c.unit, "reproduced": round(c.value, 6), "std": None,
            "runs": 1, "ci_low": round(c.lo, 6), "ci_high": round(c.hi, 6), "n": c.n, "correct": None,
            "seed": c.run.seed, "run_id": c.run.run_id, "checkpoint_sha256": c.run.checkpoint_sha256,
            "published": None if self.ref is None else self.ref.value,
            "published_unit": None if self.ref is None else self.ref.unit,
            "published_dataset": self.published_setting.dataset or None,
            "published_protocol": self.published_setting.protocol or None,
            "delta": None if delta is None else round(delta, 6),
            "flags": "; ".join(f.code for f in self.flags),
        }


@dataclass
class TableResult:
    view: View
    rows: list[str]
    columns: list[str]
    cells: dict[tuple[str, str], CellResult]
    own: list[str] = field(default_factory=list)  # row labels of the user's own runs


def view_layout(view: View) -> tuple[list[str], list[str]]:
    """Rows: the view's (paper order), then published rows it does not map (shown as 'no entry');
    columns: the view's, else the published table's."""
    ref_rows, ref_cols = table_layout(*view.ref_paper_table)
    rows = list(view.rows)
    if view.compare:
        rows += [r for r in ref_rows if r not in view.rows]
    cols = list(view.columns) or ref_cols
    return rows, cols


def named_entries(spec: ViewsFile) -> set[str]:
    """Every entry a view row (or its seeds) names: the paper's models, not the user's."""
    out = {e for v in spec.view for r in v.rows for e in v.runs_of(r)}
    out |= {e for t in spec.training_time for e in t.rows.values() if e}
    return out


def own_entries(results: Results, view: View, spec: ViewsFile) -> list[str]:
    """Entries evaluated under the view's protocol that no view names (a user's own models)."""
    if not view.own_runs or not view.protocol:
        return []
    named = named_entries(spec)
    return sorted({r.entry for r in results.runs_of(view.protocol) if r.protocol == view.protocol
                   and r.entry not in named})


def protocol_dataset(protocol: str) -> str:
    ds = protocol_info(protocol)["datasets"] if protocol else []
    return ds[0] if len(ds) == 1 else ""


@lru_cache(maxsize=4)
def _shipped_views(path: str) -> ViewsFile:
    return load_views(Path(path))


def published_protocols(spec: ViewsFile) -> dict[tuple[str, str, str, str], tuple[str, str]]:
    """(paper, table, row, column) -> (protocol, dataset) of the published number's setting: the protocol
    (and declared dataset) of the first shipped view that differences that cell (``protocols/reference/views/``, curated against the
    papers), else of the first such view in ``spec``. A copy of a table on a variant protocol (another CW
    masking, a user's views file) is then shown beside the published number, not differenced."""
    out: dict[tuple[str, str, str, str], tuple[str, str]] = {}
    for source in (_shipped_views(str(views_path())), spec):
        for v in source.view:
            if not v.compare:
                continue
            p, t = v.ref_paper_table
            for r in v.rows:
                for c in list(v.columns) or table_layout(p, t)[1]:
                    m = v.measure(c, r)
                    if m.kind != "none" and m.protocol:
                        out.setdefault((p, t, r, c), (m.protocol, v.dataset))
    return out


def run_setting(results: Results, cell: Cell | SeedCell | ValueCell | MeanCell | None, protocol: str) -> Setting:
    one = cell.cells[0] if isinstance(cell, SeedCell) else cell
    if one is None:
        return Setting(protocol_dataset(protocol), protocol)
    dataset = results.sample_set(one.run).get("dataset") or protocol_dataset(one.run.protocol)
    return Setting(str(dataset), one.run.protocol)


def build_table(results: Results, view: View, flags: list[Flag], spec: ViewsFile | None = None) -> TableResult:
    rows, cols = view_layout(view)
    own = own_entries(results, view, spec) if spec is not None else []
    ref_paper, ref_table = view.ref_paper_table
    pub_protocols = published_protocols(spec) if spec is not None else {}
    cells: dict[tuple[str, str], CellResult] = {}
    labels = {OWN_MARK + e: e for e in own}
    for r in rows + list(labels):
        entries = [labels[r]] if r in labels else view.runs_of(r)
        for c in cols:
            m = view.measure(c, r)
            if not entries or m.kind == "none":
                cell = None
            elif len(entries) > 1 and m.kind not in ("meta", "mean"):  # seeds: accuracies only
                cell = compute_seeds(results, entries, m)
            else:
                cell = compute(results, entries[0], m)
            ref = None if r in labels else published(ref_paper, ref_table, r, c)
            fl = []
            if cell is not None and m.kind == "robust":
                fl = [f for f in flags if f.entry in entries and f.protocol == m.protocol
                      and (f.eps is None or (m.eps is not None and abs(f.eps - m.eps) < 1e-9))]
            pub_proto, pub_ds = pub_protocols.get((ref_paper, ref_table, r, c), ("", ""))
            pub = Setting(pub_ds or protocol_dataset(pub_proto), pub_proto) if ref is not None else Setting("", "")
            cells[(r, c)] = CellResult(r, c, entries, m.protocol, cell, ref, m.kind != "none", fl,
                                       run_setting(results, cell, m.protocol), pub,
                                       ",".join(m.attacks) if m.kind == "mean" else m.key)
    return TableResult(view, rows + list(labels), cols, cells, list(labels))


def decimals(ref: RefValue | None, default: int = 1) -> int:
    if ref is None or "." not in ref.printed:
        return default
    return len(ref.printed.split(".", 1)[1])


def fmt_unit(unit: str) -> str:
    """A unit as cells print it: accuracy bare, ``M params`` as ``M``, others as written."""
    return {"%": "", "pp": "", "M params": "M", "k params": "k"}.get(unit, unit)


def fmt_ref(ref: RefValue | None, digits: int) -> str:
    if ref is None:
        return "–"
    return f"{ref.value:.{digits}f}{fmt_unit(ref.unit)}"


def cell_text(cr: CellResult, compare: bool, flag_ids: dict[Flag, int], uniform: tuple[Any, Any] | None) -> str:
    """``reproduced (published, Δ)`` + ``[lo, hi]`` (95% Wilson); a row of several runs: ``mean ± std``,
    the bootstrap interval, then each run's Wilson interval. 'not run' cells keep the published value."""
    d = decimals(cr.ref)
    pub = fmt_ref(cr.ref, d)
    if cr.status == "no entry":
        return f"· ({pub})" if cr.ref is not None else "·"
    if cr.status == "not measured":
        return f"n/m ({pub})" if cr.ref is not None else "n/m"
    if cr.cell is None:
        return f"not run ({pub})" if (compare and cr.ref is not None) else "not run"
    c = cr.cell
    if isinstance(c, MeanCell):  # a mean value in its own unit: the published number's decimals, its interval
        dm = max(d, 3)
        val = f"{c.value:.{dm}f}{fmt_unit(c.unit)}"
        delta = cr.delta
        if compare and delta is not None:
            val = f"{val} ({pub}, {delta:+.{dm}f})"
        elif compare and cr.ref is not None:
            val = f"{val} ({pub})"
        text = f"{val}<br>[{c.lo:.{dm}f}, {c.hi:.{dm}f}]"
        return text if uniform is not None else f"{text} n={c.n} seed={c.run.seed}"
    if isinstance(c, ValueCell):  # a recorded number: no samples, no interval
        val = f"{c.value:.{max(d, 2) if c.unit == 'x' else d}f}{fmt_unit(c.unit)}"
        delta = cr.delta
        if compare and delta is not None:
            return f"{val} ({pub}, {delta:+.{d}f})"
        return f"{val} ({pub})" if compare and cr.ref is not None else val
    multi = isinstance(c, SeedCell) and len(c.cells) > 1
    val = f"{100 * c.acc:.{d}f}" + (f" ± {100 * c.std:.{d}f}" if multi else "")
    delta = cr.delta
    if compare and delta is not None:
        text = f"{val} ({pub}, {delta:+.{d}f})"
    elif compare and cr.ref is not None:
        text = f"{val} ({pub})"
    else:
        text = val
    lo, hi = cr.interval()  # type: ignore[misc]
    text += f"<br>[{100 * lo:.{d}f}, {100 * hi:.{d}f}]"
    if isinstance(c, SeedCell):
        runs = "; ".join(f"[{100 * s.lo:.{d}f}, {100 * s.hi:.{d}f}]" for s in c.cells)
        text += f"<br>runs {len(c.cells)}/{len(c.cells) + c.missing}: {runs}"
    if uniform is None:
        one = cr.first
        text += f" n={one.n} seed={one.run.seed}"
    if cr.flags:
        text += " " + " ".join(f"⚠{flag_ids[f]}" for f in cr.flags)
    return text


def size_of(row: str) -> str | None:
    m = _SIZE.search(row)
    return m.group(1) if m else None


def method_of(row: str) -> str:
    return row.split("/", 1)[0].strip()
