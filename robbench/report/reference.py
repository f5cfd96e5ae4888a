"""Published numbers: ``protocols/reference/<paper>.csv`` (one file per paper).

Columns: ``paper, table, row, column, value, unit, relative_to, notes``. ``value`` is the number as
printed (``%`` accuracy, ``x`` speed-up, ``h`` hours, ``M params``); ``unit = pp`` marks a value printed
as a difference to the row named in ``relative_to`` (Xie & Yuille's tables), which :func:`published`
resolves to an absolute number. Row and column labels are the paper's.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from robbench.errors import ConfigError
from robbench.paths import PROTOCOLS_DIR

COLUMNS = ("paper", "table", "row", "column", "value", "unit", "relative_to", "notes")


def reference_dir() -> Path:
    return PROTOCOLS_DIR / "reference"


@dataclass(frozen=True)
class RefValue:
    value: float          # absolute value (differences already resolved)
    unit: str             # unit of the absolute value
    printed: str          # as printed in the paper
    notes: str


@lru_cache(maxsize=None)
def _load(directory: str) -> dict[tuple[str, str, str, str], dict[str, str]]:
    rows: dict[tuple[str, str, str, str], dict[str, str]] = {}
    for path in sorted(Path(directory).glob("*.csv")):
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise ConfigError(f"missing columns {', '.join(missing)}; required: {', '.join(COLUMNS)}",
                                  file=str(path), field="header")
            for i, r in enumerate(reader, start=2):
                key = (r["paper"], r["table"], r["row"], r["column"])
                if key in rows:
                    raise ConfigError(f"duplicate cell {key}", file=str(path), field=f"line {i}")
                try:
                    float(r["value"])
                except ValueError:
                    raise ConfigError(f"value {r['value']!r} is not a number", file=str(path),
                                      field=f"line {i}") from None
                rows[key] = dict(r, _file=str(path), _line=str(i))
    return rows


def load_reference(directory: Path | None = None) -> dict[tuple[str, str, str, str], dict[str, str]]:
    """All published cells keyed by (paper, table, row, column), as the raw CSV rows."""
    return _load(str(directory or reference_dir()))


def published(paper: str, table: str, row: str, column: str, directory: Path | None = None) -> RefValue | None:
    """The published value of one cell (``None`` if the paper has no such cell)."""
    rows = load_reference(directory)
    r = rows.get((paper, table, row, column))
    if r is None:
        return None
    value = float(r["value"])
    unit = r["unit"]
    if r["relative_to"]:
        base = published(paper, table, r["relative_to"], column, directory)
        if base is None:
            raise ConfigError(f"relative_to names a row without this column: {r['relative_to']!r}",
                              file=r["_file"], field=f"line {r['_line']}")
        value, unit = round(base.value + value, 6), base.unit
    return RefValue(value=value, unit=unit, printed=r["value"], notes=r["notes"])


def tables(paper: str, directory: Path | None = None) -> list[str]:
    """The table ids a paper's CSV holds, in file order."""
    seen: dict[str, None] = {}
    for (p, t, _, _) in load_reference(directory):
        if p == paper:
            seen.setdefault(t, None)
    return list(seen)


def table_layout(paper: str, table: str, directory: Path | None = None) -> tuple[list[str], list[str]]:
    """Rows and columns of one published table, in the paper's order."""
    rows: dict[str, None] = {}
    cols: dict[str, None] = {}
    for (p, t, r, c) in load_reference(directory):
        if p == paper and t == table:
            rows.setdefault(r, None)
            cols.setdefault(c, None)
    return list(rows), list(cols)
