"""Evaluation subsets, stored as their index list and identified by its sha256.

``dverge`` reproduces the DVERGE reference (eval_wbox.py / eval_bbox.py): ``random.seed(0);
random.sample(range(10000), 1000)`` with Python's ``random``, order kept (first indices 6311, 6890, 663,
4242, 8376). We draw from a private ``random.Random(seed)``, which gives the same numbers without touching
the global ``random`` state. ``dverge_subset`` also takes a list as ``pool``: the reference's
within-ensemble transferability draws its 1000 from the samples every member classifies correctly.
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from robbench.errors import DataError

KINDS = ("dverge", "first", "random", "all")


def indices_sha256(indices: Sequence[int]) -> str:
    """sha256 of the canonical JSON of an index list (``[1,2,3]``: no spaces, order kept)."""
    return hashlib.sha256(json.dumps([int(i) for i in indices], separators=(",", ":")).encode()).hexdigest()


def dverge_subset(n: int = 1000, pool: int | Sequence[int] = 10000, seed: int = 0) -> list[int]:
    """``random.seed(seed); random.sample(range(pool), n)`` (or from the list ``pool``), order kept."""
    population = range(pool) if isinstance(pool, int) else list(pool)
    if n > len(population):
        raise DataError(f"dverge subset: n={n} is larger than the pool of {len(population)} samples; "
                        f"allowed: n <= {len(population)}")
    return random.Random(seed).sample(population, n)


@dataclass(frozen=True)
class Subset:
    """A named list of sample indices into one split; ``sha256`` identifies it in the results store."""

    name: str
    indices: tuple[int, ...]
    sha256: str = ""
    dataset: str = ""
    split: str = ""
    kind: str = ""
    seed: int = 0
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "indices", tuple(int(i) for i in self.indices))
        digest = indices_sha256(self.indices)
        if not self.sha256:
            object.__setattr__(self, "sha256", digest)
        elif self.sha256 != digest:
            raise DataError(f"subset {self.name!r}: index list does not match its sha256 "
                            f"({self.sha256[:12]}... stored, {digest[:12]}... computed)")

    def __len__(self) -> int:
        return len(self.indices)

    def tensor(self) -> torch.Tensor:
        return torch.tensor(self.indices, dtype=torch.int64)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dataset": self.dataset, "split": self.split, "kind": self.kind,
                "seed": self.seed, "n": len(self.indices), "sha256": self.sha256, "indices": list(self.indices)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Subset":
        """Rebuild a stored subset; a tampered index list is a DataError."""
        return cls(name=d["name"], indices=tuple(d["indices"]), sha256=d.get("sha256", ""),
                   dataset=d.get("dataset", ""), split=d.get("split", ""), kind=d.get("kind", ""),
                   seed=int(d.get("seed", 0)))


def split_size(dataset: str, split: str, options: dict[str, Any] | None = None) -> int:
    from robbench.data.base import get_info

    info = get_info(dataset, options)
    return info.train_size if split == "train" else info.test_size


def make_subset(kind: str, dataset: str, split: str = "test", n: int | None = None, seed: int = 0, *,
                size: int | None = None, clamp: bool = False, options: dict[str, Any] | None = None) -> Subset:
    """Indices of ``n`` samples of a split.

    kinds: ``dverge`` (Python ``random.Random(seed).sample(range(size), n)``, reference order kept),
    ``first`` (0..n-1), ``random`` (a seeded torch permutation's first n, sorted), ``all``.
    ``size`` is the split size (default: from the dataset info). ``n`` larger than the split is an error,
    unless ``clamp=True`` (then n = size, recorded in the name). ``n=None`` means the whole split.
    """
    if kind not in KINDS:
        raise DataError(f"unknown subset kind {kind!r}; allowed: {', '.join(KINDS)}")
    total = split_size(dataset, split, options) if size is None else int(size)
    if kind == "all" or n is None:
        n = total
    if n < 1:
        raise DataError(f"subset of {dataset} {split}: n must be >= 1, got {n}")
    if n > total:
        if not clamp:
            raise DataError(f"subset of {dataset} {split}: n={n} but the split has {total} samples; "
                            f"allowed: n <= {total}")
        n = total
    if kind == "dverge":
        idx = dverge_subset(n, total, seed)
    elif kind == "random":
        g = torch.Generator().manual_seed(seed)
        idx = sorted(torch.randperm(total, generator=g)[:n].tolist())
    else:  # first, all
        idx = list(range(n))
    name = f"{dataset}-{split}-{kind}{n}" + (f"-seed{seed}" if kind in ("dverge", "random") else "")
    return Subset(name=name, indices=tuple(idx), dataset=dataset, split=split, kind=kind, seed=seed)
