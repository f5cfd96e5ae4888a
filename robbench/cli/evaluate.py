"""``robbench evaluate``: run an attack suite and print each entry's accuracy table."""
from __future__ import annotations

import click

from robbench.cli.catalog import SET_PROTOCOL_HELP
from robbench.cli.common import memory_format_option, user_errors


@click.command(short_help="Run an attack suite (protocol) on trained or imported runs.")
@click.option("--protocol", "protocol", required=True, help="protocol name (protocols/*.toml)")
@click.argument("entries", nargs=-1)
@click.option("--n", type=int, default=None, help="number of samples (override)")
@click.option("--eps", type=str, default=None, help="comma-separated eps list (override)")
@click.option("--batch-size", type=int, default=None, help="samples per batch (override the protocol's batch_size)")
@click.option("--set", "overrides", multiple=True, help=SET_PROTOCOL_HELP)
@click.option("--force", is_flag=True, help="redo a finished protocol run")
@click.option("--device", default=None, help="cpu, cuda or cuda:N (default: CUDA when present)")
@click.option("--runs-dir", type=click.Path(), default=None, help="runs folder (default $ROBBENCH_RUNS or ./runs)")
@click.option("--db", type=click.Path(), default=None, help="results store (default results/robbench.db)")
@click.option("--data-root", type=click.Path(), default=None, help="datasets folder (default $ROBBENCH_DATA or ./data)")
@memory_format_option
@user_errors
def evaluate(protocol: str, entries: tuple[str, ...], n: int | None, eps: str | None, batch_size: int | None,
             overrides: tuple[str, ...], force: bool, device: str | None, runs_dir: str | None, db: str | None,
             data_root: str | None, memory_format: str) -> None:
    """Run an attack suite on trained or imported runs (every run it applies to when none named; runs that
    cannot be loaded are named with the reason)."""
    import os

    from robbench.evaluate.engine import evaluate_protocol

    runs = evaluate_protocol(protocol, list(entries), n=n, eps=eps, batch_size=batch_size,
                             overrides=list(overrides), force=force, device=device, runs_dir=runs_dir, db=db,
                             data_root=data_root, memory_format=memory_format)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, rank 0 alone prints
        _print_summaries(runs, db)


def _print_summaries(runs: dict[str, int], db: str | None) -> None:
    """Per evaluated entry: its aggregated accuracy per attack (rows) and eps (columns), the same table
    ``robbench.evaluate(...)`` returns (:func:`robbench.api.summary`); a transferability run prints its
    source x target matrices in attack success rate, the unit of its heatmaps and CSV."""
    from robbench.api import summary
    from robbench.report.transferability import success_lines
    from robbench.store import Store

    with Store(db) as store:
        for name, run_id in runs.items():
            run = store.run(run_id)
            if (run["meta"].get("protocol") or {}).get("kind") == "distillation":
                click.echo(f"\n{name} - {run['protocol']} (distillation, run {run_id})")
                click.echo("\n".join(_distillation_lines(store.outcomes(run_id))))
                continue
            if (run["meta"].get("protocol") or {}).get("kind") == "transferability":
                lines = success_lines(store.outcomes(run_id))
                if lines:
                    click.echo(f"\n{name} - {run['protocol']} (transferability, run {run_id})")
                    click.echo("\n".join(lines))
                    continue
            table = summary(store, run_id)
            if table.empty:
                continue
            aggregation = table["aggregation"].iloc[0]
            eps_cols = sorted(table["eps"].unique())
            click.echo(f"\n{name} - {table['protocol'].iloc[0]} ({aggregation}, n={int(table['n'].max())}, run {run_id})")
            click.echo(f"{'attack':34s} {'member':>6s} " + " ".join(f"{e:>7.4g}" for e in eps_cols))
            for (attack, member), g in table.groupby(["attack", "member"], sort=False):
                vals = {float(e): a for e, a in zip(g["eps"], g["accuracy"])}
                cells = " ".join(f"{100 * vals[e]:6.1f}%" if e in vals else f"{'':>7s}" for e in eps_cols)
                click.echo(f"{str(attack)[:34]:34s} {int(member):>6d} {cells}")


def _distillation_lines(df) -> list[str]:  # type: ignore[no-untyped-def]
    """A distillation run's means per eps (the numbers of DVERGE Table 2), over every sample and pair."""
    from robbench.evaluate.distillation import DISTANCE, DIVERSITY_LOSS

    lines = [f"{'eps':>7s} {'distance':>10s} {'diversity loss':>15s} {'n':>6s}"]
    for eps, g in df[df["attack"].isin([DISTANCE, DIVERSITY_LOSS])].groupby("eps"):
        d = g.loc[g["attack"] == DISTANCE, "margin"].mean()
        loss = g.loc[g["attack"] == DIVERSITY_LOSS, "margin"].mean()
        lines.append(f"{eps:>7.4g} {d:>10.4f} {loss:>15.4f} {g['sample'].nunique():>6d}")
    return lines
