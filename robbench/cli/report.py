"""``robbench report``: tables, figures and the leaderboard from the results store."""
from __future__ import annotations

import click

from robbench.cli.common import user_errors


@click.command()
@click.option("--paper", type=click.Choice(["dverge", "eio", "eed", "xie", "demo", "all"]), default="all")
@click.option("--out", type=click.Path(), default="reports", help="output folder")
@click.option("--db", type=click.Path(), default=None)
@click.option("--runs-dir", type=click.Path(), default=None)
@click.option("--format", "fmt", type=click.Choice(["md", "csv", "json"]), default="md")
@user_errors
def report(paper: str, out: str, db: str | None, runs_dir: str | None, fmt: str) -> None:
    """Write markdown tables, heatmaps, curves and the leaderboard from the results store."""
    from robbench.report import write_report

    write_report(paper=paper, out=out, db=db, runs_dir=runs_dir, fmt=fmt)
