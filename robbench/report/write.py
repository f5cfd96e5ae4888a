"""``write_report``: the results store -> one folder per paper (markdown + PNG) + index + leaderboard.

Deterministic: the same store and run folders give the same bytes (sorted orders, no timestamps but
the store's, PNGs without software/date metadata).
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pandas as pd

import robbench.report.figures as figures
import robbench.report.leaderboard as lb
import robbench.report.training as training
from robbench.errors import ConfigError
from robbench.outcomes import CLEAN_ATTACK, FINAL
from robbench.paths import results_db
from robbench.paths import runs_dir as default_runs
from robbench.report.flags import Flag, compute_flags, flags_frame
from robbench.report.reference import published, table_layout
from robbench.report.results import Results
from robbench.report.tables import (TableResult, build_table, cell_text, decimals, fmt_ref, method_of, size_of)
from robbench.report.views import Heatmap, Iterations, TrainingTime, View, ViewsFile, load_views
from robbench.store import transfer_matrix

FORMATS = ("md", "csv", "json")
_SLUG = re.compile(r"[^A-Za-z0-9._-]+")


def slug(s: str) -> str:
    return _SLUG.sub("_", s).strip("_") or "x"


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text if text.endswith("\n") else text + "\n", encoding="utf-8")


def _clean(v: Any) -> Any:
    """JSON-safe, stable values: NaN -> None, numpy scalars -> Python."""
    if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)):
        return None
    if hasattr(v, "item") and not isinstance(v, (list, dict, str)):
        try:
            return _clean(v.item())
        except (ValueError, AttributeError):
            return v
    return v


_INT_COLUMNS = ("n", "correct", "seed", "run_id", "steps", "source", "rank", "forward_passes", "params")


def _ints(df: pd.DataFrame) -> pd.DataFrame:
    """Count-like columns as nullable integers (a missing cell must not turn 40 into 40.0)."""
    for c in _INT_COLUMNS:
        if c in df.columns:
            df[c] = df[c].astype("Int64")
    return df


def _records(df: pd.DataFrame) -> list[dict[str, Any]]:
    return [{k: _clean(v) for k, v in r.items()} for r in df.to_dict(orient="records")]


def table_label(table: str) -> str:
    """'4' -> 'Table 4: ', 'preprint-3' -> 'Table 3 (preprint): ', a view's own id -> ''."""
    if table.isdigit():
        return f"Table {table}: "
    prefix, _, num = table.rpartition("-")
    return f"Table {num} ({prefix}): " if prefix and num.isdigit() else ""


# ----------------------------------------------------------------------------------------------
# Paper pages
# ----------------------------------------------------------------------------------------------

