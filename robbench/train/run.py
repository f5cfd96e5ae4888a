"""``robbench train zoo/<entry>``: train one zoo entry into ``<runs_dir>/<entry>/``.

Load and validate the entry (``--set``/``--epochs`` overrides are part of its resolved config and are
recorded in the manifest), seed, build the ensemble, then either
- report a complete run of the same config and return without training,
- resume a partial run from its train state, or
- start fresh, from ``train.init_from``'s trained weights when set (missing -> a one-line error naming
  ``robbench train zoo/<that entry>``),
train with the one loop, and save the final weights and a ``complete`` manifest.

Under ``torchrun`` (WORLD_SIZE > 1) the process group is set up here: gloo on CPU, NCCL on CUDA.
"""
from __future__ import annotations

import random
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from robbench.checkpoint import RunDir, load_trained
from robbench.config import ZooEntry, load_entry
from robbench.device import pick_device
from robbench.distributed import join_process_group
from robbench.errors import CheckpointError, ConfigError, UserError
from robbench.paths import check_writable_dir, data_root as default_data_root
from robbench.registry import METHODS
from robbench.train.loop import DistEnv, dist_env_from_environment, train_loop


def seed_everything(seed: int) -> None:
    """torch (CPU and CUDA), Python ``random`` and numpy (the reference seeds torch and random)."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def _device_for(env: DistEnv, name: str | None) -> torch.device:
    if env.enabled and name is None and torch.cuda.is_available():
        return torch.device("cuda", env.local_rank)
    dev = pick_device(name)
    if env.enabled and dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", env.local_rank)
    return dev


def init_distributed(device_name: str | None) -> tuple[DistEnv, torch.device]:
    env = dist_env_from_environment()
    device = _device_for(env, device_name)
    if env.enabled and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        join_process_group("nccl" if device.type == "cuda" else "gloo")
    return env, device


def load_init_from(entry: ZooEntry, model: torch.nn.Module, runs_dir: Path | str | None,
                   device: torch.device) -> dict[str, Any]:
    """Copy ``train.init_from``'s trained weights into ``model``; returns provenance for the manifest."""
    name = entry.train.init_from
    assert name is not None
    try:
        src, manifest = load_trained(name, runs_dir, device)
    except CheckpointError as e:
        # missing or unfinished runs already name the train command; others get it added
        has_remedy = e.reason in ("checkpoint-missing", "checkpoint-incomplete")
        msg = str(e) if has_remedy else f"{e}; retrain it with: robbench train zoo/{name}"
        raise UserError(f"starts from {name!r}, not usable yet: {msg}", file=entry.source,
                        field="train.init_from") from None
    sd = src.state_dict()
    mine = model.state_dict()
    bad = [k for k in mine if k not in sd or sd[k].shape != mine[k].shape] + [k for k in sd if k not in mine]
    if bad:
        raise ConfigError(f"{name!r} has a different architecture (e.g. {bad[0]}); init_from needs the same "
                          f"model table (arch, members, width)", file=entry.source, field="train.init_from")
    model.load_state_dict(sd)
    return {"entry": name, "weights_sha256": manifest["files"].get("model.safetensors"),
            "entry_sha256": manifest["entry_sha256"]}


def stale_reason(run: RunDir, entry: ZooEntry, runs_dir: Path | str | None) -> str | None:
    """Why the run on disk cannot be resumed or reused for ``entry`` (None when it can): it was made from
    another resolved config, or it started from weights of ``train.init_from`` that have since changed."""
    m = run.read_manifest()
    if m["entry_sha256"] != entry.sha256():
        return (f"holds a run of a different configuration (overrides {m.get('overrides', [])}, now "
                f"{list(entry.overrides)})")
    started = (m.get("extra") or {}).get("init_from") or {}
    src = RunDir(runs_dir, started["entry"]) if started.get("entry") else None
    if src is not None and src.exists():
        now = src.read_manifest().get("files", {}).get("model.safetensors")
        if now is not None and started.get("weights_sha256") not in (None, now):
            return f"started from older weights of {started['entry']!r} (it was retrained since)"
    return None


