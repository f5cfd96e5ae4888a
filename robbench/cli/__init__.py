"""The ``robbench`` command line: one module per command family, assembled here. User errors print one line
and exit with code 2 (:func:`robbench.cli.common.user_errors`)."""
from __future__ import annotations

import click

from robbench.cli import add, catalog, convert, evaluate, report, results, train
from robbench.cli.common import RobbenchGroup


@click.group(cls=RobbenchGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="robbench")
def main() -> None:
    """robbench: train paper zoo entries, run attack protocols, report against published numbers."""


main.add_command(catalog.zoo)
main.add_command(catalog.protocols)
main.add_command(train.train)
main.add_command(evaluate.evaluate)
main.add_command(report.report)
main.add_command(train.derive)
main.add_command(train.demo)
main.add_command(add.add)
main.add_command(convert.convert)
main.add_command(results.results)


if __name__ == "__main__":
    main()