class PaperReport:
    def __init__(self, paper: str, spec: ViewsFile, results: Results, flags: list[Flag], folder: Path,
                 fmt: str) -> None:
        self.paper, self.spec, self.results, self.flags, self.folder, self.fmt = paper, spec, results, flags, folder, fmt
        self.info = spec.papers[paper]
        self.md: list[str] = []
        self.cells: list[dict[str, Any]] = []
        self.transfer: list[dict[str, Any]] = []
        self.iterations: list[dict[str, Any]] = []
        self.train_rows: list[dict[str, Any]] = []
        self.flag_ids: dict[Flag, int] = {}

    @property
    def draw(self) -> bool:
        return self.fmt == "md"

    def flag_id(self, f: Flag) -> int:
        if f not in self.flag_ids:
            self.flag_ids[f] = len(self.flag_ids) + 1
        return self.flag_ids[f]

    # -------------------------------------------------------------------------------- tables
    def table(self, view: View) -> None:
        t = build_table(self.results, view, self.flags)
        for key in t.rows:
            for c in t.columns:
                self.cells.append(t.cells[(key, c)].record(view.paper, view.table))
        ref_p, ref_t = view.ref_paper_table
        self.md += [f"## {table_label(view.table)}{view.title}", ""]
        if view.compare:
            self.md.append("Cell: reproduced (published, Δ) in %, then the 95% Wilson interval. "
                           "`not run`: no finished evaluation yet; `·`: no zoo entry for this row; "
                           "`n/m`: not measured by robbench.")
        else:
            self.md.append(f"Cell: reproduced accuracy in %, then the 95% Wilson interval. The published "
                           f"numbers ({ref_p} Table {ref_t}) come from another setting and are listed "
                           f"below for shape, not differenced.")
        if view.note:
            self.md += ["", view.note]
        self.md += [""] + self._table_md(t) + [""]
        flagged = sorted({f for cr in t.cells.values() for f in cr.flags}, key=self.flag_id)
        for f in flagged:
            self.md.append(f"- ⚠{self.flag_id(f)} `{f.entry}` ({f.protocol}): {f.message}")
        if flagged:
            self.md.append("")
        if not view.compare:
            self.md += self._published_md(view, t) + [""]
        if view.curves and self.draw:
            self._curves(view, t)

    def _table_md(self, t: TableResult) -> list[str]:
        header = ["", *t.columns, "n", "seed"]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for r in t.rows:
            crs = [t.cells[(r, c)] for c in t.columns]
            ns = {(cr.cell.n, cr.cell.run.seed) for cr in crs if cr.cell is not None}
            uniform = next(iter(ns)) if len(ns) == 1 else None
            texts = [cell_text(cr, t.view.compare, {f: self.flag_id(f) for f in cr.flags}, uniform) for cr in crs]
            n_txt, seed_txt = (str(uniform[0]), str(uniform[1])) if uniform else (("–", "–") if not ns else ("var.", "var."))
            lines.append("| " + " | ".join([r, *texts, n_txt, seed_txt]) + " |")
        entries = [(r, t.view.rows[r]) for r in t.rows if t.view.rows.get(r)]
        if entries:
            lines += ["", "Entries: " + ", ".join(f"{r} = `{e}`" for r, e in entries) + "."]
        return lines

    def _published_md(self, view: View, t: TableResult) -> list[str]:
        p, tb = view.ref_paper_table
        rows, cols = table_layout(p, tb)
        rows = [r for r in rows if r in view.rows] or rows  # the rows this view reproduces, for shape
        if not rows:
            return []
        out = [f"Published ({p} Table {tb}, the rows above):", "", "| | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 1)]
        for r in rows:
            vals = [published(p, tb, r, c) for c in cols]
            out.append("| " + r + " | " + " | ".join(fmt_ref(v, decimals(v)) for v in vals) + " |")
        return out

    def _curves(self, view: View, t: TableResult) -> None:
        eps_cols = [c for c in t.columns if view.measure(c).kind == "robust" and view.measure(c).eps is not None]
        if len(eps_cols) < 2:
            return
        sizes: dict[str, dict[str, tuple[list[float], list[float]]]] = {}
        for r in t.rows:
            size = size_of(r) or "all"
            xs, ys, pxs, pys = [], [], [], []
            for c in eps_cols:
                cr = t.cells[(r, c)]
                eps = view.measure(c).eps
                if cr.cell is not None:
                    xs.append(eps)
                    ys.append(100 * cr.cell.acc)
                if view.compare and cr.ref is not None and cr.ref.unit == "%":
                    pxs.append(eps)
                    pys.append(cr.ref.value)
            panel = sizes.setdefault(size, {})
            if xs:
                panel[method_of(r)] = (xs, ys)
            if pxs and xs:
                panel[method_of(r) + " (paper)"] = (pxs, pys)
        panels = [(f"{n} member{'' if n == '1' else 's'}" if n != "all" else view.title[:40], s) for n, s in sorted(
            sizes.items(), key=lambda kv: (kv[0] == "all", int(kv[0]) if kv[0].isdigit() else 0)) if s]
        if not panels:
            self.md += ["_Accuracy-vs-eps curves appear once entries of this table are evaluated._", ""]
            return
        name = f"curves_{slug(view.table)}.png"
        figures.line_panels(panels, "eps (L∞)", "accuracy (%)", self.folder / name)
        self.md += [f"![accuracy vs eps, {view.title}]({name})", "",
                    "Solid: reproduced; dashed: published." if view.compare else "", ""]

    # ----------------------------------------------------------------------------- heatmaps
    def heatmaps(self, spec: Heatmap) -> None:
        runs = [r for r in self.results.runs_of(spec.protocol) if not spec.entries or r.entry in spec.entries]
        order = {e: i for i, e in enumerate(spec.entries)}
        runs.sort(key=lambda r: (order.get(r.entry, len(order)), r.entry))
        self.md += [f"## {spec.title}", "",
                    f"Protocol `{spec.protocol}`, eps {spec.eps:g}: attack success rate of adversarial examples "
                    f"crafted on member i (rows) against member j and the whole ensemble (columns), on samples "
                    f"every member classifies correctly.", ""]
        if not runs:
            self.md += ["_Not run yet._", ""]
            return
        for run in runs:
            df = self.results.outcomes(run)
            try:
                m = transfer_matrix(df, spec.attack, eps=spec.eps, value="success")
            except ValueError as e:
                self.md += [f"- `{run.entry}`: no transferability rows ({e}).", ""]
                continue
            n = int(df[(df["attack"] != CLEAN_ATTACK)]["sample"].nunique())
            for i in m.index:
                for j in m.columns:
                    v = m.loc[i, j]
                    self.transfer.append({"paper": self.paper, "entry": run.entry, "protocol": run.protocol,
                                          "eps": spec.eps, "source": int(i), "target": str(j),
                                          "success": None if pd.isna(v) else round(float(v), 6), "n": n,
                                          "seed": run.seed, "run_id": run.run_id})
            if self.draw:
                name = f"transfer_{slug(run.entry)}_{spec.eps:g}.png"
                figures.heatmap(m, f"{run.entry} (eps {spec.eps:g}, n={n})", self.folder / name)
                self.md += [f"![transferability {run.entry}]({name})", ""]
            else:
                self.md += [f"- `{run.entry}`: n={n}", ""]

    # --------------------------------------------------------------------------- iterations
    def iteration_curves(self, spec: Iterations) -> None:
        runs = self.results.runs_of(spec.protocol)
        self.md += [f"## {spec.title}", "", f"Protocol `{spec.protocol}`: accuracy (all-or-nothing over the "
                    f"attacks of each series) against the number of attack iterations.", ""]
        if not runs:
            self.md += ["_Not run yet._", ""]
            return
        panels = []
        for run in runs:
            df = self.results.outcomes(run)
            series: dict[str, tuple[list[float], list[float]]] = {}
            for label, steps_list in self._iteration_series(df):
                pts = []
                for steps in steps_list:
                    rows = df[(df["attack"] == label) & (df["steps"] == steps)]
                    for e in sorted(set(rows["eps"].astype(float))):
                        if spec.eps is not None and abs(e - spec.eps) > 1e-9:
                            continue
                        kn = self.results.aon_counts(run, [label], e, steps=steps)
                        if kn and kn[1]:
                            pts.append((e, steps, kn))
                for e in sorted({p[0] for p in pts}):
                    mine = [(s, kn) for (ee, s, kn) in pts if ee == e]
                    key = f"{label} (eps {e:g})"
                    series[key] = ([s for s, _ in mine], [100 * kn[0] / kn[1] for _, kn in mine])
                    for s, kn in mine:
                        self.iterations.append({"paper": self.paper, "entry": run.entry, "protocol": run.protocol,
                                                "series": label, "eps": e, "steps": s,
                                                "accuracy": round(100 * kn[0] / kn[1], 4), "n": kn[1],
                                                "seed": run.seed, "run_id": run.run_id})
            if series:
                panels.append((run.entry, series))
        if panels and self.draw:
            name = f"iterations_{slug(spec.protocol)}.png"
            figures.line_panels(panels, "attack iterations", "accuracy (%)", self.folder / name, xlog=True)
            self.md += [f"![accuracy vs iterations]({name})", ""]
        rows = [r for r in self.iterations if r["protocol"] == spec.protocol]
        if rows:
            steps = sorted({r["steps"] for r in rows})
            self.md += ["| entry | series | " + " | ".join(str(s) for s in steps) + " | n | seed |",
                        "|" + "---|" * (len(steps) + 4)]
            keys = sorted({(r["entry"], r["series"], r["eps"]) for r in rows})
            for e, s, eps in keys:
                vals = {r["steps"]: r for r in rows if (r["entry"], r["series"], r["eps"]) == (e, s, eps)}
                any_r = next(iter(vals.values()))
                self.md.append(f"| `{e}` | {s} (eps {eps:g}) | " + " | ".join(
                    f"{vals[k]['accuracy']:.1f}" if k in vals else "–" for k in steps) +
                    f" | {any_r['n']} | {any_r['seed']} |")
            self.md.append("")

    @staticmethod
    def _iteration_series(df: pd.DataFrame) -> list[tuple[str, list[int]]]:
        """(attack id, its recorded step counts) for every attack with record_steps rows."""
        rec = df[(df["attack"] != CLEAN_ATTACK) & (df["steps"] != FINAL)]
        return [(a, sorted(int(k) for k in g["steps"].unique())) for a, g in rec.groupby("attack", sort=True)]

    # ----------------------------------------------------------------------------- training
    def training_time(self, spec: TrainingTime) -> None:
        ref_p, ref_t = spec.reference.split(":", 1)
        base_entry = spec.rows.get(spec.baseline, "")
        base_sec = training.seconds_per_epoch(self.results.log(base_entry)) if base_entry else None
        base_pub = published(ref_p, ref_t, spec.baseline, spec.column)
        self.md += [f"## {spec.title}", "",
                    f"Mean seconds per epoch from each run's log, relative to `{spec.baseline}`; published: "
                    f"{ref_p} Table {ref_t} (hours for 200 epochs on one GPU) as ratios.", "",
                    "| method | entry | s/epoch | ratio (published, Δ) |", "|---|---|---|---|"]
        for label, entry in spec.rows.items():
            sec = training.seconds_per_epoch(self.results.log(entry))
            pub = published(ref_p, ref_t, label, spec.column)
            pub_ratio = pub.value / base_pub.value if (pub and base_pub) else None
            ratio = sec / base_sec if (sec is not None and base_sec) else None
            self.train_rows.append({"paper": self.paper, "row": label, "entry": entry,
                                    "seconds_per_epoch": None if sec is None else round(sec, 4),
                                    "ratio": None if ratio is None else round(ratio, 4),
                                    "published_ratio": None if pub_ratio is None else round(pub_ratio, 4)})
            sec_t = "not run" if sec is None else f"{sec:.2f}"
            pr = "–" if pub_ratio is None else f"{pub_ratio:.1f}×"
            rt = (f"not run ({pr})" if ratio is None else
                  f"{ratio:.1f}× ({pr}, {ratio - pub_ratio:+.1f})" if pub_ratio is not None else f"{ratio:.1f}×")
            self.md.append(f"| {label} | `{entry}` | {sec_t} | {rt} |")
        self.md += ["", "Ratios are measured on the machine that trained the entries; the published ones on one "
                    "TITAN XP GPU for 200 epochs of ResNet-20 x3.", ""]

    def training_curves(self, entries: list[str]) -> None:
        logs = {e: training.numeric_series(self.results.log(e)) for e in entries}
        logs = {e: s for e, s in logs.items() if s}
        self.md += ["## Training curves", ""]
        if not logs:
            self.md += ["_No run logs found (train entries with `robbench train`)._", ""]
            return
        acc: dict[str, tuple[list[float], list[float]]] = {}
        loss: dict[str, tuple[list[float], list[float]]] = {}
        for e, s in sorted(logs.items()):
            for k in training.accuracy_keys(s)[:1]:
                acc[e] = (s[k][0], [100 * v if v <= 1.0 else v for v in s[k][1]])
            lk = training.loss_keys(s)
            if lk:
                loss[e] = s[lk[0]]
        if self.draw:
            name = "training_curves.png"
            figures.line_panels([("clean test accuracy", acc)], "epoch", "accuracy (%)", self.folder / name)
            name2 = "training_loss.png"
            figures.line_panels([("training loss (first logged term)", loss)], "epoch", "loss",
                                self.folder / name2, ylim=None)
            self.md += [f"![training accuracy]({name})", "", f"![training loss]({name2})", ""]
        self.md += ["| entry | epochs | final clean acc % | s/epoch |", "|---|---|---|---|"]
        for e, s in sorted(logs.items()):
            a = acc.get(e)
            spe = training.seconds_per_epoch(self.results.log(e))
            self.md.append(f"| `{e}` | {len(a[0]) if a else '–'} | {a[1][-1]:.1f} | "
                           f"{'–' if spe is None else f'{spe:.2f}'} |" if a else
                           f"| `{e}` | – | – | {'–' if spe is None else f'{spe:.2f}'} |")
        self.md.append("")

    # ------------------------------------------------------------------------------- output
    def build(self) -> dict[str, Any]:
        self.md += [f"# {self.info.title}", ""]
        if self.info.intro:
            self.md += [self.info.intro, ""]
        views = [v for v in self.spec.view if v.paper == self.paper]
        for v in views:
            self.table(v)
        for h in self.spec.heatmap:
            if h.paper == self.paper:
                self.heatmaps(h)
        for it in self.spec.iterations:
            if it.paper == self.paper:
                self.iteration_curves(it)
        for tt in self.spec.training_time:
            if tt.paper == self.paper:
                self.training_time(tt)
        entries = list(self.info.training_curves) or sorted(
            {e for v in views for e in v.rows.values() if e} |
            {e for tt in self.spec.training_time if tt.paper == self.paper for e in tt.rows.values()})
        self.training_curves(entries)
        cells = pd.DataFrame(self.cells)
        done = int((cells["status"] == "done").sum()) if not cells.empty else 0
        measurable = int(cells["status"].isin(["done", "not run"]).sum()) if not cells.empty else 0
        return {"paper": self.paper, "title": self.info.title, "cells_done": done, "cells_measurable": measurable,
                "flags": len(self.flag_ids)}

    def write(self) -> None:
        f = self.folder
        if self.fmt == "md":
            _write(f / "README.md", "\n".join(self.md))
        frames = {"cells": _ints(pd.DataFrame(self.cells)), "transferability": _ints(pd.DataFrame(self.transfer)),
                  "iterations": _ints(pd.DataFrame(self.iterations)), "training_time": pd.DataFrame(self.train_rows)}
        if self.fmt == "csv":
            for name, df in frames.items():
                if not df.empty:
                    _write(f / f"{name}.csv", df.to_csv(index=False, lineterminator="\n"))
        elif self.fmt == "json":
            _write(f / "report.json", json.dumps({k: _records(v) for k, v in frames.items()}, indent=1,
                                                 sort_keys=True, ensure_ascii=False))


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------

def write_report(paper: str = "all", out: str | Path = "reports", db: str | Path | None = None,
                 runs_dir: str | Path | None = None, fmt: str = "md", views: Path | None = None) -> Path:
    """Write the report for ``paper`` (a paper id of the views file, or ``all``) into ``out``:
    ``<paper>/README.md`` (+ PNGs), ``index.md``, ``leaderboard.md`` and ``leaderboard.html``
    (``fmt='csv'|'json'``: the same numbers as files for machines). Returns the index path."""
    if fmt not in FORMATS:
        raise ConfigError(f"unknown format {fmt!r}; allowed: {', '.join(FORMATS)}", field="--format")
    spec = load_views(views)
    papers = sorted(spec.papers) if paper == "all" else [paper]
    for p in papers:
        if p not in spec.papers:
            raise ConfigError(f"unknown paper {p!r}; allowed: all, {', '.join(sorted(spec.papers))}", field="--paper")
    out = Path(out)
    results = Results(db or results_db(), runs_dir or default_runs())
    flags = compute_flags(results)
    summaries = []
    for p in papers:
        folder = out / p
        if folder.exists() and fmt == "md":
            for old in folder.glob("*.png"):  # figures of entries no longer in the store must not linger
                old.unlink()
        pr = PaperReport(p, spec, results, flags, folder, fmt)
        summaries.append(pr.build())
        pr.write()
    protos = None if paper == "all" else _paper_protocols(spec, paper)
    board = lb.leaderboard(results, spec.headline_eps, spec.leaderboard_exclude, flags, protos)
    fl = flags_frame([f for f in flags if protos is None or f.protocol in protos])
    if fmt == "md":
        _write(out / "leaderboard.md", lb.to_markdown(board))
        _write(out / "leaderboard.html", lb.to_html(board))
        _write(out / "flags.md", _flags_md(fl))
        index = out / "index.md"
        _write(index, _index_md(summaries, board, fl, results))
        return index
    if fmt == "csv":
        _write(out / "leaderboard.csv", _ints(board).to_csv(index=False, lineterminator="\n"))
        _write(out / "flags.csv", fl.to_csv(index=False, lineterminator="\n"))
        _write(out / "index.csv", pd.DataFrame(summaries).to_csv(index=False, lineterminator="\n"))
        return out / "index.csv"
    _write(out / "index.json", json.dumps({"papers": summaries, "leaderboard": _records(board),
                                           "flags": _records(fl)}, indent=1, sort_keys=True, ensure_ascii=False))
    return out / "index.json"


def _paper_protocols(spec: ViewsFile, paper: str) -> set[str]:
    """Protocols a paper's report reads (its leaderboard is restricted to them)."""
    out = set()
    for v in spec.view:
        if v.paper == paper:
            out |= {v.measure(c).protocol for c in list(v.columns) + list(v.measures)} | {v.protocol}
    out |= {h.protocol for h in spec.heatmap if h.paper == paper}
    out |= {i.protocol for i in spec.iterations if i.paper == paper}
    return {p for p in out if p}


def _flags_md(fl: pd.DataFrame) -> str:
    out = ["# Sanity flags", "",
           "Numbers that look like gradient masking or a broken run (see `robbench/report/flags.py` for the rules).", ""]
    if fl.empty:
        return "\n".join(out + ["No flags.", ""])
    out += ["| entry | protocol | eps | flag | detail |", "|---|---|---|---|---|"]
    for r in fl.itertuples(index=False):
        eps = "" if r.eps is None or pd.isna(r.eps) else f"{r.eps:g}"
        out.append(f"| `{r.entry}` | {r.protocol} | {eps} | {r.code} | {r.message} |")
    return "\n".join(out + [""])


def _index_md(summaries: list[dict[str, Any]], board: pd.DataFrame, fl: pd.DataFrame, results: Results) -> str:
    runs = results.runs
    last = max((r.finished for r in runs.values()), default="")
    out = ["# robbench report", "",
           f"{len(runs)} finished evaluation runs in the results store"
           + (f", the latest finished {last[:19].replace('T', ' ')} UTC." if last else "."), "",
           "| paper | cells reproduced | flags |", "|---|---|---|"]
    for s in summaries:
        out.append(f"| [{s['title']}]({s['paper']}/README.md) | {s['cells_done']} / {s['cells_measurable']} | {s['flags']} |")
    out += ["", f"- [Leaderboard](leaderboard.md) ([HTML](leaderboard.html)): {len(board)} ranked runs.",
            f"- [Sanity flags](flags.md): {len(fl)}.", ""]
    return "\n".join(out)
