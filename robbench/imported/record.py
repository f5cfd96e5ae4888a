"""Imported runs: a run directory holding weights robbench did not train (the user's own model, a paper's
released checkpoint). Its manifest says ``"origin": "imported"`` and records where the model came from
(``imported``: factory, source_sha256, weights_file, weights_sha256, ...), never a training config.

The run is written into a temporary folder beside its final place and renamed into place complete, so a
failed import leaves nothing behind. Trained runs have ``"origin": "trained"`` (absent means trained).
"""
from __future__ import annotations

import datetime as _dt
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

from torch import nn

from robbench.checkpoint import (MANIFEST_FORMAT, WEIGHTS, RunDir, atomic_write_json, git_commit,
                                 library_versions, save_state_dict_file, state_dict_for_save)
from robbench.errors import CheckpointError, UserError
from robbench.schema import config_hash

ORIGIN_IMPORTED = "imported"
ORIGIN_TRAINED = "trained"


def origin_of(manifest: Mapping[str, Any]) -> str:
    """``imported`` or ``trained`` (manifests written before origins existed are trained runs)."""
    return str(manifest.get("origin") or ORIGIN_TRAINED)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def imported_config(raw: Mapping[str, Any]) -> dict[str, Any]:
    """The config an imported run records: the entry's tables without ``train`` (nothing was trained)."""
    return {k: v for k, v in raw.items() if k != "train"}


def write_imported_run(runs_dir: str | Path | None, name: str, config: Mapping[str, Any], model: nn.Module,
                       imported: Mapping[str, Any], *, force: bool = False) -> RunDir:
    """Write ``<runs_dir>/<name>/`` (weights + manifest) as one rename; an existing run is refused unless
    ``force`` (which moves it aside as ``<name>.stale-<time>``, kept)."""
    run = RunDir(runs_dir, name)
    if run.path.exists() and not force:
        raise UserError(f"a run named {name!r} exists already; pick another name or pass --force (the old "
                        "run is moved aside, not deleted)", file=str(run.path))
    run.root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.importing-", dir=run.root))
    try:
        sha = save_state_dict_file(tmp / WEIGHTS, state_dict_for_save(model),
                                   {"entry": name, "origin": ORIGIN_IMPORTED})
        commit, dirty = git_commit()
        cfg = dict(config)
        manifest = {
            "format": MANIFEST_FORMAT, "entry": name, "origin": ORIGIN_IMPORTED, "imported": dict(imported),
            "config": cfg, "entry_sha256": config_hash(cfg), "overrides": [], "status": "complete",
            "files": {WEIGHTS: sha}, "versions": library_versions(), "git_commit": commit, "git_dirty": dirty,
            "created": _now(), "finished": _now(), "updated": _now(), "extra": {},
        }
        atomic_write_json(tmp / "manifest.json", manifest)
        if run.path.exists():
            run.move_aside()
        os.replace(tmp, run.path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return run


def verify_imported_source(manifest: Mapping[str, Any], file: str) -> None:
    """An imported run built from a user factory: its source file must still hash to what was recorded
    (the weights' own hash is checked by the checkpoint loader)."""
    if origin_of(manifest) != ORIGIN_IMPORTED:
        return
    imp = manifest.get("imported") or {}
    recorded = imp.get("source_sha256")
    factory = imp.get("factory")
    if not recorded or not factory:
        return
    from robbench.models.user_code import is_factory_name, parse_factory, source_sha256

    if not is_factory_name(factory):
        return
    now = source_sha256(parse_factory(factory), file=file)
    if now != recorded:
        raise CheckpointError(f"the model source of {factory} changed since it was added (sha256 {now[:12]}…, "
                              f"recorded {recorded[:12]}…); add it again with: robbench add <entry.toml> --force",
                              file=file, field="imported.source_sha256", reason="checkpoint-hash")
