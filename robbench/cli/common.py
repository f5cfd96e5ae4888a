"""What every command shares: user errors as one line and exit code 2, the --memory-format option."""
from __future__ import annotations

import sys
from functools import wraps
from typing import Any, Callable

import click

from robbench.errors import UserError


class RobbenchGroup(click.Group):
    """The top-level command group: the one place where click's own usage errors are shaped."""


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
