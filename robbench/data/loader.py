"""`BatchLoader`: reproducible, resumable batches over a split (or an index subset of it).

Every random number of an epoch comes from generators seeded by (seed, stream, epoch) (the permutation)
and (seed, stream, epoch, batch) (that batch's augmentation), never from torch's global RNG. Hence
``loader.epoch(e, start_batch=k)`` yields exactly batches k.. of ``loader.epoch(e)``, and a resumed run
sees the same data as an uninterrupted one.

Second independent stream: DVERGE's ``DistillationLoader(trainloader, trainloader)`` zips two
independent shuffles (each separately augmented) of the same loader. Here that is
``zip(loader.epoch(e), loader.stream(1).epoch(e))``: same data, batch size and augmentation, a different
``stream`` number and therefore independent permutations and augmentations.

TensorData batches are gathered and augmented in the main process (microseconds per CIFAR batch).
FolderData (ImageNet) batches are decoded by a ``torch.utils.data.DataLoader`` with worker processes,
one whole batch per task, seeded the same way, so the interface and the resume guarantee are the same.
"""
from __future__ import annotations

import copy
import math
from typing import Any, Iterator, Sequence

import torch

from robbench.data.augment import augment_batch, resolve
from robbench.data.base import TensorData, _as_index_tensor, seeded_generator
from robbench.errors import ConfigError


class BatchLoader:
    """Batches of (x float32 N×C×H×W in [0, 1], y int64) from ``data``.

    Args:
        data: a ``TensorData`` or ``FolderData`` split.
        batch_size: samples per batch.
        shuffle: a fresh seeded permutation each epoch (else the index order as given).
        augment: ``default`` (the dataset's paper policy), ``crop_flip``, ``crop``, ``flip``, ``none``.
        seed: the run's seed; with ``stream`` and the epoch number it determines everything.
        drop_last: drop a last incomplete batch.
        indices: iterate over these rows only (an evaluation subset, a data shard); default: all.
        stream: independent stream number (0 = the main one; see the module docstring).
    """

    def __init__(self, data: Any, batch_size: int, shuffle: bool, augment: str = "none", seed: int = 0,
                 drop_last: bool = False, *, indices: Sequence[int] | torch.Tensor | None = None,
                 stream: int = 0) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch size must be >= 1, got {batch_size}", field="data.batch_size")
        self.data = data
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.augment = augment
        self.policy = resolve(augment, getattr(data, "name", ""))
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.stream_id = int(stream)
        self.indices = torch.arange(len(data)) if indices is None else _as_index_tensor(indices)
        if len(self.indices) and (int(self.indices.min()) < 0 or int(self.indices.max()) >= len(data)):
            raise ConfigError(f"subset index out of range; allowed: 0..{len(data) - 1}", field="indices")

    def __len__(self) -> int:
        n = len(self.indices)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    @property
    def num_samples(self) -> int:
        """Samples per epoch (after drop_last)."""
        return len(self) * self.batch_size if self.drop_last else len(self.indices)

    def stream(self, k: int) -> "BatchLoader":
        """The same loader with independent randomness (DVERGE's second shuffle: ``stream(1)``)."""
        other = copy.copy(self)
        other.stream_id = int(k)
        return other

    def order(self, epoch: int) -> torch.Tensor:
        """The sample indices of this epoch in visiting order."""
        if not self.shuffle:
            return self.indices
        g = seeded_generator("perm", self.seed, self.stream_id, epoch)
        return self.indices[torch.randperm(len(self.indices), generator=g)]

    def batch_generator(self, epoch: int, batch: int) -> torch.Generator:
        """The generator of one batch's augmentation."""
        return seeded_generator("augment", self.seed, self.stream_id, epoch, batch)

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield batches ``start_batch, ..., len(self) - 1`` of epoch ``epoch`` (on the CPU)."""
        if start_batch < 0:
            raise ConfigError(f"start_batch must be >= 0, got {start_batch}", field="start_batch")
        order = self.order(epoch)
        bs = self.batch_size
        if isinstance(self.data, TensorData):
            for b in range(start_batch, len(self)):
                idx = order[b * bs:(b + 1) * bs]
                x, y = self.data.raw(idx)
                if self.policy != "none":
                    x = augment_batch(x, self.policy, self.batch_generator(epoch, b))
                yield TensorData.to_float(x), y
        else:
            yield from self._folder_epoch(order, epoch, start_batch)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Epoch 0 (evaluation loops that do not care about epochs)."""
        return self.epoch(0)

    def _folder_epoch(self, order: torch.Tensor, epoch: int, start_batch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        from torch.utils.data import DataLoader

        view = _FolderBatches(self, order, epoch)
        batches = list(range(start_batch, len(self)))
        workers = int(getattr(self.data, "num_workers", 0))
        dl = DataLoader(view, batch_size=None, sampler=batches, num_workers=workers,
                        pin_memory=torch.cuda.is_available(), persistent_workers=False)
        yield from dl


class _FolderBatches(torch.utils.data.Dataset):
    """Batch b of one epoch as one DataLoader task (decoding in a worker, seeded per sample)."""

    def __init__(self, loader: BatchLoader, order: torch.Tensor, epoch: int) -> None:
        self.data = loader.data
        self.order = order
        self.bs = loader.batch_size
        self.policy = loader.policy
        self.seed_parts = ("augment", loader.seed, loader.stream_id, epoch)

    def __getitem__(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self.order[b * self.bs:(b + 1) * self.bs].tolist()
        return self.data.load_batch(idx, self.policy, (*self.seed_parts, b))

    def __len__(self) -> int:
        return math.ceil(len(self.order) / self.bs)
