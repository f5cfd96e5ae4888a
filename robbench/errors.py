"""User-facing errors: the CLI prints these as one line and exits with code 2."""
from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix (bad config, unknown name, missing data, wrong checkpoint).

    The message must name the file, the field and what is allowed. The CLI prints
    ``error: <message>`` and exits with code 2, never a traceback.
    """

    def __init__(self, message: str, *, file: str | None = None, field: str | None = None) -> None:
        self.file = file
        self.field = field
        where = ": ".join(p for p in (file, field) if p)
        super().__init__(f"{where}: {message}" if where else message)


class ConfigError(UserError):
    """A zoo entry, protocol or override that does not validate."""


class CheckpointError(UserError):
    """A checkpoint that is missing, corrupt, tampered with or of the wrong architecture."""


class DataError(UserError):
    """A dataset that is missing on disk (and cannot be downloaded) or malformed."""
