"""The evaluation engine: run a protocol on trained entries and write per-sample outcomes to the store.

``evaluate_protocol`` picks the targets (:mod:`~robbench.evaluate.targets`), and for each one plans the
work (:mod:`~robbench.evaluate.plan`: clean, target, member and transfer units per sample batch),
drops the units already committed (resume), runs the rest (:mod:`~robbench.evaluate.execute`) and
commits each unit's rows with its key in one transaction (:mod:`~robbench.evaluate.commit`). A finished
run is skipped unless ``force``. Transfer sets are made first (:mod:`~robbench.evaluate.sources`).

Kinds of work (stored :class:`~robbench.outcomes.OutcomeKey` columns in brackets):
- target attacks, crafted on the evaluated model [attack, steps for ``record_steps``];
- transfer, sets crafted once on each source, cached content-addressed, read by every target [attack,
  source]; each source's own accuracy is a run of role ``source``;
- member attacks, crafted on member i, tested on every member j and the ensemble [attack, source_member]
  with ``member`` = j (-1: the ensemble).
Clean accuracy is attack ``clean`` at eps 0. In all-or-nothing protocols with ``early_stop`` a sample
already fooled at an eps by an earlier attack is not attacked again at that eps and is recorded as
fooled for the skipped attacks, which keeps the all-or-nothing result exact (run meta says so).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from robbench.attacks.autoattack import streaming as autoattack_streaming
from robbench.checkpoint import RunDir
from robbench.data import load_split
from robbench.device import pick_device
from robbench.distributed import DistEnv
from robbench.errors import UserError
from robbench.evaluate.commit import Committer, RunRecord, init_distributed
from robbench.evaluate.distill_run import evaluate_distillation
from robbench.evaluate.execute import Batch, BatchState, Executor, TransferSets, Work, seconds_per_sample_pass
from robbench.evaluate.plan import (PlannedAttack, TargetPlan, Unit, and_groups, groups_record, plan_attacks,
                                    plan_target, unit_samples)
from robbench.evaluate.protocol import Protocol, load_protocol
from robbench.evaluate.sources import SourceOptions, SourceSets
from robbench.evaluate.targets import (Target, identity_meta, load_target, resolve_targets, run_identity,
                                       select_samples, trained_entries)
from robbench.outcomes import BatchKey
from robbench.store import Store

# the engine's public names: callers pick targets and samples as the engine does
__all__ = ["Settings", "evaluate_protocol", "evaluate_target", "select_samples", "trained_entries"]

EARLY_STOP_NOTE = ("all-or-nothing early stop: a sample fooled by an earlier attack at an eps is not attacked "
                   "again at that eps and is stored as fooled (correct=0, margin NULL) for the skipped attacks; "
                   "the all-or-nothing result is unchanged")
SEEDING_NOTE = ("restart r draws from a generator seeded seed + r; for attacks whose random start is their "
                "generators' only use, on a whole batch, the generator continues over the batches (per eps), as "
                "eval_wbox.py's torch.manual_seed(r) before each restart over the test set; other calls reseed "
                "per call. Either way results do not depend on resume or sharding")


@dataclass
class Settings:
    """How an evaluation runs (the same for every target)."""

    dist: DistEnv
    device: torch.device
    runs_dir: str | Path | None = None
    data_root: str | Path | None = None
    cache_root: Path | None = None
    force: bool = False
    quiet: bool = False
    memory_format: str = "auto"
    store: Store | None = field(default=None, repr=False)

    def say(self, msg: str) -> None:
        if self.dist.is_main and not self.quiet:
            print(msg, flush=True)

    def progress(self, total: int, desc: str) -> Any:
        from tqdm.auto import tqdm  # only when a bar is drawn: tqdm.auto probes for notebooks on import

        return tqdm(total=total, desc=desc, unit="sample", disable=self.quiet or not self.dist.is_main,
                    dynamic_ncols=True, leave=False)


def evaluate_protocol(protocol: str | Protocol, entries: Sequence[str] | None = None, *, n: int | None = None,
                      eps: str | Sequence[float] | None = None, batch_size: int | None = None,
                      overrides: Sequence[str] | None = None, force: bool = False, device: str | None = None,
                      runs_dir: str | Path | None = None, db: str | Path | None = None,
                      data_root: str | Path | None = None, cache_root: str | Path | None = None,
                      quiet: bool = False, memory_format: str = "auto") -> dict[str, int]:
    """Run ``protocol`` on ``entries`` (default: every trained entry it applies to). Returns
    {entry: run_id} (the same on every rank). ``memory_format``: "auto" (checked per model,
    :mod:`robbench.memformat`), "channels_last" or "contiguous"."""
    if isinstance(protocol, Protocol):
        proto = protocol
        if n is not None or eps is not None or batch_size is not None or overrides:
            raise UserError("pass the protocol's name to apply overrides")
    else:
        proto = load_protocol(protocol, list(overrides or []), n=n, eps=eps, batch_size=batch_size)
    dist_env, device = init_distributed(device)
    # the targets first: a wrong entry name is one line and leaves no new store behind
    say = (lambda msg: None) if quiet or not dist_env.is_main else (lambda msg: print(msg, flush=True))
    names = resolve_targets(proto, list(entries or []), runs_dir, say=say)
    for name in names:  # a named run that is not there: its one line before any store exists
        RunDir(runs_dir, name).read_manifest()
    settings = Settings(dist_env, pick_device(device), runs_dir, data_root,
                        Path(cache_root) if cache_root is not None else None, force, quiet, memory_format,
                        Store(db) if dist_env.is_main else None)
    silent = settings.quiet or not dist_env.is_main
    try:
        with contextlib.ExitStack() as stack:
            if silent:  # AutoAttack's live lines follow the engine's own output
                stack.enter_context(autoattack_streaming(None))
            return {name: evaluate_target(proto, name, settings) for name in names}
    finally:
        if settings.store is not None:
            settings.store.close()


def _run_meta(proto: Protocol, t: Target, ids: list[int], settings: Settings, early_stop: bool,
              groups: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        **identity_meta(proto, t, ids, settings),
        "and_groups": groups, "member": proto.member,
        "early_stop": EARLY_STOP_NOTE if early_stop else "off: every attack runs on every sample",
        "seeding": SEEDING_NOTE,
        "eot": ({"randomized": True, "samples": proto.eot_samples, "gradient": "log mean softmax over the draws",
                 "judged": "one seeded draw per restart"} if t.randomized else {"randomized": False}),
    }


def evaluate_target(proto: Protocol, name: str, settings: Settings) -> int:
    """Plan, resume, execute and commit ``proto`` on one entry; returns its run id."""
    t = load_target(name, settings.runs_dir, settings.device, proto.member, settings.memory_format)
    datasets = proto.applies_to.datasets or proto.datasets
    if datasets and t.dataset not in datasets:
        raise UserError(f"protocol {proto.name!r} applies to {', '.join(datasets)}; {name} is a "
                        f"{t.dataset} model", file=proto.source_file, field="datasets")
    if proto.kind == "distillation":  # a measurement, not attacks: its own units (evaluate/distill_run.py)
        return evaluate_distillation(proto, t, settings)
    data = load_split(t.dataset, proto.samples.split, settings.data_root, t.data_options)
    ids = select_samples(proto, data, t.dataset, t, settings.device)
    attacks = plan_attacks(proto)
    sources = list(proto.sources) if any(a.on == "sources" for a in attacks) else []
    early_stop = proto.early_stop and proto.aggregation == "all_or_nothing"
    meta = _run_meta(proto, t, ids, settings, early_stop, groups_record(and_groups(attacks, sources)))
    meta["unit_samples"] = _unit_size(proto, t, data, ids, attacks, settings)
    record = RunRecord(settings.store, settings.dist)
    record.start(run_identity(proto, t), meta, settings.force)
    if record.status == "done":
        settings.say(f"{name}: {proto.name} already done (run {record.run_id}); --force to redo")
        return record.run_id
    # a resumed run keeps the unit it started with, so its committed keys are the plan's
    plan = plan_target(attacks, ids, proto.batch_size, len(t.members), sources, unit=record.unit_samples(proto.batch_size))
    done, committed = record.committed()
    work = Work()
    committer = Committer(settings.store, record.run_id, settings.dist)
    try:
        sets = TransferSets(settings.cache_root, ids)
        if sources:
            src_opts = SourceOptions(settings.runs_dir, settings.device, settings.memory_format, settings.store,
                                     settings.say, settings.progress)
            sets = SourceSets(proto, [a for a in attacks if a.on == "sources"], settings.dist, work,
                              settings.cache_root).ensure(t, data, ids, src_opts)
        _execute(plan, Executor(proto, t, work, early_stop, unit=plan.unit), _Run(t, data, done, committed, committer, settings), sets)
        record.finish({"attack_warnings": sorted(set(work.warnings)), "work": work.record()})
    except BaseException as e:
        record.fail(e)
        raise
    return record.run_id


def batching_invariant(attacks: Sequence[PlannedAttack]) -> bool:
    """Whether every attack crafted on the target (or its members) gives each sample the same result in
    any sample batch: its only randomness is a start drawn from generators continued over the samples
    (``stream_init``). Transfer attacks read stored sets per sample and never matter here."""
    return all(a.caps.stream_init for a in attacks if a.on != "sources")


def _unit_size(proto: Protocol, t: Target, data: Any, ids: list[int], attacks: Sequence[PlannedAttack],
               settings: Settings) -> int:
    """Samples per committed unit: the protocol's batch size, cut so the costliest unit takes about
    30 s on this device (:func:`~robbench.evaluate.plan.unit_samples`), so a kill loses at most that.
    Only where the cut cannot change a result (:func:`batching_invariant`): an attack seeded per call
    (AutoAttack, DI or L2 starts) draws per batch, and its outcomes would depend on the unit size."""
    if not batching_invariant(attacks) or not ids:
        return proto.batch_size
    x, y = data.get(ids[:min(len(ids), proto.batch_size, 32)])
    per_pass = seconds_per_sample_pass(t.model, t.fmt.prepare(x.to(settings.device)), y.to(settings.device))
    return unit_samples(attacks, proto.batch_size, len(t.members), per_pass,
                        proto.eot_samples if t.randomized else 1)


@dataclass
class _Run:
    """One target's run in progress: its data, what is committed, where rows go."""

    t: Target
    data: Any
    done: set[BatchKey]
    committed: Any
    committer: Committer
    settings: Settings

    def rounds(self, plan: TargetPlan, desc: str, work: Callable[[Batch, Callable[[], None]], None],
               units: Callable[[int], int]) -> None:
        """Every sample batch of ``plan`` on its rank (batch b on rank b % world), a commit round each.
        The bar counts (unit, sample) pairs and moves as each unit of work finishes (``units(b)`` units
        in batch b), so a single-batch run still shows progress."""
        dist_env, batches = self.settings.dist, plan.batches
        bar = self.settings.progress(sum(len(batches[b]) * units(b) for b in range(len(batches))), desc)
        for rnd in range(dist_env.rounds(len(batches))):
            b = dist_env.item(rnd)
            if b < len(batches):
                x, y = self.data.get(list(batches[b]))
                n = len(batches[b])
                work(Batch(b, list(batches[b]), self.t.fmt.prepare(x.to(self.settings.device)), y.to(self.settings.device)),
                     lambda n=n: bar.update(n))
            self.committer.flush()
            # the other ranks' batches of this round (rank 0 draws the bar)
            bar.update(sum(len(batches[i]) * units(i) for i in range(rnd * dist_env.world, min(len(batches), (rnd + 1) * dist_env.world))
                           if i != b))
        bar.close()