def train_entry(spec: str, overrides: list[str] | None = None, device: str | None = None,
                runs_dir: str | Path | None = None, data_root: str | Path | None = None,
                progress: bool = True, fresh: bool = False, memory_format: str = "auto",
                labels: dict[str, str] | None = None) -> dict[str, Any]:
    """Train (or resume, or confirm) one zoo entry; returns the run's manifest (rank 0's view).

    A run on disk that is stale (:func:`stale_reason`) is an error, or with ``fresh`` is moved aside to
    ``runs/<entry>.stale-<time>`` (kept, never deleted) and trained anew. ``memory_format`` ("auto",
    "channels_last", "contiguous") is chosen by :func:`robbench.memformat.choose_memory_format` and
    recorded in the manifest. ``labels``: overrides that came from a flag (``--epochs``), named by errors."""
    from robbench.memformat import choose_memory_format
    from robbench.data import get_info
    from robbench.models import build_model

    entry = load_entry(spec, overrides, labels)
    method_cls = METHODS.get(entry.train.method, file=entry.source, field="train.method")
    if getattr(method_cls, "needs_init_from", False) and not entry.train.init_from:
        raise ConfigError(f"method {entry.train.method!r} starts from a trained model; set train.init_from",
                          file=entry.source, field="train.init_from")
    if entry.train.init_from == entry.name:
        raise ConfigError("an entry cannot start from itself", file=entry.source, field="train.init_from")
    env, dev = init_distributed(device)
    try:
        run = RunDir(runs_dir, entry.name)
        # a damaged run (tampered or corrupt files, files without a manifest) is never trained on
        damage = run.damage()
        if damage is not None and not fresh:
            raise damage
        if damage is not None:  # with --fresh: moved aside like a stale run, said in one line
            reason: str | None = f"{Path(damage.file).name if damage.file else 'the run'} is unusable ({damage.reason})"
        else:
            reason = stale_reason(run, entry, runs_dir) if run.exists() else None
        if reason and not fresh:
            raise CheckpointError(f"{reason}; rerun with --fresh to move it aside and train anew",
                                  file=str(run.manifest_path))
        if reason:
            if env.is_main:
                moved = run.move_aside()
                print(f"{entry.name}: {reason}; moved it to {moved}", file=sys.stderr)
            env.barrier()
        if run.exists():
            m = run.read_manifest()
            if m["status"] == "complete":
                if env.is_main:
                    print(f"{entry.name}: already trained ({m.get('epochs_done')} epochs) in {run.path}; "
                          "nothing to do", file=sys.stderr)
                return m
        # an unwritable runs folder or run folder is one line before any work
        if env.is_main:
            check_writable_dir(run.path if run.path.is_dir() else run.root, "runs folder")
        # missing data is a one-line error before anything is written under runs/ (load_split caches,
        # so the loop reuses these)
        from robbench.data import load_split

        for split in ("train", "test"):
            load_split(entry.data.dataset, split, entry.data.root or data_root, entry.data.options)
        seed_everything(entry.train.seed)
        info = get_info(entry.data.dataset, entry.data.options)
        model = build_model(entry, info).to(dev)
        method = method_cls(entry.method_params)

        resuming = run.exists() and "train_state.pt" in run.read_manifest().get("files", {})
        fmt = choose_memory_format(model, (info.in_channels, info.image_size, info.image_size), dev,
                                   memory_format, what=entry.name,
                                   batch_size=max(1, entry.data.batch_size // env.world_size))
        extra: dict[str, Any] = {"device": str(dev), "world_size": env.world_size,
                                 "memory_format": fmt.as_record()}
        if entry.train.init_from and not resuming:
            extra["init_from"] = load_init_from(entry, model, runs_dir, dev)
        if env.is_main:
            run.begin(entry, extra=extra)  # a run of another config here is a one-line error
        env.barrier()
        if env.enabled:  # after identical init: per-rank randomness (noise, random starts) differs
            seed_everything(entry.train.seed + 1000003 * env.rank)

        # the runs folder and data root resolved here reach the method (TrainContext.runs_dir/data_root)
        result = train_loop(entry, model, method, run, device=dev,
                            data_root=Path(data_root) if data_root is not None else default_data_root(),
                            env=env, progress=progress, memory_format=fmt, runs_dir=run.root)
        manifest: dict[str, Any] = {}
        last = result.last or (run.read_log()[-1] if env.is_main and run.read_log() else {})
        if env.is_main:
            manifest = run.save_final(model, entry, extra={
                "rank_weights_sha256": result.rank_weights_sha256,
                "final_test_acc": last.get("test_acc"),
                "final_member_test_acc": last.get("member_test_acc"),
            }, epochs_done=result.epochs_done)
            print(f"{entry.name}: complete ({result.epochs_done} epochs) -> {run.path}", file=sys.stderr)
        env.barrier()
        return manifest
    finally:
        if env.enabled and dist.is_initialized():
            dist.destroy_process_group()
