"""The ``robbench`` command line. User errors print one line and exit with code 2."""
from __future__ import annotations

import json
import sys
from functools import wraps
from typing import Any, Callable

import click

from robbench.errors import UserError


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn :class:`UserError` into ``error: ...`` on stderr and exit code 2 (no traceback)."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted; finished work is saved and the command resumes where it stopped", err=True)
            sys.exit(130)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="robbench")
def main() -> None:
    """robbench: train paper zoo entries, run attack protocols, report against published numbers."""


# ---------------------------------------------------------------------------------------------- zoo
@main.group()
def zoo() -> None:
    """Trainable entries (zoo/*.toml)."""


@zoo.command("list")
@user_errors
def zoo_list() -> None:
    """List zoo entries with their paper, method and dataset."""
    from robbench.config import list_entries, load_entry

    for name in list_entries():
        e = load_entry(name)
        click.echo(f"{name:40s} {e.paper:7s} {e.train.method:12s} {e.model.arch}x{e.model.members:<3d} {e.data.dataset}")


@zoo.command("show")
@click.argument("name")
@click.option("--set", "overrides", multiple=True, help="override a field: key=value (TOML value)")
@user_errors
def zoo_show(name: str, overrides: tuple[str, ...]) -> None:
    """Show an entry as resolved (extends merged, overrides applied, defaults filled)."""
    from robbench.config import load_entry

    e = load_entry(name, list(overrides))
    click.echo(json.dumps(e.resolved(), indent=2))


# ---------------------------------------------------------------------------------------- protocols
@main.group()
def protocols() -> None:
    """Attack suites (protocols/*.toml)."""


@protocols.command("list")
@user_errors
def protocols_list() -> None:
    """List protocols."""
    from robbench.config import list_protocols
    from robbench.evaluate.protocol import load_protocol

    for name in list_protocols():
        p = load_protocol(name)
        click.echo(f"{name:28s} {p.paper:7s} {p.description}")


@protocols.command("show")
@click.argument("name")
@user_errors
def protocols_show(name: str) -> None:
    """Show a protocol as resolved."""
    from robbench.evaluate.protocol import load_protocol

    click.echo(json.dumps(load_protocol(name).resolved(), indent=2))


# -------------------------------------------------------------------------------------------- train
def memory_format_option(f):  # type: ignore[no-untyped-def]
    """--memory-format: auto checks each model's gradients in both formats (robbench.memformat)."""
    return click.option("--memory-format", "memory_format", type=click.Choice(["auto", "channels_last", "contiguous"]),
                        default="auto", show_default=True,
                        help="tensor layout; auto compares gradients in both layouts per model and uses "
                             "channels_last only where they agree")(f)


@main.command()
@click.argument("entry")
@click.option("--set", "overrides", multiple=True, help="override a field: key=value (recorded in the manifest)")
@click.option("--epochs", type=int, default=None, help="override train.epochs")
@click.option("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when present)")
@click.option("--runs-dir", type=click.Path(), default=None, help="where runs/<entry>/ go (default ./runs)")
@click.option("--data-root", type=click.Path(), default=None, help="dataset directory (default ./data)")
@click.option("--fresh", is_flag=True,
              help="a run of another config (or built on since-retrained init weights) is moved aside, kept, and trained anew")
@memory_format_option
@user_errors
def train(entry: str, overrides: tuple[str, ...], epochs: int | None, device: str | None,
          runs_dir: str | None, data_root: str | None, fresh: bool, memory_format: str) -> None:
    """Train one zoo entry into runs/<entry>/ (resumes an interrupted run)."""
    from robbench.train.run import train_entry

    ov = list(overrides) + ([f"train.epochs={epochs}"] if epochs is not None else [])
    train_entry(entry, overrides=ov, device=device, runs_dir=runs_dir, data_root=data_root, fresh=fresh,
                memory_format=memory_format)