def _execute(plan: TargetPlan, ex: Executor, run: _Run, sets: TransferSets) -> None:
    """Phase 1 per sample batch: clean, target and member units in protocol order. Phase 2 per transfer
    group (attack x source, all eps): its sets are loaded once and read batch by batch."""

    def batch_units(b: Batch, tick: Callable[[], None]) -> None:
        state = BatchState(len(b.ids), b.x.device)
        for unit in plan.per_batch[b.index]:
            if unit.key in run.done:
                ex.restore(unit, b, run.committed, state)
            elif unit.kind == "clean":
                if ex.proto.clean:
                    run.committer.commit(unit.key, ex.clean(unit, b))
            elif unit.kind == "target":
                run.committer.commit(unit.key, ex.target(unit, b, state))
            else:
                run.committer.commit(unit.key, ex.member(unit, b))
            tick()

    run.rounds(plan, f"{run.t.name} {ex.proto.name}", batch_units, lambda b: len(plan.per_batch[b]))
    for group in plan.transfer:
        if all(u.key in run.done for u in group.units):
            continue
        sets.release()

        def transfer_units(b: Batch, tick: Callable[[], None], units: tuple[Unit, ...] = group.units) -> None:
            unit = units[b.index]
            if unit.key not in run.done:
                run.committer.commit(unit.key, ex.transfer(unit, b, sets))
            tick()

        run.rounds(plan, f"{run.t.name} <- {group.attack.id} from {group.source}", transfer_units, lambda b: 1)
    sets.release()
