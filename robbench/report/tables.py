"""Paper tables: every cell of a view computed from the store and set beside its published value."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from robbench.report.flags import Flag
from robbench.report.measures import Cell, compute
from robbench.report.reference import RefValue, published, table_layout
from robbench.report.results import Results
from robbench.report.views import View

_SIZE = re.compile(r"/(\d+)")


@dataclass
class CellResult:
    row: str
    column: str
    entry: str
    protocol: str
    cell: Cell | None
    ref: RefValue | None
    measurable: bool
    flags: list[Flag]

    @property
    def status(self) -> str:
        if not self.entry:
            return "no entry"
        if not self.measurable:
            return "not measured"
        return "done" if self.cell is not None else "not run"

    def record(self, paper: str, table: str) -> dict[str, Any]:
        c = self.cell
        pct = self.ref is not None and self.ref.unit == "%"
        delta = (100 * c.acc - self.ref.value) if (c is not None and self.ref is not None and pct) else None
        return {
            "paper": paper, "table": table, "row": self.row, "column": self.column, "entry": self.entry,
            "protocol": self.protocol, "status": self.status,
            "reproduced": None if c is None else round(100 * c.acc, 4),
            "ci_low": None if c is None else round(100 * c.lo, 4),
            "ci_high": None if c is None else round(100 * c.hi, 4),
            "n": None if c is None else c.n, "correct": None if c is None else c.k,
            "seed": None if c is None else c.run.seed, "run_id": None if c is None else c.run.run_id,
            "checkpoint_sha256": None if c is None else c.run.checkpoint_sha256,
            "published": None if self.ref is None else self.ref.value,
            "published_unit": None if self.ref is None else self.ref.unit,
            "delta": None if delta is None else round(delta, 4),
            "flags": "; ".join(f.code for f in self.flags),
        }


@dataclass
class TableResult:
    view: View
    rows: list[str]
    columns: list[str]
    cells: dict[tuple[str, str], CellResult]


def view_layout(view: View) -> tuple[list[str], list[str]]:
    """Rows: the view's (paper order), then published rows it does not map (shown as 'no entry');
    columns: the view's, else the published table's."""
    ref_rows, ref_cols = table_layout(*view.ref_paper_table)
    rows = list(view.rows)
    if view.compare:
        rows += [r for r in ref_rows if r not in view.rows]
    cols = list(view.columns) or ref_cols
    return rows, cols


def build_table(results: Results, view: View, flags: list[Flag]) -> TableResult:
    rows, cols = view_layout(view)
    ref_paper, ref_table = view.ref_paper_table
    cells: dict[tuple[str, str], CellResult] = {}
    for r in rows:
        entry = view.rows.get(r, "")
        for c in cols:
            m = view.measure(c)
            cell = compute(results, entry, m) if entry else None
            ref = published(ref_paper, ref_table, r, c)
            fl = []
            if cell is not None and m.kind == "robust":
                fl = [f for f in flags if f.entry == entry and f.protocol == m.protocol
                      and (f.eps is None or (m.eps is not None and abs(f.eps - m.eps) < 1e-9))]
            cells[(r, c)] = CellResult(r, c, entry, m.protocol, cell, ref, m.kind != "none", fl)
    return TableResult(view, rows, cols, cells)


def decimals(ref: RefValue | None, default: int = 1) -> int:
    if ref is None or "." not in ref.printed:
        return default
    return len(ref.printed.split(".", 1)[1])


def fmt_ref(ref: RefValue | None, digits: int) -> str:
    if ref is None:
        return "–"
    unit = {"%": "", "pp": ""}.get(ref.unit, ref.unit if ref.unit != "M params" else "M")
    return f"{ref.value:.{digits}f}{unit}"


def cell_text(cr: CellResult, compare: bool, flag_ids: dict[Flag, int], uniform: tuple[Any, Any] | None) -> str:
    """``reproduced (published, Δ)`` + ``[lo, hi]`` (95% Wilson); 'not run' cells keep the published value."""
    d = decimals(cr.ref)
    pub = fmt_ref(cr.ref, d)
    if cr.status == "no entry":
        return f"· ({pub})" if cr.ref is not None else "·"
    if cr.status == "not measured":
        return f"n/m ({pub})" if cr.ref is not None else "n/m"
    if cr.cell is None:
        return f"not run ({pub})" if (compare and cr.ref is not None) else "not run"
    c = cr.cell
    val = f"{100 * c.acc:.{d}f}"
    if compare and cr.ref is not None and cr.ref.unit in ("%", "pp"):
        delta = 100 * c.acc - cr.ref.value
        text = f"{val} ({pub}, {delta:+.{d}f})"
    elif compare and cr.ref is not None:
        text = f"{val} ({pub})"
    else:
        text = val
    text += f"<br>[{100 * c.lo:.{d}f}, {100 * c.hi:.{d}f}]"
    if uniform is None:
        text += f" n={c.n} seed={c.run.seed}"
    if cr.flags:
        text += " " + " ".join(f"⚠{flag_ids[f]}" for f in cr.flags)
    return text


def size_of(row: str) -> str | None:
    m = _SIZE.search(row)
    return m.group(1) if m else None


def method_of(row: str) -> str:
    return row.split("/", 1)[0].strip()
