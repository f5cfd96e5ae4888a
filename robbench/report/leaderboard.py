"""Leaderboard per protocol, dataset and sample set: entries ranked by all-or-nothing robust accuracy
(%) at the protocol's headline eps, with clean accuracy (%), forward passes per prediction, parameters,
checkpoint hash, sample-set hash and n, imported or trained, and date. Runs on different sample sets are
never ranked together. Markdown, and one static HTML page (no network: its small script is inline)
whose columns sort and whose rows filter, linking each row to its run's details (``runs.html``)."""
from __future__ import annotations

import fnmatch
import html
import re
from typing import Any

import pandas as pd

from robbench.evaluate.aggregations import per_attack
from robbench.outcomes import CLEAN_ATTACK
from robbench.report.flags import Flag, protocol_info
from robbench.report.measures import clean_counts, eps_values, wilson
from robbench.report.results import Results, RunInfo

RANKED_KINDS = ("whitebox", "transfer", "autoattack", "convergence")
COLUMNS = ["protocol", "dataset", "sample_sha256", "sample_rule", "rank", "entry", "origin", "robust",
           "robust_ci_low", "robust_ci_high", "eps", "clean", "unit", "n", "forward_passes", "params",
           "checkpoint_sha256", "date", "flags", "run_id"]
UNIT = "%"  # robust and clean accuracy (and their intervals)
UNKNOWN_SAMPLES = "unrecorded"  # runs from before the engine recorded its sample set: one group of their own
RUNS_PAGE = "runs.html"


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


def measured_members_per_sample(results: Results, run: RunInfo) -> float | None:
    """Members a dynamic-inference team (EED's DIE) evaluated per sample, as measured on the clean test set
    into run meta ``eed_cost``: this run's record, else another run of the same entry (the measurement does
    not depend on the protocol)."""
    candidates = [run] + [r for r in results.runs.values() if r.entry == run.entry and r is not run]
    for r in candidates:
        cost = r.meta.get("eed_cost")
        if isinstance(cost, dict) and cost.get("members_per_sample") is not None:
            return float(cost["members_per_sample"])
    return None


def forward_passes(results: Results, run: RunInfo, cfg: dict[str, Any], member: int | None) -> float | None:
    """Forward passes (member networks) per prediction: the engine's record, else 1 for a picked member, else
    the members a dynamic team measured per sample, else the ensemble size (an EED team entry holds its
    members inside one network, so its size is ``model.options.size``)."""
    for key in ("forward_passes", "num_forward_passes"):
        if key in run.meta:
            return float(run.meta[key])
    if member is not None:
        return 1
    measured = measured_members_per_sample(results, run)
    if measured is not None:
        return measured
    model = cfg.get("model", {}) if isinstance(cfg, dict) else {}
    if model.get("arch") == "eed_team" and "size" in (model.get("options") or {}):
        return int(model["options"]["size"])
    return int(model["members"]) if "members" in model else None


def sample_rule(samples: dict[str, Any]) -> str:
    """How the sample set was drawn, in words: 'seeded n=1000 seed 0, test split'."""
    if not samples:
        return "not recorded"
    parts = [str(samples.get("selection", "?"))]
    if samples.get("n") is not None:
        parts.append(f"n={samples['n']}")
    if samples.get("seed") is not None and samples.get("selection") not in ("first", "all"):
        parts.append(f"seed {samples['seed']}")
    rule = " ".join(parts)
    return f"{rule}, {samples['split']} split" if samples.get("split") else rule


def ranked_runs(results: Results, exclude: list[str], protocols: set[str] | None) -> list[RunInfo]:
    out = []
    for run in results.runs.values():
        if run.role != "target":  # a source's accuracy on its own sets is not an evaluation of it
            continue
        if any(fnmatch.fnmatch(run.protocol, p) for p in exclude):
            continue
        if protocols is not None and run.protocol not in protocols:
            continue
        if protocol_info(run.protocol, run)["kind"] in RANKED_KINDS:
            out.append(run)
    return out


