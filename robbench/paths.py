"""Where things live. The zoo and protocols ship beside the package; runs and results go under the
current directory unless configured (CLI flags or ROBBENCH_* environment variables)."""
from __future__ import annotations

import os
from pathlib import Path

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
