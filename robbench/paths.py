"""Where things live. The zoo and protocols ship beside the package; runs and results go under the
current directory unless configured (CLI flags or ROBBENCH_* environment variables)."""
from __future__ import annotations

import errno
import os
from pathlib import Path

from robbench.errors import UserError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
ZOO_DIR = Path(os.environ.get("ROBBENCH_ZOO", PROJECT_ROOT / "zoo"))
PROTOCOLS_DIR = Path(os.environ.get("ROBBENCH_PROTOCOLS", PROJECT_ROOT / "protocols"))


def runs_dir() -> Path:
    return Path(os.environ.get("ROBBENCH_RUNS", "runs"))


def results_db() -> Path:
    return Path(os.environ.get("ROBBENCH_DB", "results/robbench.db"))


def data_root() -> Path:
    return Path(os.environ.get("ROBBENCH_DATA", "data"))


def cache_dir() -> Path:
    """Content-addressed caches (transfer sets)."""
    return Path(os.environ.get("ROBBENCH_CACHE", "cache"))


def filesystem_error(e: OSError, path: str | Path, doing: str) -> UserError:
    """An OS refusal (read-only folder, a path through a file, a full disk) as one line naming the path."""
    why = e.strerror or type(e).__name__
    hint = {errno.EACCES: "choose a writable folder", errno.EROFS: "choose a writable folder",
            errno.EPERM: "choose a writable folder", errno.ENOTDIR: "it or a parent of it is a file, not a folder",
            errno.EEXIST: "it or a parent of it is a file, not a folder", errno.EISDIR: "it is a folder, not a file",
            errno.ENOSPC: "free some space"}.get(e.errno or 0, "check the path")
    where = e.filename if isinstance(e.filename, str) and e.filename else str(path)
    return UserError(f"cannot {doing} ({why}); {hint}", file=where, reason="filesystem")


def ensure_dir(path: str | Path) -> Path:
    """``mkdir -p``; an OS refusal is a one-line :class:`UserError`."""
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
    except FileExistsError as e:  # mkdir over an existing file
        raise filesystem_error(OSError(errno.ENOTDIR, "exists and is not a folder", str(p)), p,
                               "create the folder") from None
    except OSError as e:
        raise filesystem_error(e, p, "create the folder") from None
    return p


def check_writable_dir(path: str | Path, what: str = "folder") -> None:
    """Fail early, in one line, when files cannot be created in ``path`` (or, when it does not exist yet,
    in its nearest existing parent): a read-only folder, or a file where a folder must be. A probe file
    is created and removed, since permission bits say nothing for root or on read-only mounts."""
    p = Path(path)
    probe_in = p
    while not probe_in.exists():
        if probe_in.parent == probe_in:
            return
        probe_in = probe_in.parent
    if not probe_in.is_dir():
        raise filesystem_error(OSError(errno.ENOTDIR, "Not a directory", str(probe_in)), p, f"use it as the {what}")
    probe = probe_in / f".robbench-write-probe-{os.getpid()}"
    try:
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise filesystem_error(OSError(e.errno, e.strerror, str(probe_in)), probe_in, f"write in the {what}") from None
