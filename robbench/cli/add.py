"""``robbench add``: the user's own model (factory + weights, named in a zoo-style file) as an imported run."""
from __future__ import annotations

import click

from robbench.cli.common import user_errors


@click.command(short_help="Import your own model (factory in your code + weights) as a run.")
@click.argument("entry")
@click.option("--name", default=None, help="run name (default: the file's 'name', else its file name)")
@click.option("--runs-dir", type=click.Path(), default=None, help="where runs live (default $ROBBENCH_RUNS or ./runs)")
@click.option("--force", is_flag=True, help="replace a run of the same name (the old one is moved aside, kept)")
@user_errors
def add(entry: str, name: str | None, runs_dir: str | None, force: bool) -> None:
    """Import your own model: ENTRY is a zoo-style TOML file whose model.arch names a factory in your code
    (python:pkg.module:Factory or file:path.py:Factory), model.options its keyword options and
    model.weights the trained weights (.safetensors, or a .pt state dict loaded with weights_only=True).
    The factory's source and the weights are hashed; nothing is written unless everything checks out."""
    from robbench.imported.add import add_entry

    res = add_entry(entry, runs_dir=runs_dir, name=name, force=force)
    imp = res.manifest_imported
    click.echo(f"added {res.name} -> {res.path} (imported: {imp['factory']}, weights sha256 "
               f"{imp['weights_sha256'][:12]}…" + (f", source sha256 {imp['source_sha256'][:12]}…" if imp.get("source_sha256") else "")
               + ")")
    for w in res.warnings:
        click.echo(f"warning: {w}", err=True)
    click.echo(f"evaluate it with: robbench evaluate --protocol <protocol> {res.name}")
