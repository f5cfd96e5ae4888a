"""``robbench results list``: what ran, from the results store, without Python."""
from __future__ import annotations

import fnmatch
from typing import Any

import click

from robbench.cli.common import user_errors

COLUMNS = ["run_id", "entry", "protocol", "role", "status", "origin", "n", "checkpoint", "finished", "overrides"]


def run_table(db: str | None = None, *, entry: str | None = None, protocol: str | None = None,
              status: str | None = None, role: str | None = None, origin: str | None = None) -> Any:
    """The store's runs as a DataFrame (:data:`COLUMNS`); ``entry``/``protocol`` accept shell patterns
    (``demo_*``); ``origin`` is ``trained`` or ``imported`` (the engine's ``meta['origin']``)."""
    import pandas as pd

    from robbench.store import Store

    with Store(db) as store:
        df = store.runs(**{k: v for k, v in (("status", status), ("role", role)) if v is not None})
    if df.empty:
        return pd.DataFrame(columns=COLUMNS)
    rows = []
    for r in df.itertuples(index=False):
        meta = r.meta if isinstance(r.meta, dict) else {}
        samples = meta.get("samples") if isinstance(meta.get("samples"), dict) else {}
        rows.append({"run_id": int(r.run_id), "entry": r.entry, "protocol": r.protocol, "role": r.role,
                     "status": r.status, "origin": meta.get("origin", "trained"), "n": samples.get("n"),
                     "checkpoint": str(r.checkpoint_sha256)[:12],
                     "finished": r.finished[:19] if isinstance(r.finished, str) else "",
                     "overrides": " ".join(r.overrides or [])})
    out = pd.DataFrame(rows, columns=COLUMNS)
    if entry:
        out = out[out["entry"].map(lambda e: fnmatch.fnmatchcase(e, entry))]
    if protocol:
        out = out[out["protocol"].map(lambda p: fnmatch.fnmatchcase(p, protocol))]
    if origin:
        out = out[out["origin"] == origin]
    return out.reset_index(drop=True)


@click.group()
def results() -> None:
    """Look at the results store (runs and their status)."""


@results.command("list")
@click.option("--db", type=click.Path(), default=None, help="results store (default $ROBBENCH_DB or results/robbench.db)")
@click.option("--entry", default=None, help="entry name or shell pattern, e.g. 'demo_*'")
@click.option("--protocol", default=None, help="protocol name or shell pattern, e.g. 'dverge-*'")
@click.option("--status", type=click.Choice(["running", "done", "failed", "superseded"]), default=None,
              help="only runs with this status")
@click.option("--role", type=click.Choice(["target", "source"]), default=None,
              help="target = an evaluated model; source = a transfer source's accuracy on its own sets")
@click.option("--origin", type=click.Choice(["trained", "imported"]), default=None,
              help="trained by robbench, or imported (robbench add / convert / robbench.evaluate(model))")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True)
@user_errors
def list_runs(db: str | None, entry: str | None, protocol: str | None, status: str | None, role: str | None,
              origin: str | None, fmt: str) -> None:
    """List the runs in the results store, newest last (filter with the options)."""
    from pathlib import Path

    from robbench.errors import UserError
    from robbench.paths import results_db

    path = Path(db) if db else results_db()
    if not path.is_file():
        raise UserError("no results store here yet; run robbench evaluate first (or pass --db)", file=str(path))
    df = run_table(str(path), entry=entry, protocol=protocol, status=status, role=role, origin=origin)
    if fmt == "csv":
        click.echo(df.to_csv(index=False), nl=False)
    elif fmt == "json":
        click.echo(df.to_json(orient="records", indent=1))
    elif df.empty:
        click.echo("no runs match")
    else:
        click.echo(df.to_string(index=False))