def leaderboard(results: Results, configured_eps: dict[str, float], exclude: list[str],
                flags: list[Flag], protocols: set[str] | None = None) -> pd.DataFrame:
    """Ranked runs of every protocol (of ``protocols`` when given); rank within (protocol, dataset,
    sample set)."""
    rows = []
    for run in ranked_runs(results, exclude, protocols):
        info = protocol_info(run.protocol, run)
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
        samples = results.sample_set(run)
        dataset = (samples.get("dataset") or data.get("dataset") or run.meta.get("dataset")
                   or (info["datasets"][0] if info["datasets"] else "?"))
        rows.append({
            "protocol": run.protocol, "dataset": dataset,
            "sample_sha256": str(samples.get("sha256") or UNKNOWN_SAMPLES), "sample_rule": sample_rule(samples),
            "entry": run.entry, "origin": results.origin(run),
            "robust": round(100 * kn[0] / kn[1], 4), "robust_ci_low": round(100 * lo, 4),
            "robust_ci_high": round(100 * hi, 4), "eps": eps,
            "clean": None if not cc else round(100 * cc[0] / cc[1], 4), "unit": UNIT, "n": kn[1],
            "forward_passes": forward_passes(results, run, cfg, info["member"]),
            "params": results.param_count(run.entry), "checkpoint_sha256": run.checkpoint_sha256,
            "date": run.finished[:10],
            "flags": ", ".join(sorted({f.code for f in flags if f.entry == run.entry and f.protocol == run.protocol})),
            "run_id": run.run_id,
        })
    if not rows:
        return pd.DataFrame(columns=COLUMNS)
    df = pd.DataFrame(rows)
    df["_clean"] = df["clean"].fillna(-1)
    group = ["protocol", "dataset", "sample_sha256"]
    df = df.sort_values(group + ["robust", "_clean", "entry"],
                        ascending=[True, True, True, False, False, True]).drop(columns="_clean")
    df["rank"] = df.groupby(group).cumcount() + 1
    return df[COLUMNS].reset_index(drop=True)


def _params(p: Any) -> str:
    if p is None or pd.isna(p):
        return "?"
    p = int(p)
    return f"{p / 1e6:.2f}M" if p >= 1e6 else (f"{p / 1e3:.1f}k" if p >= 1e3 else str(p))


def _fmt(v: Any, spec: str = ".1f") -> str:
    return "?" if v is None or (isinstance(v, float) and pd.isna(v)) else format(v, spec)


def _fwd(v: Any) -> str:
    if v is None or pd.isna(v):
        return "?"
    return format(int(v), "d") if float(v).is_integer() else format(float(v), ".2f")


HEADER = ["#", "entry", "origin", "robust accuracy % [95% CI]", "clean accuracy %", "n", "fwd passes", "params",
          "checkpoint", "date", "flags"]
INTRO = ("Per protocol, dataset and sample set, entries ranked by all-or-nothing robust accuracy (%) at the "
         "protocol's headline eps (ties: clean accuracy). Runs on different sample sets are ranked in separate "
         "tables, never together: each table names its sample set (sha256 of the sample ids, and the rule that "
         "drew them). 95% Wilson intervals; `origin`: trained by robbench or imported (weights brought in); "
         "`fwd passes` = member networks evaluated per prediction (a dynamic-inference team: the mean measured on "
         "the clean test set); `params` = parameters the model deploys (pruning masks counted: only kept weights; "
         "pruning scores and masks themselves are not parameters); `checkpoint` = sha256 prefix of model.safetensors; "
         "`date` = when the evaluation finished.")


def _groups(df: pd.DataFrame):
    return df.groupby(["protocol", "dataset", "sample_sha256"], sort=True)


def _heading(proto: str, ds: str, sha: str, g: pd.DataFrame) -> str:
    where = "sample set not recorded" if sha == UNKNOWN_SAMPLES else f"sample set {sha[:12]} ({g['sample_rule'].iloc[0]})"
    return f"{proto} · {ds} · eps {g['eps'].iloc[0]:g} · {where}"


