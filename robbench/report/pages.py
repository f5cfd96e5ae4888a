"""Which pages a report renders: the papers of the views, every paper, one protocol (a page synthesized
from every entry the store has for it), or a views file of the user's."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from robbench.errors import ConfigError
from robbench.outcomes import FINAL
from robbench.paths import PROTOCOLS_DIR
from robbench.report.flags import protocol_info
from robbench.report.measures import eps_values
from robbench.report.results import Results
from robbench.report.views import Heatmap, Iterations, Measure, PaperInfo, View, ViewsFile, load_views



def protocol_views(protocol: str, results: Results) -> ViewsFile:
    """A page for one protocol: every entry the store has for it, one row each, a column per eps (the
    clean point first), curves; a transferability protocol gets its heatmaps, a convergence protocol its
    iteration curves."""
    runs = results.runs_of(protocol)
    runs = [r for r in runs if r.protocol == protocol]
    info = protocol_info(protocol)
    eps = sorted({e for r in runs for e in eps_values(results.outcomes(r))})
    if not eps:
        eps = sorted(info["eps"])
    title = f"Protocol {protocol}"
    spec = ViewsFile(papers={protocol: PaperInfo(title=title, intro=(
        f"Every entry evaluated with `{protocol}` ({info['kind'] or 'unknown kind'}"
        + (f", {', '.join(info['datasets'])}" if info["datasets"] else "") + ") in the results store."),
        training_curves=sorted({r.entry for r in runs}))})
    if info["kind"] == "transferability":
        for e in eps:
            spec.heatmap.append(Heatmap(paper=protocol, protocol=protocol, eps=e, attack=_transfer_attack(results, runs),
                                        title=f"Within-ensemble transferability, eps {e:g}"))
        return spec
    if info["kind"] == "distillation":
        spec.view.append(_distillation_view(protocol, runs, eps))
        return spec
    view = View(paper=protocol, table=protocol, title=f"Accuracy vs eps, {protocol}", protocol=protocol,
                compare=False, columns=["clean", *[f"{e:g}" for e in eps]],
                rows={r.entry: r.entry for r in sorted(runs, key=lambda r: r.entry)}, curves=True, own_runs=False)
    spec.view.append(view)
    if any((results.outcomes(r)["steps"] != FINAL).any() for r in runs):
        spec.iterations.append(Iterations(paper=protocol, protocol=protocol))
    return spec


def _distillation_view(protocol: str, runs: list[Any], eps: list[float]) -> View:
    """A distillation protocol's page: one row per (entry, eps), its mean distance and diversity loss (the
    measurement's values are not accuracies, and one row per entry would mix every eps in one mean)."""
    rows: dict[str, str] = {}
    row_eps: dict[str, float] = {}
    for r in sorted(runs, key=lambda r: r.entry):
        for e in eps:
            label = f"{r.entry} eps={e:g}"
            rows[label], row_eps[label] = r.entry, e
    return View(paper=protocol, table=protocol, title=f"Distillation distance and diversity loss vs eps, {protocol}",
                protocol=protocol, compare=False, columns=["distance", "diversity loss"], rows=rows,
                row_eps=row_eps, own_runs=False,
                measures={"distance": Measure(kind="mean", attacks=["distance"]),
                          "diversity loss": Measure(kind="mean", attacks=["diversity-loss"])})


def _transfer_attack(results: Results, runs: list[Any]) -> str:
    for r in runs:
        df = results.outcomes(r)
        ids = sorted(set(df.loc[df["source_member"] >= 0, "attack"]))
        if ids:
            return ids[0]
    return "pgd"


def known_protocol(name: str, results: Results) -> bool:
    return (PROTOCOLS_DIR / f"{name}.toml").exists() or any(r.protocol == name for r in results.runs.values())


def resolve_pages(paper: str, views: Path | None, results: Results) -> tuple[ViewsFile, list[str], bool]:
    """(views, the paper ids to render, whether the leaderboard covers every protocol). ``paper``: a
    paper id of the views, ``all``, a protocol name, or a views file (``*.toml``)."""
    default = load_views(views)
    if paper == "all":
        return default, sorted(default.papers), True
    if paper in default.papers:
        return default, [paper], False
    if paper.endswith(".toml"):
        path = Path(paper)
        if not path.exists():
            raise ConfigError("views file not found", file=paper, field="--paper")
        custom = load_views(path)
        custom.headline_eps = {**default.headline_eps, **custom.headline_eps}
        custom.leaderboard_exclude = custom.leaderboard_exclude or list(default.leaderboard_exclude)
        return custom, sorted(custom.papers), False
    if known_protocol(paper, results):
        spec = protocol_views(paper, results)
        spec.headline_eps = dict(default.headline_eps)
        spec.leaderboard_exclude = list(default.leaderboard_exclude)
        return spec, [paper], False
    raise ConfigError(f"unknown paper or protocol {paper!r}; allowed: all, {', '.join(sorted(default.papers))}, "
                      f"a protocol name (protocols/*.toml) or a views file (*.toml)", field="--paper")
