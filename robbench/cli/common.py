"""What every command shares: user errors as one line and exit code 2, the --memory-format option."""
from __future__ import annotations

import sys
from functools import wraps
from typing import Any, Callable

import click

from robbench.errors import UserError


class RobbenchGroup(click.Group):
    """The top-level command group: the one place where click's own usage errors are shaped.

    click prints a usage error as four lines (usage, a hint, a blank line, the error); robbench prints
    every user error as one line and exits with code 2, so these get the same form:
    ``error: robbench evaluate: No such option: --bogus (see robbench evaluate --help)``."""

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.UsageError as e:
            where = e.ctx.command_path if e.ctx is not None else (prog_name or "robbench")
            msg = " ".join(e.format_message().split())
            click.echo(f"error: {where}: {msg} (see {where} --help)", err=True)
            sys.exit(2)
        except click.ClickException as e:  # e.g. a file option that cannot be opened
            click.echo(f"error: {' '.join(e.format_message().split())}", err=True)
            sys.exit(e.exit_code)
        except click.Abort:
            click.echo("aborted", err=True)
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)


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


def memory_format_option(f):  # type: ignore[no-untyped-def]
    """--memory-format: auto checks each model's gradients in both formats (robbench.memformat)."""
    return click.option("--memory-format", "memory_format", type=click.Choice(["auto", "channels_last", "contiguous"]),
                        default="auto", show_default=True,
                        help="tensor layout; auto compares gradients in both layouts per model and uses "
                             "channels_last only where they agree")(f)
