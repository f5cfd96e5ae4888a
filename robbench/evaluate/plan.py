"""The evaluation plan: protocol + target + samples -> typed work units, without torch.

Each unit is one attack (as crafted on the target, on member i, or read from a source's transfer
sets) on one sample batch, and commits to the store in one transaction under its
:class:`~robbench.outcomes.BatchKey`. Resuming is "the plan minus the keys already committed"; the
executor (:mod:`robbench.evaluate.execute`) runs a unit and returns its rows; the committer
(:mod:`robbench.evaluate.commit`) writes them.

What an attack supports comes from its declared :class:`~robbench.attacks.capabilities.Capabilities`;
the plan reads nothing of its options.

Bounded units. A kill loses the unit in flight, so a unit must be short: :func:`unit_samples` sizes the
sample batches of a plan (at most the protocol's ``batch_size``) so the costliest unit takes about
:data:`UNIT_SECONDS` on the device, from the declared work per sample (steps, restarts, eps, members)
and one measured forward-backward pass. Outcomes do not depend on the batching (sample draws, random
starts and targets follow the sample order, not the batch), so this only changes how much a kill loses.
A run keeps the unit size it started with (recorded in its meta), so a resume sees the same keys.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Sequence

from robbench.attacks.capabilities import NO_CAPABILITIES, Capabilities
from robbench.evaluate.protocol import AttackSpec, Protocol
from robbench.outcomes import CLEAN_ATTACK, FINAL, NO_MEMBER, NO_SOURCE, BatchKey, OutcomeKey
from robbench.registry import ATTACKS

Where = Literal["target", "sources", "members"]
UNIT_SECONDS = 30.0  # the most work a kill may lose (issue: "a unit takes <= 30 s on the current device")


@dataclass(frozen=True)
class PlannedAttack:
    """One attack of the protocol with what it supports and where it is crafted."""

    spec: AttackSpec
    caps: Capabilities
    on: Where
    eps: tuple[float, ...]

    @property
    def id(self) -> str:
        return self.spec.id

    @property
    def options(self) -> Any:
        return self.spec.params_parsed

    def stored(self, source: str = NO_SOURCE) -> list[tuple[int | None, OutcomeKey]]:
        """(K or None, key) of the rows one run writes: one per recorded step count, and the final
        result unless the final step count is itself recorded."""
        rec = list(self.caps.record_steps)
        out: list[tuple[int | None, OutcomeKey]] = [(k, OutcomeKey(self.id, source, steps=k)) for k in rec]
        if self.caps.steps is None or self.caps.steps not in rec:
            out.append((None, OutcomeKey(self.id, source)))
        return out

    def final(self, source: str = NO_SOURCE) -> OutcomeKey:
        """The key holding the attack's final result."""
        rec = self.caps.record_steps
        steps = self.caps.steps if self.caps.steps is not None and self.caps.steps in rec else FINAL
        return OutcomeKey(self.id, source, steps=steps)


def plan_attacks(proto: Protocol) -> list[PlannedAttack]:
    out = []
    for spec in proto.attacks:
        caps = ATTACKS.capabilities(spec.attack, spec.params_parsed) or NO_CAPABILITIES
        out.append(PlannedAttack(spec, caps, proto.attack_on(spec), tuple(proto.attack_eps(spec))))  # type: ignore[arg-type]
    return out


@dataclass(frozen=True)
class Unit:
    """One unit of work on one sample batch: ``kind`` clean, target (crafted on the evaluated model),
    member (crafted on member ``member``, tested on every member and the whole model) or transfer
    (the sets of ``source`` read and tested)."""

    kind: Literal["clean", "target", "member", "transfer"]
    batch: int
    attack: PlannedAttack | None = None
    member: int = NO_MEMBER
    source: str = NO_SOURCE

    @property
    def key(self) -> BatchKey:
        name = CLEAN_ATTACK if self.attack is None else self.attack.id
        return BatchKey(name, self.source, self.member, self.batch)


@dataclass(frozen=True)
class TransferGroup:
    """One attack's sets from one source, read batch by batch (loaded once per target)."""

    attack: PlannedAttack
    source: str
    units: tuple[Unit, ...]


