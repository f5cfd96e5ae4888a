"""Which entries a protocol evaluates, loading each as an evaluation target, and its samples."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from robbench.checkpoint import (RunDir, checkpoint_sha256, entry_from_manifest, entry_name, load_trained,
                                 run_dirs)
from robbench.config import ZooEntry, list_entries, load_entry
from robbench.data import get_info
from robbench.data.subsets import dverge_subset, indices_sha256, make_subset
from robbench.errors import CheckpointError, ConfigError, DataError, UserError
from robbench.evaluate.protocol import Protocol
from robbench.imported import origin_of, verify_imported_source
from robbench.memformat import FormatChoice, choose_memory_format
from robbench.models.eot import is_randomized


@dataclass
class Target:
    """A trained entry loaded for evaluation: in eval mode, frozen, in its own memory format (inputs
    must be prepared with ``fmt.prepare``)."""

    name: str
    model: nn.Module
    manifest: dict[str, Any]
    entry: ZooEntry
    checkpoint_sha256: str
    fmt: FormatChoice
    randomized: bool = False

    @property
    def dataset(self) -> str:
        return self.entry.data.dataset

    @property
    def data_options(self) -> dict[str, Any]:
        return dict(self.entry.data.options or {})

    @property
    def origin(self) -> str:
        """``trained`` (by robbench) or ``imported`` (robbench add / convert / robbench.evaluate(model))."""
        return origin_of(self.manifest)

    @property
    def members(self) -> list[nn.Module]:
        members = getattr(self.model, "members", None)
        return list(members) if members is not None else [self.model]


def load_target(name: str, runs_dir: str | Path | None, device: torch.device, member: int | None = None,
                memory_format: str = "auto") -> Target:
    """Load run ``name`` (its member ``member`` alone when given) for evaluation on ``device``. An imported
    run's model source must still hash to what ``robbench add`` recorded."""
    run = RunDir(runs_dir, name)
    verify_imported_source(run.read_manifest(), str(run.manifest_path))
    model, manifest = load_trained(name, runs_dir, device)
    entry = entry_from_manifest(manifest, str(run.manifest_path))
    if member is not None:
        members = getattr(model, "members", None)
        if members is None or member >= len(members):
            n = len(members) if members is not None else 1
            raise ConfigError(f"{name} has {n} member(s); allowed: 0..{n - 1}", field="member")
        model = members[member]
    model = model.eval()
    info = get_info(entry.data.dataset, entry.data.options)
    fmt = choose_memory_format(model, (info.in_channels, info.image_size, info.image_size), device,
                               memory_format, what=name)
    model = model.to(memory_format=fmt.format)
    for p in model.parameters():
        p.requires_grad_(False)
    return Target(name, model, manifest, entry, checkpoint_sha256(run), fmt, is_randomized(model))


def scan_runs(runs_dir: str | Path | None) -> tuple[list[tuple[str, ZooEntry]], list[tuple[str, str]]]:
    """(name, ZooEntry from the manifest) of every complete run under ``runs_dir``, and (name, why) of
    every run that cannot be evaluated (training unfinished, manifest unreadable, model not rebuildable)."""
    out, skipped = [], []
    for run in run_dirs(runs_dir):
        try:
            m = run.read_manifest()
            if m["status"] != "complete":
                skipped.append((run.name, f"training not complete (epoch {m.get('epochs_done', '?')} of "
                                          f"{m.get('epochs', '?')})"))
                continue
            verify_imported_source(m, str(run.manifest_path))
            out.append((run.name, entry_from_manifest(m, str(run.manifest_path))))
        except (CheckpointError, ConfigError) as e:
            skipped.append((run.name, e.detail))
    return out, skipped


def trained_entries(runs_dir: str | Path | None) -> list[tuple[str, ZooEntry]]:
    """(name, ZooEntry from the manifest) of every complete run under ``runs_dir`` (trained or imported)."""
    return scan_runs(runs_dir)[0]


def skipped_line(skipped: Sequence[tuple[str, str]], limit: int = 5) -> str:
    """``skipped 2 run(s): a (why), b (why)`` for the runs a protocol could not consider."""
    parts = [f"{n} ({why})" for n, why in skipped[:limit]]
    more = f" (+{len(skipped) - limit} more)" if len(skipped) > limit else ""
    return f"skipped {len(skipped)} run(s) that cannot be evaluated: {'; '.join(parts)}{more}"


