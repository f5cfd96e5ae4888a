"""``robbench report``: tables, figures and the leaderboard from the results store."""
from __future__ import annotations

import click

from robbench.cli.common import user_errors


@click.command()
@click.option("--paper", default="all", show_default=True,
              help="what to report: a paper (dverge, eio, eed, xie, demo), all of them, one protocol (its "
                   "every evaluated entry, e.g. demo-whitebox), or a views file of your own (path/to/views.toml)")
@click.option("--out", type=click.Path(), default="reports", show_default=True, help="output folder")
@click.option("--db", type=click.Path(), default=None, help="results store (default results/robbench.db, or ROBBENCH_DB)")
@click.option("--runs-dir", type=click.Path(), default=None, help="trained runs (default runs/, or ROBBENCH_RUNS)")
@click.option("--format", "fmt", type=click.Choice(["md", "csv", "json"]), default="md", show_default=True,
              help="md: pages with figures, leaderboard HTML; csv/json: the same numbers for machines")
@click.option("--no-screenshot", is_flag=True, help="do not take leaderboard.png with headless Chromium")
@user_errors
def report(paper: str, out: str, db: str | None, runs_dir: str | None, fmt: str, no_screenshot: bool) -> None:
    """Write paper tables, figures, flags and the leaderboard from the results store, then print the
    files written and a summary (best entry per protocol, flags raised)."""
    from robbench.report.write import build_report

    result = build_report(paper=paper, out=out, db=db, runs_dir=runs_dir, fmt=fmt, screenshot=not no_screenshot)
    click.echo(f"wrote {len(result.files)} files under {out}:")
    for p in result.files:
        click.echo(f"  {p}")
    for line in result.summary:
        click.echo(line)
    click.echo(f"index: {result.index}")