def to_markdown(df: pd.DataFrame) -> str:
    out = ["# Leaderboard", "", INTRO, ""]
    if df.empty:
        return "\n".join(out + ["No finished evaluation runs in the results store yet.", ""])
    for (proto, ds, sha), g in _groups(df):
        out += [f"## {_heading(proto, ds, sha, g)}", "",
                "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
        for r in g.itertuples(index=False):
            out.append("| " + " | ".join([
                str(r.rank), r.entry, r.origin, f"{_fmt(r.robust)} [{_fmt(r.robust_ci_low)}, {_fmt(r.robust_ci_high)}]",
                _fmt(r.clean), str(r.n), _fwd(r.forward_passes), _params(r.params), r.checkpoint_sha256[:12], r.date,
                r.flags or ""]) + " |")
        out.append("")
    return "\n".join(out)


_CSS = ("body{font-family:system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse;margin-bottom:2em}"
        "th,td{border:1px solid #ccc;padding:4px 8px;font-size:14px;white-space:nowrap}th{background:#f0f0f0;cursor:pointer;"
        "user-select:none}th[aria-sort=ascending]::after{content:' \\25B2'}th[aria-sort=descending]::after"
        "{content:' \\25BC'}td.num{text-align:right}tr.flag td{background:#fff4e0}code{font-size:12px}"
        ".imported{background:#e6f0ff;border-radius:3px;padding:0 4px}.trained{color:#555}"
        "#filter{font-size:14px;padding:4px;width:24em;margin-bottom:1em}.hidden{display:none}")

# Sorting: a click on a header sorts that table by the cell's data-sort value (numbers numerically);
# a second click reverses. The filter hides rows whose text lacks every word typed.
_SCRIPT = """
(function () {
  function key(td) { var v = td.getAttribute('data-sort'); if (v === null) v = td.textContent;
    var f = parseFloat(v); return isNaN(f) ? v.toLowerCase() : f; }
  document.querySelectorAll('table.board').forEach(function (table) {
    table.querySelectorAll('th').forEach(function (th, col) {
      th.addEventListener('click', function () {
        var desc = th.getAttribute('aria-sort') !== 'descending';
        table.querySelectorAll('th').forEach(function (o) { o.removeAttribute('aria-sort'); });
        th.setAttribute('aria-sort', desc ? 'descending' : 'ascending');
        var body = table.tBodies[0];
        var rows = Array.prototype.slice.call(body.rows);
        rows.sort(function (a, b) { var x = key(a.cells[col]), y = key(b.cells[col]);
          var c = x < y ? -1 : (x > y ? 1 : 0); return desc ? -c : c; });
        rows.forEach(function (r) { body.appendChild(r); });
      });
    });
  });
  var box = document.getElementById('filter');
  box.addEventListener('input', function () {
    var words = box.value.toLowerCase().split(/\\s+/).filter(Boolean);
    document.querySelectorAll('table.board tbody tr').forEach(function (tr) {
      var text = tr.textContent.toLowerCase();
      var show = words.every(function (w) { return text.indexOf(w) >= 0; });
      tr.classList.toggle('hidden', !show);
    });
  });
})();
"""


def _td(text: str, sort: Any = None, num: bool = False, inner: str | None = None) -> str:
    e = html.escape
    attrs = (' class="num"' if num else "") + ("" if sort is None else f' data-sort="{e(str(sort))}"')
    return f"<td{attrs}>{inner if inner is not None else e(text)}</td>"


def to_html(df: pd.DataFrame) -> str:
    e = html.escape
    out = ["<!DOCTYPE html>", "<html lang=\"en\"><head><meta charset=\"utf-8\"><title>robbench leaderboard</title>",
           f"<style>{_CSS}</style></head><body>", "<h1>robbench leaderboard</h1>",
           "<p>" + re.sub(r"`([^`]+)`", r"<code>\1</code>", e(INTRO)) + "</p>",
           "<p>Click a column header to sort; type in the box to show only matching rows. "
           "Rows with sanity flags are shaded.</p>",
           '<input id="filter" type="search" placeholder="filter rows (entry, origin, flag, ...)" '
           'aria-label="filter rows">']
    if df.empty:
        out.append("<p>No finished evaluation runs in the results store yet.</p>")
    headers = HEADER + ["sample set", "run"]
    for (proto, ds, sha), g in _groups(df):
        out.append(f"<h2>{e(_heading(proto, ds, sha, g))}</h2>")
        out.append('<table class="board" data-protocol="' + e(proto) + '"><thead><tr>'
                   + "".join(f"<th>{e(h)}</th>" for h in headers) + "</tr></thead><tbody>")
        for r in g.itertuples(index=False):
            cls = " class=\"flag\"" if r.flags else ""
            origin = f'<span class="{e(r.origin)}">{e(r.origin)}</span>'
            robust = f"{_fmt(r.robust)} [{_fmt(r.robust_ci_low)}, {_fmt(r.robust_ci_high)}]"
            tds = [_td(str(r.rank), r.rank, True), _td(r.entry, r.entry), _td(r.origin, r.origin, inner=origin),
                   _td(robust, r.robust, True), _td(_fmt(r.clean), -1 if pd.isna(r.clean) else r.clean, True),
                   _td(str(r.n), r.n, True), _td(_fwd(r.forward_passes), -1 if pd.isna(r.forward_passes) else
                                                 float(r.forward_passes), True),
                   _td(_params(r.params), -1 if pd.isna(r.params) else int(r.params), True),
                   _td("", r.checkpoint_sha256, inner=f"<code title=\"{e(r.checkpoint_sha256)}\">"
                                                     f"{e(r.checkpoint_sha256[:12])}</code>"),
                   _td(r.date, r.date), _td(r.flags or "", r.flags or ""),
                   _td("", r.sample_sha256, inner=f"<code title=\"{e(r.sample_sha256)} ({e(r.sample_rule)})\">"
                                                  f"{e(r.sample_sha256[:12])}</code> n={e(str(r.n))}"),
                   _td("", r.run_id, inner=f'<a href="{RUNS_PAGE}#run-{e(str(r.run_id))}">run {e(str(r.run_id))}</a>')]
            out.append(f"<tr{cls} data-entry=\"{e(r.entry)}\">" + "".join(tds) + "</tr>")
        out.append("</tbody></table>")
    out.append(f"<script>{_SCRIPT}</script>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def runs_html(results: Results, df: pd.DataFrame) -> str:
    """One section per ranked run: what it evaluated and how (the details a leaderboard row links to)."""
    e = html.escape
    out = ["<!DOCTYPE html>", "<html lang=\"en\"><head><meta charset=\"utf-8\"><title>robbench runs</title>",
           f"<style>{_CSS}</style></head><body>", "<h1>Evaluation runs</h1>",
           '<p><a href="leaderboard.html">back to the leaderboard</a></p>']
    by_id = {r.run_id: r for r in results.runs.values()}
    for rid in sorted(df["run_id"].unique()) if not df.empty else []:
        run = by_id[int(rid)]
        samples = results.sample_set(run)
        man = results.manifest(run.entry)
        facts = [("entry", run.entry), ("protocol", run.protocol), ("origin", results.origin(run)),
                 ("checkpoint sha256", run.checkpoint_sha256), ("protocol sha256", run.protocol_sha256),
                 ("attack seed", str(run.seed)), ("overrides", ", ".join(run.overrides) or "none"),
                 ("sample set sha256", str(samples.get("sha256", UNKNOWN_SAMPLES))),
                 ("sample rule", sample_rule(samples)), ("finished", run.finished)]
        imported = man.get("imported") if isinstance(man.get("imported"), dict) else {}
        facts += [(f"imported {k}", str(v)) for k, v in sorted(imported.items())]
        facts += [(f"version {k}", str(v)) for k, v in sorted((run.versions or {}).items())]
        out.append(f'<h2 id="run-{e(str(run.run_id))}">run {e(str(run.run_id))}: {e(run.entry)} · {e(run.protocol)}</h2>')
        out.append("<table><tbody>" + "".join(f"<tr><th>{e(k)}</th><td><code>{e(v)}</code></td></tr>"
                                              for k, v in facts) + "</tbody></table>")
        acc = per_attack(results.outcomes(run))
        acc = acc[acc["member"] == -1]
        if not acc.empty:
            eps = sorted(acc["eps"].astype(float).unique())
            out.append("<table><thead><tr><th>attack (accuracy %)</th>" + "".join(f"<th>eps {x:g}</th>" for x in eps)
                       + "</tr></thead><tbody>")
            for attack, g in acc.groupby("attack", sort=True):
                vals = {float(x): a for x, a in zip(g["eps"], g["accuracy"])}
                out.append(f"<tr><td>{e(str(attack))}</td>" + "".join(
                    f'<td class="num">{100 * vals[x]:.1f}</td>' if x in vals else "<td></td>" for x in eps) + "</tr>")
            out.append("</tbody></table>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"