def resolve_targets(proto: Protocol, entries: Sequence[str], runs_dir: str | Path | None,
                    say: Any = None) -> list[str]:
    """Named entries, or every trained entry the protocol applies to (none: say which to train). Runs
    that cannot be loaded are named with the reason (``say`` gets that line when others remain)."""
    if entries:
        for e in entries:
            if isinstance(e, nn.Module):
                raise UserError(f"entries are run names; evaluate a {type(e).__name__} object with "
                                "robbench.evaluate(model, protocol=..., name=...) (it imports the module as a run)",
                                field="entries")
        return [entry_name(e) for e in entries]
    found, skipped = scan_runs(runs_dir)
    names = [n for n, e in found if proto.applies(e)]
    if names:
        if skipped and say is not None:
            say(skipped_line(skipped))
        return names
    todo = []
    for n in list_entries():
        try:
            e = load_entry(n)
        except UserError:
            continue
        if proto.applies(e):
            todo.append(n)
    hint = ("; train one first: " + ", ".join(f"robbench train zoo/{n}" for n in todo[:6])
            + (f" (+{len(todo) - 6} more)" if len(todo) > 6 else "")) if todo else "; no zoo entry matches its applies_to"
    also = f"; {skipped_line(skipped)}" if skipped else ""
    raise UserError(f"protocol {proto.name!r}: no trained entry it applies to under "
                    f"{runs_dir or 'runs'}{also}{hint}", file=proto.source_file, field="applies_to")


def run_identity(proto: Protocol, t: Target) -> dict[str, Any]:
    """The key of an evaluation run in the store: which weights, which protocol (and its hash), how."""
    return {"entry": t.name, "checkpoint_sha256": t.checkpoint_sha256, "protocol": proto.name,
            "protocol_sha256": proto.sha256(), "overrides": proto.overrides, "seed": proto.seed}


def identity_meta(proto: Protocol, t: Target, ids: list[int], settings: Any) -> dict[str, Any]:
    """What every evaluation run records about its target, protocol, sample set and device (attack runs
    and measurement runs alike); ``settings`` has ``dist`` and ``device``."""
    imported = t.manifest.get("imported") or {}
    return {
        "origin": t.origin,
        **({"imported": {k: imported.get(k) for k in ("factory", "source_sha256", "weights_sha256", "kind")}}
           if t.origin == "imported" else {}),
        "protocol": proto.resolved(), "protocol_file": proto.source_file,
        "samples": {"selection": proto.samples.selection, "n": len(ids), "split": proto.samples.split,
                    "seed": proto.samples.seed, "sha256": indices_sha256(ids), "dataset": t.dataset},
        "world_size": settings.dist.world, "device": str(settings.device), "memory_format": t.fmt.as_record(),
    }


def member_predictions(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """[M, B] predicted classes of every member."""
    if hasattr(model, "member_logits"):
        return model.member_logits(x).argmax(-1)
    return model(x).argmax(-1).unsqueeze(0)


def select_samples(proto: Protocol, data: Any, dataset: str, target: Target | None = None,
                   device: torch.device | None = None) -> list[int]:
    """Sample ids per ``proto.samples`` ('all_correct' needs the target: samples every member gets right)."""
    s = proto.samples
    size = len(data) if s.pool is None else min(int(s.pool), len(data))
    try:
        if s.selection != "all_correct":
            n = None if s.selection == "all" else s.n
            return list(make_subset(s.selection, dataset, s.split, n, s.seed, size=size).indices)
        if target is None or device is None:
            raise ValueError("selection 'all_correct' needs the target model")
        correct: list[int] = []
        with torch.no_grad():
            for start in range(0, size, proto.batch_size):
                ids = list(range(start, min(size, start + proto.batch_size)))
                x, y = data.get(ids)
                x, y = target.fmt.prepare(x.to(device)), y.to(device)
                ok = member_predictions(target.model, x).eq(y.unsqueeze(0)).all(0)
                correct.extend(i for i, o in zip(ids, ok.tolist()) if o)
        return dverge_subset(s.n, correct, s.seed)
    except DataError as e:
        raise ConfigError(e.detail, file=proto.source_file, field="samples.n") from None
