"""EED's pruning data subsets (§4.1, §5.1): the training set is cut into 4 quarters; quarter 0 is shared
by every sub-model of a score, quarter m + 1 is sub-model m's own, so each of the 3 sub-models sees 50%
("25% of the dataset is shared across all sub-models, while the remaining 75% is allocated separately
for each of the three sub-models"). "These subsets are randomly reshuffled whenever the importance
scoring method changes": the permutation is seeded by (seed, score), so the four scores cut the data
differently while the three sub-models of one score share one cut. For ensemble learning the entire
dataset is used (§5.1). Supp. B.5 varies the number of parts d (``parts``): one shared part plus
d - 1 private ones, so d - 1 sub-models per score, each on 2/d of the set (d = 4: the quarters above).

:class:`SubsetStream` serves a training method batches from such an index list: the training loop
iterates the whole split, so a method training on a subset takes its batches from its own loader
(same seed, batch size and augmentation, its own permutation per epoch) and skips the loop's steps
beyond its subset's batch count. [A first-class ``data.train_subset`` in the loop would replace this.]
"""
from __future__ import annotations

from typing import Any, Iterator

import torch

from robbench.data.base import seeded_generator


def eed_subset(n_train: int, member: int, *, key: str, seed: int = 0, parts: int = 4,
               shared: int = 1) -> list[int]:
    """Sorted training indices of sub-model ``member`` (0-based) under cut ``key`` (the score name):
    the ``shared`` first parts plus part ``shared + member`` of a seeded permutation cut into ``parts``."""
    if not 0 <= member < parts - shared:
        raise ValueError(f"member must be in 0..{parts - shared - 1}, got {member}")
    perm = torch.randperm(n_train, generator=seeded_generator("eed-subsets", seed, key))
    chunks = torch.tensor_split(perm, parts)
    idx = torch.cat([*chunks[:shared], chunks[shared + member]])
    return sorted(int(i) for i in idx)


class SubsetStream:
    """Batches of epoch ``e`` over ``indices`` by batch number, resumable at any batch."""

    def __init__(self, data: Any, indices: list[int], batch_size: int, augment: str, seed: int) -> None:
        from robbench.data import BatchLoader

        self.loader = BatchLoader(data, batch_size, shuffle=True, augment=augment, seed=seed, indices=indices)
        self._it: Iterator[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._pos: tuple[int, int] = (-1, -1)

    def __len__(self) -> int:
        return len(self.loader)

    def batch(self, epoch: int, b: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Batch ``b`` of ``epoch`` (None past the subset's last batch)."""
        if b >= len(self.loader):
            return None
        if self._it is None or self._pos != (epoch, b):
            self._it = self.loader.epoch(epoch, start_batch=b)
        self._pos = (epoch, b + 1)
        return next(self._it)
