"""Leaderboard per protocol and dataset: entries ranked by all-or-nothing robust accuracy at the
protocol's headline eps, with clean accuracy, forward passes per prediction, parameters, checkpoint hash
and date. Markdown and a static HTML page (no server, no script)."""
from __future__ import annotations

import fnmatch
import html
from typing import Any

import pandas as pd

from robbench.outcomes import CLEAN_ATTACK
from robbench.report.flags import Flag, protocol_info
from robbench.report.measures import clean_counts, eps_values, wilson
from robbench.report.results import Results, RunInfo

RANKED_KINDS = ("whitebox", "transfer", "autoattack", "convergence")
COLUMNS = ["protocol", "dataset", "rank", "entry", "robust", "robust_ci_low", "robust_ci_high", "eps", "clean",
           "n", "forward_passes", "params", "checkpoint_sha256", "date", "flags"]


def headline_eps(protocol: str, available: list[float], configured: dict[str, float]) -> float | None:
    """The configured eps, else the median of the eps the run holds (lower median: deterministic)."""
    if not available:
        return None
    if protocol in configured:
        want = configured[protocol]
        for e in available:
            if abs(e - want) < 1e-9:
                return e
        return None
    return available[(len(available) - 1) // 2]


def forward_passes(results: Results, run: RunInfo, cfg: dict[str, Any], member: int | None) -> int | None:
    """Forward passes per prediction: the engine's record, else 1 for a picked member, else the ensemble size."""
    for key in ("forward_passes", "num_forward_passes"):
        if key in run.meta:
            return int(run.meta[key])
    if member is not None:
        return 1
    model = cfg.get("model", {}) if isinstance(cfg, dict) else {}
    return int(model["members"]) if "members" in model else None


def leaderboard(results: Results, configured_eps: dict[str, float], exclude: list[str],
                flags: list[Flag], protocols: set[str] | None = None) -> pd.DataFrame:
    """Ranked runs of every protocol (of ``protocols`` when given)."""
    rows = []
    for run in results.runs.values():
        if run.role != "target":  # a source's accuracy on its own sets is not an evaluation of it
            continue
        if any(fnmatch.fnmatch(run.protocol, p) for p in exclude):
            continue
        if protocols is not None and run.protocol not in protocols:
            continue
        info = protocol_info(run.protocol, run)
        if info["kind"] not in RANKED_KINDS:
            continue
        df = results.outcomes(run)
        attacks = sorted(set(df["attack"]) - {CLEAN_ATTACK})
        eps = headline_eps(run.protocol, eps_values(df), configured_eps)
        kn = results.aon_counts(run, attacks, eps) if (attacks and eps is not None) else None
        if kn is None:
            continue
        lo, hi = wilson(*kn)
        cc = clean_counts(df)
        cfg = results.resolved_entry(run.entry)
        data = cfg.get("data", {}) if isinstance(cfg, dict) else {}
        samples = run.meta.get("samples") if isinstance(run.meta.get("samples"), dict) else {}
        dataset = (data.get("dataset") or samples.get("dataset") or run.meta.get("dataset")
                   or (info["datasets"][0] if info["datasets"] else "?"))
        rows.append({
            "protocol": run.protocol, "dataset": dataset, "entry": run.entry,
            "robust": round(100 * kn[0] / kn[1], 4), "robust_ci_low": round(100 * lo, 4),
            "robust_ci_high": round(100 * hi, 4), "eps": eps,
            "clean": None if not cc else round(100 * cc[0] / cc[1], 4), "n": kn[1],
            "forward_passes": forward_passes(results, run, cfg, info["member"]),
            "params": results.param_count(run.entry), "checkpoint_sha256": run.checkpoint_sha256,
            "date": run.finished[:10],
            "flags": ", ".join(sorted({f.code for f in flags if f.entry == run.entry and f.protocol == run.protocol})),
        })
    if not rows:
        return pd.DataFrame(columns=COLUMNS)
    df = pd.DataFrame(rows)
    df["_clean"] = df["clean"].fillna(-1)
    df = df.sort_values(["protocol", "dataset", "robust", "_clean", "entry"],
                        ascending=[True, True, False, False, True]).drop(columns="_clean")
    df["rank"] = df.groupby(["protocol", "dataset"]).cumcount() + 1
    return df[COLUMNS].reset_index(drop=True)


def _params(p: Any) -> str:
    if p is None or pd.isna(p):
        return "?"
    p = int(p)
    return f"{p / 1e6:.2f}M" if p >= 1e6 else (f"{p / 1e3:.1f}k" if p >= 1e3 else str(p))


def _fmt(v: Any, spec: str = ".1f") -> str:
    return "?" if v is None or (isinstance(v, float) and pd.isna(v)) else format(v, spec)


def _row_cells(r: Any) -> list[str]:
    return [str(r.rank), r.entry, f"{_fmt(r.robust)} [{_fmt(r.robust_ci_low)}, {_fmt(r.robust_ci_high)}]",
            _fmt(r.clean), str(r.n), _fmt(r.forward_passes, "d") if r.forward_passes is not None and not pd.isna(r.forward_passes) else "?",
            _params(r.params), r.checkpoint_sha256[:12], r.date, r.flags or ""]


HEADER = ["#", "entry", "robust % [95% CI]", "clean %", "n", "fwd passes", "params", "checkpoint", "date", "flags"]


def to_markdown(df: pd.DataFrame) -> str:
    out = ["# Leaderboard", "",
           "Per protocol and dataset, entries ranked by all-or-nothing robust accuracy at the protocol's "
           "headline eps (ties: clean accuracy). 95% Wilson intervals; `fwd passes` = forward passes per "
           "prediction; `checkpoint` = sha256 prefix of model.safetensors; `date` = when the evaluation finished.", ""]
    if df.empty:
        return "\n".join(out + ["No finished evaluation runs in the results store yet.", ""])
    for (proto, ds), g in df.groupby(["protocol", "dataset"], sort=True):
        out += [f"## {proto} · {ds} · eps {g['eps'].iloc[0]:g}", "",
                "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
        for r in g.itertuples(index=False):
            out.append("| " + " | ".join(_row_cells(r)) + " |")
        out.append("")
    return "\n".join(out)


_CSS = ("body{font-family:system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse;margin-bottom:2em}"
        "th,td{border:1px solid #ccc;padding:4px 8px;font-size:14px}th{background:#f0f0f0}"
        "td.num{text-align:right}tr.flag td{background:#fff4e0}code{font-size:12px}")


def to_html(df: pd.DataFrame) -> str:
    e = html.escape
    out = ["<!DOCTYPE html>", "<html lang=\"en\"><head><meta charset=\"utf-8\"><title>robbench leaderboard</title>",
           f"<style>{_CSS}</style></head><body>", "<h1>robbench leaderboard</h1>",
           "<p>Per protocol and dataset, ranked by all-or-nothing robust accuracy at the headline eps "
           "(95% Wilson intervals). Rows with sanity flags are shaded.</p>"]
    if df.empty:
        out.append("<p>No finished evaluation runs in the results store yet.</p>")
    for (proto, ds), g in df.groupby(["protocol", "dataset"], sort=True):
        out.append(f"<h2>{e(proto)} · {e(ds)} · eps {g['eps'].iloc[0]:g}</h2>")
        out.append("<table><thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in HEADER) + "</tr></thead><tbody>")
        for r in g.itertuples(index=False):
            cells = _row_cells(r)
            cls = " class=\"flag\"" if r.flags else ""
            tds = []
            for i, c in enumerate(cells):
                if i == 7:
                    tds.append(f"<td><code title=\"{e(r.checkpoint_sha256)}\">{e(c)}</code></td>")
                else:
                    num = ' class="num"' if i in (0, 2, 3, 4, 5, 6) else ""
                    tds.append(f"<td{num}>{e(c)}</td>")
            out.append(f"<tr{cls}>" + "".join(tds) + "</tr>")
        out.append("</tbody></table>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"
