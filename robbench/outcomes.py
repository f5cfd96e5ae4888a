"""What an outcome row and a committed batch are keyed by: typed keys, stored as columns of the results
store (``robbench.store``), built by the evaluation plan (``robbench.evaluate.plan``) and read by the
report. Nothing here imports torch or pandas: the plan and the report use these without either.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

CLEAN_ATTACK = "clean"
NO_SOURCE = ""      # crafted on the evaluated model itself
NO_MEMBER = -1      # source_member: not crafted on one member; member: the whole model
FINAL = -1          # steps: the attack's final result (not a record_steps checkpoint)
NO_BATCH = -1       # batch: a unit committed per eps, not per sample batch (a source's own accuracy)
NO_EPS = -1.0       # eps: a unit covering every eps of its attack

ROLES = ("target", "source")  # runs.role: the evaluated entry, or a transfer source's own accuracy


@dataclass(frozen=True, order=True)
class OutcomeKey:
    """What one outcome row measures, apart from eps, sample and member.

    ``attack``: the protocol's attack id (or ``clean``); ``source``: the transfer source entry whose
    sets the target was tested on; ``source_member``: the member the examples were crafted on
    (within-ensemble transferability); ``steps``: accuracy after this many iterations (record_steps)."""

    attack: str
    source: str = NO_SOURCE
    source_member: int = NO_MEMBER
    steps: int = FINAL

    def label(self) -> str:
        """A human-readable name for tables and logs (never parsed back)."""
        parts = [self.attack]
        if self.source != NO_SOURCE:
            parts.append(f"from {self.source}")
        if self.source_member != NO_MEMBER:
            parts.append(f"from member {self.source_member}")
        if self.steps != FINAL:
            parts.append(f"at {self.steps} steps")
        return " ".join(parts)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def of(cls, key: "OutcomeKey | str") -> "OutcomeKey":
        """A key, or a plain attack id as the key of that attack's final result."""
        return key if isinstance(key, OutcomeKey) else cls(str(key))


CLEAN = OutcomeKey(CLEAN_ATTACK)
KEY_COLUMNS = ("attack", "source", "source_member", "steps")


@dataclass(frozen=True, order=True)
class BatchKey:
    """One unit committed in one transaction with its outcome rows: one attack (as crafted on one source
    or member) on one sample batch, or (``batch`` = NO_BATCH) at one eps over every sample."""

    attack: str
    source: str = NO_SOURCE
    source_member: int = NO_MEMBER
    batch: int = NO_BATCH
    eps: float = NO_EPS

    @classmethod
    def of(cls, key: "BatchKey | str") -> "BatchKey":
        """A key, or a plain name as a key of its own (for callers without batches)."""
        return key if isinstance(key, BatchKey) else cls(str(key))


BATCH_COLUMNS = ("attack", "source", "source_member", "batch", "eps")