@dataclass(frozen=True)
class TargetPlan:
    """All work on one target: per sample batch, the clean unit and the target and member attacks in
    protocol order (early stop carries state from one to the next); then each transfer group."""

    batches: tuple[tuple[int, ...], ...]
    per_batch: tuple[tuple[Unit, ...], ...]
    transfer: tuple[TransferGroup, ...]
    unit: int = 0  # samples per batch (the last one may hold fewer)

    def keys(self) -> set[BatchKey]:
        units = [u for b in self.per_batch for u in b] + [u for g in self.transfer for u in g.units]
        return {u.key for u in units}

    def remaining(self, done: set[BatchKey]) -> set[BatchKey]:
        return self.keys() - set(done)


def sample_batches(ids: Sequence[int], size: int) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(ids[i:i + size]) for i in range(0, len(ids), size))


def unit_passes(attack: PlannedAttack, members: int, eot_samples: int = 1) -> float:
    """Forward-backward passes per sample of one unit of ``attack`` through one model (the target as a
    whole, or one member for attacks crafted on members): (steps + 1) x restarts x eps x EOT draws;
    member units add a test pass through every member."""
    caps = attack.caps
    per_eps = ((caps.steps if caps.steps is not None else 1) + 1) * max(1, caps.restarts)
    passes = per_eps * max(1, len(attack.eps)) * max(1, eot_samples) * max(1, attack.spec.restarts_as_runs or 1)
    return float(passes + (members if attack.on == "members" else 0))


def unit_samples(attacks: Sequence[PlannedAttack], batch_size: int, members: int, seconds_per_pass: float | None,
                 eot_samples: int = 1, budget: float = UNIT_SECONDS) -> int:
    """Samples per unit so the costliest unit of ``attacks`` takes about ``budget`` seconds, given the
    measured ``seconds_per_pass`` (one forward-backward pass of one sample through the target); at most
    ``batch_size`` (the protocol's), at least 1. None (not measured): ``batch_size``."""
    if seconds_per_pass is None or seconds_per_pass <= 0:
        return batch_size
    costliest = max((unit_passes(a, members, eot_samples) for a in attacks if a.on != "sources"), default=1.0)
    return max(1, min(batch_size, math.floor(budget / (seconds_per_pass * costliest))))


def plan_target(attacks: Sequence[PlannedAttack], ids: Sequence[int], batch_size: int, members: int,
                sources: Sequence[str], unit: int | None = None) -> TargetPlan:
    """The units of one target evaluated on samples ``ids`` (``members``: its ensemble size), in sample
    batches of ``unit`` samples (default ``batch_size``; see :func:`unit_samples`)."""
    size = min(batch_size, unit) if unit else batch_size
    batches = sample_batches(ids, size)
    per_batch = []
    for b in range(len(batches)):
        units = [Unit("clean", b)]
        for a in attacks:
            if a.on == "target":
                units.append(Unit("target", b, a))
            elif a.on == "members":
                units += [Unit("member", b, a, member=i) for i in range(members)]
        per_batch.append(tuple(units))
    groups = tuple(TransferGroup(a, s, tuple(Unit("transfer", b, a, source=s) for b in range(len(batches))))
                   for a in attacks if a.on == "sources" for s in sources)
    return TargetPlan(batches, tuple(per_batch), groups, size)


def and_groups(attacks: Sequence[PlannedAttack], sources: Sequence[str] = ()) -> dict[OutcomeKey, str]:
    """Outcome key -> and-group name (``{source}`` in a group name is the source entry); transfer keys
    without a group get their own label."""
    out: dict[OutcomeKey, str] = {}
    for a in attacks:
        if a.on == "sources":
            for src in sources:
                for _, key in a.stored(src):
                    out[key] = (a.spec.and_group or key.label()).replace("{source}", src)
        elif a.spec.and_group:
            for _, key in a.stored():
                out[key] = a.spec.and_group
    return out


def groups_record(groups: dict[OutcomeKey, str]) -> list[dict[str, Any]]:
    """``and_groups`` as JSON-able data for the run's meta."""
    return [{**k.as_dict(), "group": g} for k, g in sorted(groups.items())]