# ----------------------------------------------------------------------------------------- evaluate
@main.command()
@click.option("--protocol", "protocol", required=True, help="protocol name (protocols/*.toml)")
@click.argument("entries", nargs=-1)
@click.option("--n", type=int, default=None, help="number of samples (override)")
@click.option("--eps", type=str, default=None, help="comma-separated eps list (override)")
@click.option("--batch-size", type=int, default=None)
@click.option("--set", "overrides", multiple=True, help="override a protocol field: key=value")
@click.option("--force", is_flag=True, help="redo a finished protocol run")
@click.option("--device", default=None)
@click.option("--runs-dir", type=click.Path(), default=None)
@click.option("--db", type=click.Path(), default=None, help="results store (default results/robbench.db)")
@click.option("--data-root", type=click.Path(), default=None)
@memory_format_option
@user_errors
def evaluate(protocol: str, entries: tuple[str, ...], n: int | None, eps: str | None, batch_size: int | None,
             overrides: tuple[str, ...], force: bool, device: str | None, runs_dir: str | None, db: str | None,
             data_root: str | None, memory_format: str) -> None:
    """Run an attack suite on trained entries (all trained entries it applies to when none named)."""
    import os

    from robbench.evaluate.engine import evaluate_protocol

    runs = evaluate_protocol(protocol, list(entries), n=n, eps=eps, batch_size=batch_size,
                             overrides=list(overrides), force=force, device=device, runs_dir=runs_dir, db=db,
                             data_root=data_root, memory_format=memory_format)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, rank 0 alone prints
        _print_summaries(runs, db)


def _print_summaries(runs: dict[str, int], db: str | None) -> None:
    """Per evaluated entry: its aggregated accuracy per attack (rows) and eps (columns)."""
    from robbench.evaluate.aggregations import aggregate, groups_from_record
    from robbench.store import Store

    with Store(db) as store:
        for name, run_id in runs.items():
            df = store.outcomes(run_id)
            if df.empty:
                continue
            run = store.run(run_id)
            proto = run["meta"].get("protocol", {})
            aggregation = proto.get("aggregation", "all_or_nothing")
            table = aggregate(aggregation, df, groups_from_record(run["meta"].get("and_groups")))
            eps_cols = sorted(table["eps"].unique())
            click.echo(f"\n{name} - {run['protocol']} ({aggregation}, n={int(table['n'].max())}, run {run_id})")
            click.echo(f"{'attack':34s} {'member':>6s} " + " ".join(f"{e:>7.4g}" for e in eps_cols))
            for (attack, member), g in table.groupby(["attack", "member"], sort=False):
                vals = {float(e): a for e, a in zip(g["eps"], g["accuracy"])}
                cells = " ".join(f"{100 * vals[e]:6.1f}%" if e in vals else f"{'':>7s}" for e in eps_cols)
                click.echo(f"{str(attack)[:34]:34s} {int(member):>6d} {cells}")


# ------------------------------------------------------------------------------------------- report
@main.command()
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



# ------------------------------------------------------------------------------------------- derive
@main.command()
@click.argument("entry")
@click.option("--path", "path", default="random", help="'random' or comma-separated gate indices")
@click.option("--count", type=int, default=1, help="how many paths to derive (K-member ensembles too)")
@click.option("--seed", type=int, default=0, help="seed for random paths")
@click.option("--device", default=None)
@click.option("--runs-dir", type=click.Path(), default=None)
@click.option("--fresh", is_flag=True, help="fine-tuned runs built on older derived weights are moved aside and redone")
@memory_format_option
@user_errors
def derive(entry: str, path: str, count: int, seed: int, device: str | None, runs_dir: str | None,
           fresh: bool, memory_format: str) -> None:
    """Derive plain single-path models from a trained random gated network (Ensemble-in-One)."""
    from robbench.eio.derive import derive_paths

    derive_paths(entry, path=path, count=count, seed=seed, device=device, runs_dir=runs_dir, fresh=fresh,
                 memory_format=memory_format)


# --------------------------------------------------------------------------------------------- demo
@main.command()
@click.option("--out", type=click.Path(), default="reports/demo", help="report folder")
@click.option("--smallest", is_flag=True, help="the smallest end-to-end size (used by the tests)")
@click.option("--device", default=None)
@memory_format_option
@user_errors
def demo(out: str, smallest: bool, device: str | None, memory_format: str) -> None:
    """The embedded default: a complete mini benchmark on scikit-learn's digits (resumes if interrupted)."""
    from robbench.demo import run_demo

    run_demo(out=out, smallest=smallest, device=device, memory_format=memory_format)


if __name__ == "__main__":
    main()
