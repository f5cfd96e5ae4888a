"""``write_report``: the results store -> one folder per paper (markdown + figures as PDF, SVG and PNG)
+ index + flags + leaderboard (markdown, HTML, run details).

Units: every accuracy is in % (tables, curves, CSV/JSON, leaderboard); a transferability cell is an
attack success rate in % (heatmaps, CSV/JSON). Deterministic: the same store and run folders give the
same bytes (sorted orders, no timestamps but the store's, figures without software/date metadata).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

import robbench.report.figures as figures
import robbench.report.leaderboard as lb
import robbench.report.training as training
from robbench.errors import ConfigError
from robbench.outcomes import CLEAN_ATTACK, FINAL
from robbench.paths import check_writable_dir, ensure_dir, results_db
from robbench.paths import runs_dir as default_runs
from robbench.report.flags import Flag, compute_flags, flags_frame
from robbench.report.measures import wilson
from robbench.report.reference import published, table_layout
from robbench.report.results import Results
from robbench.report.tables import (MEASURE, OWN_MARK, UNIT, TableResult, build_table, cell_text, decimals, fmt_ref,
                                    method_of, protocol_dataset, published_protocols, size_of, view_layout)
from robbench.report.pages import resolve_pages
from robbench.report.views import Heatmap, Iterations, TrainingTime, View, ViewsFile
from robbench.store import transfer_matrix

FORMATS = ("md", "csv", "json")
_SLUG = re.compile(r"[^A-Za-z0-9._-]+")
_EPS = re.compile(r"^\d*\.?\d+$")


def _is_eps(column: str) -> bool:
    return bool(_EPS.match(column))


def slug(s: str) -> str:
    return _SLUG.sub("_", s).strip("_") or "x"


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text if text.endswith("\n") else text + "\n", encoding="utf-8")
    return path


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
                 fmt: str, written: list[Path] | None = None) -> None:
        self.paper, self.spec, self.results, self.flags, self.folder, self.fmt = paper, spec, results, flags, folder, fmt
        self.info = spec.papers[paper]
        self.md: list[str] = []
        self.cells: list[dict[str, Any]] = []
        self.transfer: list[dict[str, Any]] = []
        self.iterations: list[dict[str, Any]] = []
        self.train_rows: list[dict[str, Any]] = []
        self.flag_ids: dict[Flag, int] = {}
        self.written = written if written is not None else []

    @property
    def draw(self) -> bool:
        return self.fmt == "md"

    def flag_id(self, f: Flag) -> int:
        if f not in self.flag_ids:
            self.flag_ids[f] = len(self.flag_ids) + 1
        return self.flag_ids[f]

    def figure(self, paths: list[Path], alt: str) -> None:
        """Embed the PNG; link the vector versions."""
        self.written.extend(paths)
        by = {p.suffix: p.name for p in paths}
        self.md += [f"![{alt}]({by['.png']})", "", f"Vector: [PDF]({by['.pdf']}) · [SVG]({by['.svg']}).", ""]

    # -------------------------------------------------------------------------------- tables
    def table(self, view: View) -> None:
        t = build_table(self.results, view, self.flags, self.spec)
        for key in t.rows:
            for c in t.columns:
                self.cells.append(t.cells[(key, c)].record(view.paper, view.table))
        ref_p, ref_t = view.ref_paper_table
        has_ref = bool(table_layout(ref_p, ref_t)[0])
        self.md += [f"## {table_label(view.table)}{view.title}", ""]
        if t.columns and all(view.measure(c).kind == "mean" for c in t.columns):
            mean = "Cell: reproduced mean over the samples, then the 95% normal interval of the mean"
            if has_ref and view.compare:
                mean += (" (published, Δ where the published number comes from the same dataset and protocol). "
                         "`not run`: no finished evaluation yet.")
            elif has_ref:
                mean += (f". The published numbers ({ref_p} Table {ref_t}) come from another setting and are "
                         f"listed below for shape, not differenced.")
            else:
                mean += "."
            self.md.append(mean)
        elif not has_ref:
            self.md.append("Cell: accuracy in %, then the 95% Wilson interval (no published numbers for this table).")
        elif view.compare:
            self.md.append("Cell: reproduced accuracy in % (published, Δ where the published number comes from the same "
                           "dataset and protocol), then the 95% Wilson interval. `not run`: no finished evaluation yet; "
                           "`·`: no zoo entry for this row; `n/m`: not measured by robbench.")
        else:
            self.md.append(f"Cell: reproduced accuracy in %, then the 95% Wilson interval. The published "
                           f"numbers ({ref_p} Table {ref_t}) come from another setting and are listed "
                           f"below for shape, not differenced.")
        if view.seeds:
            self.md += ["", "A row with several independent runs shows their mean ± standard deviation (over the "
                        "runs evaluated so far), its 95% bootstrap interval (runs, then samples within each run, "
                        "resampled), then each run's own 95% Wilson interval; the published number is the paper's "
                        "mean over its runs."]
        if t.own:
            self.md += ["", f"Rows marked `{OWN_MARK.strip()}` are entries evaluated with `{view.protocol}` that no "
                        f"paper row names (your own models)."]
        if view.note:
            self.md += ["", view.note]
        self.md += [""] + self._table_md(t) + [""]
        flagged = sorted({f for cr in t.cells.values() for f in cr.flags}, key=self.flag_id)
        for f in flagged:
            self.md.append(f"- ⚠{self.flag_id(f)} `{f.entry}` ({f.protocol}): {f.message}")
        if flagged:
            self.md.append("")
        if not view.compare and has_ref:
            self.md += self._published_md(view, t) + [""]
        if view.curves and self.draw:
            self._curves(view, t)

    def _table_md(self, t: TableResult) -> list[str]:
        header = ["", *t.columns, "n", "seed"]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for r in t.rows:
            crs = [t.cells[(r, c)] for c in t.columns]
            ns = {(cr.counted.n, cr.counted.run.seed) for cr in crs if cr.counted is not None}
            uniform = next(iter(ns)) if len(ns) == 1 else None
            texts = [cell_text(cr, t.view.compare, {f: self.flag_id(f) for f in cr.flags}, uniform) for cr in crs]
            n_txt, seed_txt = (str(uniform[0]), str(uniform[1])) if uniform else (("–", "–") if not ns else ("var.", "var."))
            lines.append("| " + " | ".join([r, *texts, n_txt, seed_txt]) + " |")
        entries = [(r, t.view.runs_of(r)) for r in t.rows if t.view.rows.get(r)]
        if entries:
            lines += ["", "Entries: " + ", ".join(f"{r} = " + " + ".join(f"`{e}`" for e in es) for r, es in entries) + "."]
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

    @staticmethod
    def _x_of(view: View, column: str) -> float | None:
        """Where a column sits on the eps axis: clean accuracy at eps 0, a robust column at its eps."""
        m = view.measure(column)
        if m.kind == "clean":
            return 0.0
        return m.eps if m.kind == "robust" and m.eps is not None and m.steps is None else None

    def _curves(self, view: View, t: TableResult) -> None:
        cols = [c for c in t.columns if self._x_of(view, c) is not None]
        if sum(1 for c in cols if view.measure(c).kind == "robust") < 2:
            return
        sizes: dict[str, list[figures.Series]] = {}
        shape: dict[str, list[figures.Series]] = {}  # published numbers of another setting, own panels
        for r in t.rows:
            size = "+own" if r in t.own else (size_of(r) or "all")
            name = method_of(r) if r not in t.own else r.removeprefix(OWN_MARK)
            pts = []
            for c in cols:
                cr = t.cells[(r, c)]
                if cr.cell is not None:
                    lo, hi = cr.interval()  # type: ignore[misc]
                    pts.append((self._x_of(view, c), 100 * cr.cell.acc, 100 * lo, 100 * hi))
            if not pts:
                continue
            panel = sizes.setdefault(size, [])
            panel.append(figures.Series(name, [p[0] for p in pts], [p[1] for p in pts], [p[2] for p in pts],
                                        [p[3] for p in pts]))
            pub = [(self._x_of(view, c), t.cells[(r, c)].ref.value) for c in cols
                   if t.cells[(r, c)].ref is not None and t.cells[(r, c)].ref.unit == "%"]
            same = any(t.cells[(r, c)].comparable for c in cols)
            if pub and same:
                panel.append(figures.Series(name, [p[0] for p in pub], [p[1] for p in pub], published=True))
            elif r not in t.own:
                ref_p, ref_t = view.ref_paper_table
                ref_cols = table_layout(ref_p, ref_t)[1]
                other = [(0.0 if c == "clean" else float(c), published(ref_p, ref_t, r, c)) for c in ref_cols
                         if c == "clean" or _is_eps(c)]
                other = [(x, v.value) for x, v in other if v is not None and v.unit == "%"]
                if other:
                    shape.setdefault(size, []).append(figures.Series(name, [p[0] for p in other],
                                                                     [p[1] for p in other], published=True))
        own = sizes.pop("+own", [])
        if own:  # the user's runs join every panel of the paper's rows (compared against each size)
            for n in list(sizes) or ["all"]:
                sizes.setdefault(n, []).extend(own)
        order = sorted(sizes, key=lambda n: (n == "all", int(n) if n.isdigit() else 0))
        panels = [(self._panel_title(view, n), sizes[n]) for n in order if sizes[n]]
        ncols = max(1, len(panels))  # published panels of another setting go on a second row
        ref_p, ref_t = view.ref_paper_table
        setting = self._published_dataset(view)
        panels += [(f"published, {ref_p} Table {ref_t}" + (f" ({setting})" if setting else "")
                    + ("" if n == "all" else f", {n} members"), shape[n]) for n in order if shape.get(n)]
        if not panels:
            self.md += ["_Accuracy-vs-eps curves appear once entries of this table are evaluated._", ""]
            return
        paths = figures.line_panels(panels, figures.EPS_LABEL, figures.ACCURACY_LABEL,
                                    self.folder / f"curves_{slug(view.table)}", ncols=ncols if shape and ncols > 1 else None)
        self.figure(paths, f"accuracy vs eps, {view.title}")
        words = ["Accuracy (%) against ε; the point at ε = 0 is clean accuracy; bands: 95% intervals from the "
                 "stored per-sample outcomes (Wilson; bootstrap over runs and samples for rows with several runs)."]
        if any(s.published for n in order for s in sizes[n]):
            words.append("Dashed: published, in the colour of the reproduced method.")
        if shape:
            words.append("The published curves of another setting are drawn in their own panels (their ε axis), "
                         "dashed, in the colour of the reproduced method.")
        self.md += [" ".join(words), ""]

    @staticmethod
    def _panel_title(view: View, n: str) -> str:
        if n == "all":
            return view.title if len(view.title) <= 48 else view.title[:47] + "…"
        return f"{n} member{'' if n == '1' else 's'}"

    def _published_dataset(self, view: View) -> str:
        ref_p, ref_t = view.ref_paper_table
        for (p, t, _r, _c), (proto, dataset) in sorted(published_protocols(self.spec).items()):
            if (p, t) == (ref_p, ref_t) and (dataset or protocol_dataset(proto)):
                return dataset or protocol_dataset(proto)
        return ""

    # ----------------------------------------------------------------------------- heatmaps
    def heatmaps(self, spec: Heatmap) -> None:
        runs = [r for r in self.results.runs_of(spec.protocol) if not spec.entries or r.entry in spec.entries]
        order = {e: i for i, e in enumerate(spec.entries)}
        runs.sort(key=lambda r: (order.get(r.entry, len(order)), r.entry))
        self.md += [f"## {spec.title}", "",
                    f"Protocol `{spec.protocol}`, eps {spec.eps:g}: attack success rate (%) of adversarial examples "
                    f"crafted on member i (rows) against member j and the whole ensemble (columns), on samples "
                    f"every member classifies correctly (100 - accuracy on them).", ""]
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
                                          "measure": "attack success rate", "unit": "%",
                                          "attack_success_rate": None if pd.isna(v) else round(100 * float(v), 4),
                                          "n": n, "seed": run.seed, "run_id": run.run_id})
            if self.draw:
                stem = self.folder / f"transfer_{slug(run.entry)}_{spec.eps:g}"
                paths = figures.heatmap(m, f"{run.entry}, ε = {spec.eps:g}, n = {n}", stem)
                self.figure(paths, f"transferability {run.entry}")
            else:
                self.md += [f"- `{run.entry}`: n={n}", ""]

    # --------------------------------------------------------------------------- iterations
    def _published_iterations(self, spec: Iterations, entry: str, series: list[figures.Series]) -> list[figures.Series]:
        """Dashed published curves for ``entry`` from ``spec.published_view``: each column whose measure
        names a step count is a point at that count, on the reproduced series of the measure's attack."""
        if not spec.published_view:
            return []
        view = next((v for v in self.spec.view if v.paper == spec.paper and v.table == spec.published_view), None)
        if view is None or view.protocol != spec.protocol:
            return []
        label = next((r for r, e in view.rows.items() if e == entry), None)
        if label is None:
            return []
        ref_p, ref_t = view.ref_paper_table
        points: dict[str, list[tuple[int, float]]] = {}
        for column in view_layout(view)[1]:
            m = view.measure(column)
            ref = published(ref_p, ref_t, label, column)
            if m.kind != "robust" or m.steps is None or len(m.attacks) != 1 or ref is None or ref.unit != "%":
                continue
            points.setdefault(m.attacks[0], []).append((m.steps, ref.value))
        out = []
        for attack, pts in points.items():
            same = [s for s in series if s.name.startswith(f"{attack} (") and not s.published]
            if same and len(pts) > 1:
                pts.sort()
                out.append(figures.Series(same[0].name, [x for x, _ in pts], [y for _, y in pts], published=True))
        return out

    def iteration_curves(self, spec: Iterations) -> None:
        runs = self.results.runs_of(spec.protocol)
        self.md += [f"## {spec.title}", "", f"Protocol `{spec.protocol}`: accuracy (%, all-or-nothing over the "
                    f"attacks of each series) against the number of attack iterations; bands: 95% Wilson.", ""]
        if not runs:
            self.md += ["_Not run yet._", ""]
            return
        panels = []
        for run in runs:
            df = self.results.outcomes(run)
            series: list[figures.Series] = []
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
                    iv = [wilson(*kn) for _, kn in mine]
                    series.append(figures.Series(f"{label} (ε {e:g})", [s for s, _ in mine],
                                                 [100 * kn[0] / kn[1] for _, kn in mine],
                                                 [100 * lo for lo, _ in iv], [100 * hi for _, hi in iv]))
                    for s, kn in mine:
                        self.iterations.append({"paper": self.paper, "entry": run.entry, "protocol": run.protocol,
                                                "series": label, "eps": e, "steps": s, "measure": MEASURE,
                                                "unit": UNIT, "accuracy": round(100 * kn[0] / kn[1], 4), "n": kn[1],
                                                "seed": run.seed, "run_id": run.run_id})
            series += self._published_iterations(spec, run.entry, series)
            if series:
                panels.append((run.entry, series))
        if panels and self.draw:
            paths = figures.line_panels(panels, "attack iterations", figures.ACCURACY_LABEL,
                                        self.folder / f"iterations_{slug(spec.protocol)}", xlog=True, ncols=4)
            self.figure(paths, "accuracy vs iterations")
        rows = [r for r in self.iterations if r["protocol"] == spec.protocol]
        if rows:
            steps = sorted({r["steps"] for r in rows})
            self.md += ["| entry | series (accuracy %) | " + " | ".join(str(s) for s in steps) + " | n | seed |",
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
        acc: list[figures.Series] = []
        loss: list[figures.Series] = []
        final: dict[str, tuple[int, float]] = {}
        for e, s in sorted(logs.items()):
            for k in training.accuracy_keys(s)[:1]:
                ys = [100 * v if v <= 1.0 else v for v in s[k][1]]
                acc.append(figures.Series(e, list(s[k][0]), ys))
                final[e] = (len(ys), ys[-1])
            lk = training.loss_keys(s)
            if lk:
                loss.append(figures.Series(e, list(s[lk[0]][0]), list(s[lk[0]][1])))
        if self.draw:
            self.figure(figures.line_panels([("clean test accuracy", acc)], "epoch", figures.ACCURACY_LABEL,
                                            self.folder / "training_curves"), "training accuracy")
            self.figure(figures.line_panels([("training loss (first logged term)", loss)], "epoch", "loss",
                                            self.folder / "training_loss", ylim=None), "training loss")
        self.md += ["| entry | epochs | final clean accuracy % | s/epoch |", "|---|---|---|---|"]
        for e, s in sorted(logs.items()):
            spe = training.seconds_per_epoch(self.results.log(e))
            spe_t = "–" if spe is None else f"{spe:.2f}"
            a = final.get(e)
            self.md.append(f"| `{e}` | {a[0]} | {a[1]:.1f} | {spe_t} |" if a else f"| `{e}` | – | – | {spe_t} |")
        self.md.append("")

    # ------------------------------------------------------------------------------- output
    def build(self) -> dict[str, Any]:
        self.md += [f"# {self.info.title}", ""]
        if self.info.intro:
            self.md += [self.info.intro, ""]
        views = [v for v in self.spec.view if v.paper == self.paper or self.paper in v.also_on]
        for v in views:
            self.table(v)
        for h in self.spec.heatmap:
            if h.paper == self.paper:
                self.heatmaps(h)
        for it in self.spec.iterations:
            if it.paper == self.paper or self.paper in it.also_on:
                self.iteration_curves(it)
        for tt in self.spec.training_time:
            if tt.paper == self.paper:
                self.training_time(tt)
        entries = list(self.info.training_curves) or sorted(
            {e for v in views for r in v.rows for e in v.runs_of(r)} |
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
            self.written.append(_write(f / "README.md", "\n".join(self.md)))
        frames = {"cells": _ints(pd.DataFrame(self.cells)), "transferability": _ints(pd.DataFrame(self.transfer)),
                  "iterations": _ints(pd.DataFrame(self.iterations)), "training_time": pd.DataFrame(self.train_rows)}
        if self.fmt == "csv":
            for name, df in frames.items():
                if not df.empty:
                    self.written.append(_write(f / f"{name}.csv", df.to_csv(index=False, lineterminator="\n")))
        elif self.fmt == "json":
            self.written.append(_write(f / "report.json", json.dumps({k: _records(v) for k, v in frames.items()},
                                                                      indent=1, sort_keys=True, ensure_ascii=False)))


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------

@dataclass
class ReportOutput:
    """What a report run wrote and what it found: the index, every file, and the summary lines."""
    index: Path
    files: list[Path]
    summary: list[str]
    notes: list[str] = field(default_factory=list)  # e.g. why no screenshot was taken


def build_report(paper: str = "all", out: str | Path = "reports", db: str | Path | None = None,
                 runs_dir: str | Path | None = None, fmt: str = "md", views: Path | None = None,
                 screenshot: bool = True) -> ReportOutput:
    """Write the report for ``paper`` (a paper id of the views, ``all``, a protocol, or a views file)
    into ``out``: ``<paper>/README.md`` (+ figures as PDF, SVG and PNG), ``index.md``, ``flags.md``,
    ``leaderboard.md``, ``leaderboard.html`` (+ ``runs.html``, and ``leaderboard.png`` when Chromium is
    installed and ``screenshot``); ``fmt='csv'|'json'``: the same numbers as files for machines."""
    if fmt not in FORMATS:
        raise ConfigError(f"unknown format {fmt!r}; allowed: {', '.join(FORMATS)}", field="--format")
    out = Path(out)
    check_writable_dir(out, "report folder")  # a file there, or a read-only folder: one line, nothing written
    results = Results(db or results_db(), runs_dir or default_runs())
    spec, papers, everything = resolve_pages(paper, views, results)
    ensure_dir(out)  # only once the pages are known: a wrong --paper leaves no folder behind
    flags = compute_flags(results)
    summaries = []
    written: list[Path] = []
    for p in papers:
        folder = out / slug(p)
        if folder.exists() and fmt == "md":
            for ext in figures.FORMATS:  # figures of entries no longer in the store must not linger
                for old in folder.glob(f"*.{ext}"):
                    old.unlink()
        pr = PaperReport(p, spec, results, flags, folder, fmt, written)
        summaries.append(pr.build())
        pr.write()
    protos = None if everything else _paper_protocols(spec, papers)
    board = lb.leaderboard(results, spec.headline_eps, spec.leaderboard_exclude, flags, protos)
    fl = flags_frame([f for f in flags if protos is None or f.protocol in protos])
    notes: list[str] = []
    if fmt == "md":
        written.append(_write(out / "leaderboard.md", lb.to_markdown(board)))
        page = _write(out / "leaderboard.html", lb.to_html(board))
        written += [page, _write(out / lb.RUNS_PAGE, lb.runs_html(results, board))]
        written.append(_write(out / "flags.md", _flags_md(fl)))
        index = _write(out / "index.md", _index_md(summaries, board, fl, results))
        written.append(index)
        shot = out / "leaderboard.png"
        if shot.exists():  # a picture of an older leaderboard must not stay beside the new page
            shot.unlink()
        if screenshot:
            from robbench.report.screenshot import screenshot as take

            groups = board.groupby(["protocol", "dataset", "sample_sha256"]).ngroups if not board.empty else 0
            height = min(SCREENSHOT_MAX_HEIGHT, 330 + 110 * groups + 37 * len(board))  # the whole page, roughly
            why = take(page, shot, (1500, height))
            if why is None:
                written.append(shot)
            else:
                notes.append(why)
                print(f"[report] {why}", flush=True)
    elif fmt == "csv":
        written.append(_write(out / "leaderboard.csv", _ints(board).to_csv(index=False, lineterminator="\n")))
        written.append(_write(out / "flags.csv", fl.to_csv(index=False, lineterminator="\n")))
        index = _write(out / "index.csv", pd.DataFrame(summaries).to_csv(index=False, lineterminator="\n"))
        written.append(index)
    else:
        index = _write(out / "index.json", json.dumps({"papers": summaries, "leaderboard": _records(board),
                                                       "flags": _records(fl)}, indent=1, sort_keys=True,
                                                      ensure_ascii=False))
        written.append(index)
    return ReportOutput(index, written, summary_lines(summaries, board, fl), notes)


def write_report(paper: str = "all", out: str | Path = "reports", db: str | Path | None = None,
                 runs_dir: str | Path | None = None, fmt: str = "md", views: Path | None = None,
                 screenshot: bool = True) -> Path:
    """:func:`build_report`, returning the index path."""
    return build_report(paper, out, db, runs_dir, fmt, views, screenshot).index


SUMMARY_FLAG_LINES = 8
SCREENSHOT_MAX_HEIGHT = 6000


def summary_lines(summaries: list[dict[str, Any]], board: pd.DataFrame, fl: pd.DataFrame) -> list[str]:
    """One screen: cells per page, the best entry per protocol (and sample set), the flags raised."""
    out = ["pages: " + ", ".join(f"{s['paper']} {s['cells_done']}/{s['cells_measurable']} cells" for s in summaries)]
    if board.empty:
        out.append("leaderboard: no finished evaluation runs")
    else:
        out.append("best entry per protocol (robust accuracy % at the headline eps; rank within one sample set):")
        best = board[board["rank"] == 1]
        multi = board.groupby("protocol")["sample_sha256"].nunique()
        for r in best.itertuples(index=False):
            where = f" [samples {r.sample_sha256[:8]}]" if multi.get(r.protocol, 1) > 1 else ""
            out.append(f"  {r.protocol}{where}: {r.entry} {r.robust:.1f} at eps {r.eps:g} "
                       f"(clean {'?' if pd.isna(r.clean) else f'{r.clean:.1f}'}, n={r.n})")
    if fl.empty:
        out.append("flags: none")
    else:
        counts = fl["code"].value_counts().sort_index()
        out.append(f"flags: {len(fl)} (" + ", ".join(f"{c} {k}" for c, k in counts.items()) + ")")
        for r in fl.head(SUMMARY_FLAG_LINES).itertuples(index=False):
            out.append(f"  {r.entry} / {r.protocol}: {r.message}")
        if len(fl) > SUMMARY_FLAG_LINES:
            out.append(f"  ... {len(fl) - SUMMARY_FLAG_LINES} more in flags.md")
    return out


def _paper_protocols(spec: ViewsFile, papers: list[str]) -> set[str]:
    """Protocols the papers' pages read (their leaderboard is restricted to them)."""
    out = set()
    for v in spec.view:
        if v.paper in papers or set(v.also_on) & set(papers):
            out |= {v.measure(c).protocol for c in list(v.columns) + list(v.measures)} | {v.protocol}
    out |= {h.protocol for h in spec.heatmap if h.paper in papers}
    out |= {i.protocol for i in spec.iterations if i.paper in papers or set(i.also_on) & set(papers)}
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
        out.append(f"| [{s['title']}]({slug(s['paper'])}/README.md) | {s['cells_done']} / {s['cells_measurable']} | {s['flags']} |")
    out += ["", f"- [Leaderboard](leaderboard.md) ([HTML](leaderboard.html)): {len(board)} ranked runs.",
            f"- [Sanity flags](flags.md): {len(fl)}.", ""]
    return "\n".join(out)
