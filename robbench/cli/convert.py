"""``robbench convert``: a paper's released checkpoint (or transfer sets) into what robbench evaluates."""
from __future__ import annotations

import click

from robbench.cli.common import user_errors

KINDS = ("eio-rgn", "dverge-ensemble", "dverge-transfer")


@click.command(short_help="Convert a paper's released checkpoint or transfer sets into runs.")
@click.argument("kind", type=click.Choice(KINDS))
@click.argument("path", type=click.Path())
@click.option("--name", required=True, help="name of the run (or, for dverge-transfer, prefix of the sources) to write")
@click.option("--like", default=None,
              help="zoo entry whose architecture the file has (default: eio_resnet20 for eio-rgn, "
                   "baseline_resnet20_x3 for dverge-ensemble; GAL ensembles: gal_resnet20_x3, LeakyReLU(0.1))")
@click.option("--runs-dir", type=click.Path(), default=None, help="where runs live (default $ROBBENCH_RUNS or ./runs)")
@click.option("--cache-dir", type=click.Path(), default=None,
              help="dverge-transfer: transfer-set cache (default $ROBBENCH_CACHE/transfer or ./cache/transfer)")
@click.option("--dataset", default="cifar10", show_default=True,
              help="dverge-transfer: the dataset the sets were drawn from (their labels are checked against it)")
@click.option("--data-root", type=click.Path(), default=None, help="dverge-transfer: dataset folder (default ./data)")
@click.option("--force", is_flag=True, help="replace a run of the same name (the old one is moved aside, kept)")
@user_errors
def convert(kind: str, path: str, name: str, like: str | None, runs_dir: str | None, cache_dir: str | None,
            dataset: str, data_root: str | None, force: bool) -> None:
    """Convert a paper's released file into an imported run robbench evaluates.

    \b
    eio-rgn          Ensemble-in-One model.pth.tar (random gated network; shared convs -> share_conv = true)
    dverge-ensemble  DVERGE epoch_<e>.pth ({'model_0': sd, ...}), one run with every member
    dverge-transfer  DVERGE transfer_adv_examples/ folder (eps_<e>/from_<source>/{inputs,labels}.pt)
    """
    from robbench.imported import converters

    if kind == "dverge-transfer":
        from robbench.imported.transfer_sets import import_dverge_transfer

        res = import_dverge_transfer(path, name, dataset=dataset, cache_root=cache_dir, data_root=data_root)
        click.echo(res.summary())
        return
    if kind == "eio-rgn":
        out = converters.convert_eio_rgn(path, name, like=like or "eio_resnet20", runs_dir=runs_dir, force=force)
    else:
        out = converters.convert_dverge_ensemble(path, name, like=like or "baseline_resnet20_x3", runs_dir=runs_dir,
                                                 force=force)
    click.echo(f"converted {path} -> {out.path} (imported, like {out.manifest_imported['like']}, weights sha256 "
               f"{out.manifest_imported['weights_sha256'][:12]}…)")
    for w in out.warnings:
        click.echo(f"warning: {w}", err=True)
    click.echo(f"evaluate it with: robbench evaluate --protocol <protocol> {out.name}")
