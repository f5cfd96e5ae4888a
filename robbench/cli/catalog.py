"""``robbench zoo`` and ``robbench protocols``: list and show entries and attack suites."""
from __future__ import annotations

import json

import click

from robbench.cli.common import user_errors


@click.group()
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


@click.group()
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


SET_PROTOCOL_HELP = ("override a protocol field: key=value (TOML value), e.g. samples.n=50; an attack's "
                     "table by its id: attacks.<id>.<param>=v sets one of its parameters (attacks.aa.n_iter=10, "
                     "= attacks.aa.params.n_iter=10), attacks.<id>.eps=[0.1] a field of the table")


@protocols.command("show")
@click.argument("name")
@click.option("--set", "overrides", multiple=True, help=SET_PROTOCOL_HELP)
@user_errors
def protocols_show(name: str, overrides: tuple[str, ...]) -> None:
    """Show a protocol as resolved (extends merged, overrides applied, attack defaults filled)."""
    from robbench.evaluate.protocol import load_protocol

    click.echo(json.dumps(load_protocol(name, list(overrides)).resolved(), indent=2))
