"""User-facing errors: the CLI prints these as one line and exits with code 2.

Every error carries a ``reason``: a short code that callers branch on (never on the message text,
which is for people and may be reworded). The codes in use are listed in :data:`REASONS`.
"""
from __future__ import annotations

REASONS = {
    "config": "a zoo entry, protocol, view or override that does not validate",
    "checkpoint-missing": "no trained checkpoint (or manifest) for an entry",
    "checkpoint-incomplete": "a run directory whose training has not finished",
    "checkpoint-hash": "a file whose sha256 differs from the manifest's (corrupt or tampered with)",
    "checkpoint-architecture": "weights that do not fit the entry's architecture",
    "checkpoint": "any other unusable checkpoint",
    "data": "a dataset that is missing or malformed",
    "store-locked": "the results store is locked by another process",
    "store-version": "a results store of a version this robbench cannot read or migrate",
    "store-migration": "a results store whose contents cannot be migrated",
    "store": "a file that is not a usable results store",
    "store-damaged": "a results store whose SQLite file is damaged (recover it or use another)",
    "store-foreign": "an SQLite file that is not a robbench results store",
    "store-readonly": "a results store that cannot be written",
    "filesystem": "a path that cannot be read or written (read-only, a file where a folder goes, disk full)",
    "device": "a device name that is not valid or not present on this machine",
    "conflict": "two overrides (flags or --set) that give one field different values",
    "user": "any other user mistake",
}


class UserError(Exception):
    """A mistake the user can fix (bad config, unknown name, missing data, wrong checkpoint).

    The message must name the file, the field and what is allowed. The CLI prints
    ``error: <message>`` and exits with code 2, never a traceback.
    """

    default_reason = "user"

    def __init__(self, message: str, *, file: str | None = None, field: str | None = None,
                 reason: str | None = None) -> None:
        self.file = file
        self.field = field
        self.detail = message
        self.reason = reason or self.default_reason
        if self.reason not in REASONS:
            raise ValueError(f"unknown error reason {self.reason!r}; known: {', '.join(REASONS)}")
        where = ": ".join(p for p in (file, field) if p)
        super().__init__(f"{where}: {message}" if where else message)


class ConfigError(UserError):
    """A zoo entry, protocol or override that does not validate."""

    default_reason = "config"


class CheckpointError(UserError):
    """A checkpoint that is missing, corrupt, tampered with or of the wrong architecture."""

    default_reason = "checkpoint"


class DataError(UserError):
    """A dataset that is missing on disk (and cannot be downloaded) or malformed."""

    default_reason = "data"
