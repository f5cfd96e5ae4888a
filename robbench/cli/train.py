"""``robbench train``, ``derive`` and ``demo``: commands that produce trained runs."""
from __future__ import annotations

import click

from robbench.cli.common import memory_format_option, user_errors


@click.command()
@click.argument("entry")
@click.option("--set", "overrides", multiple=True,
              help="override a field: key=value (TOML value, recorded in the manifest), e.g. train.epochs=3")
@click.option("--epochs", type=int, default=None, help="override train.epochs (a --set of it with another value is refused)")
@click.option("--device", default=None, help="cpu, cuda, cuda:K (default: cuda when present)")
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

    flags = {f"train.epochs={epochs}": f"--epochs {epochs}"} if epochs is not None else {}
    train_entry(entry, overrides=list(overrides) + list(flags), device=device, runs_dir=runs_dir,
                data_root=data_root, fresh=fresh, memory_format=memory_format, labels=flags)


@click.command()
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


@click.command()
@click.option("--out", type=click.Path(), default="reports/demo", help="report folder")
@click.option("--smallest", is_flag=True, help="the smallest end-to-end size (used by the tests)")
@click.option("--device", default=None)
@memory_format_option
@user_errors
def demo(out: str, smallest: bool, device: str | None, memory_format: str) -> None:
    """The embedded default: a complete mini benchmark on scikit-learn's digits (resumes if interrupted)."""
    from robbench.demo import run_demo

    run_demo(out=out, smallest=smallest, device=device, memory_format=memory_format)

