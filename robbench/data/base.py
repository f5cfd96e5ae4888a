"""Dataset containers, `get_info` and `load_split` (the one entry point to every registered dataset).

A dataset registers a factory ``fn(root: Path, split: str, options: dict) -> TensorData | FolderData`` in
``robbench.registry.DATASETS`` with an options dataclass (``params=``); ``load_split`` validates the
options, calls the factory once per (name, split, root, options) and caches the result for the process.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence, Union

import torch

from robbench.schema import parse_dataclass
from robbench.data.info import INFOS, DatasetInfo
from robbench.errors import ConfigError, DataError
from robbench.registry import DATASETS

SPLITS = ("train", "test")

Indices = Union[Sequence[int], torch.Tensor]


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from any tuple of parts (stable across processes and Python versions, unlike hash())."""
    blob = ("robbench:" + ":".join(str(p) for p in parts)).encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "little") & (2**63 - 1)


def seeded_generator(*parts: Any) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(*parts))


def _as_index_tensor(indices: Indices) -> torch.Tensor:
    if isinstance(indices, torch.Tensor):
        return indices.to(torch.int64)
    return torch.as_tensor(list(indices), dtype=torch.int64)


@dataclass(eq=False)
class TensorData:
    """A whole split in memory: ``x`` N×C×H×W (uint8 0..255, or float already in [0, 1]); ``y`` int64.

    uint8 keeps CIFAR's 50k train images at 150 MB; batches become float32 [0, 1] in :meth:`get`.
    """

    x: torch.Tensor
    y: torch.Tensor
    name: str = ""
    split: str = ""

    def __post_init__(self) -> None:
        if self.x.dim() != 4 or self.y.dim() != 1 or len(self.x) != len(self.y):
            raise DataError(f"{self.name or 'dataset'} {self.split}: expected x N×C×H×W and y N, "
                            f"got {tuple(self.x.shape)} and {tuple(self.y.shape)}")
        self.y = self.y.to(torch.int64)

    def __len__(self) -> int:
        return len(self.y)

    @property
    def targets(self) -> torch.Tensor:
        return self.y

    @staticmethod
    def to_float(x: torch.Tensor) -> torch.Tensor:
        """uint8 0..255 -> float32 [0, 1]; float input is returned as float32."""
        if x.dtype == torch.uint8:
            return x.to(torch.float32).div_(255.0)
        return x.to(torch.float32)

    def raw(self, indices: Indices) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows in the stored dtype (augmentation runs on these before the float conversion)."""
        idx = _as_index_tensor(indices)
        self._check(idx)
        return self.x[idx], self.y[idx]

    def get(self, indices: Indices) -> tuple[torch.Tensor, torch.Tensor]:
        """(x float32 in [0, 1], y int64) for these rows, in the given order."""
        x, y = self.raw(indices)
        return self.to_float(x), y

    def _check(self, idx: torch.Tensor) -> None:
        if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= len(self)):
            raise DataError(f"{self.name} {self.split}: sample index out of range; allowed: 0..{len(self) - 1}")


def get_info(name: str, options: dict[str, Any] | None = None) -> DatasetInfo:
    """Static facts about a dataset; ``options`` matter only where they change them (synthetic sizes,
    ImageNet crop size)."""
    if name not in INFOS:
        raise ConfigError(f"unknown dataset {name!r}; allowed: {', '.join(sorted(INFOS))}", field="data.dataset")
    info = INFOS[name]
    if not options:
        return info
    opts = validate_options(name, options)
    adjust = getattr(DATASETS.get(name), "adjust_info", None)
    return adjust(info, opts) if adjust else info


def validate_options(name: str, options: dict[str, Any] | None, file: str | None = None) -> dict[str, Any]:
    """Check ``data.options`` against the dataset's options dataclass; returns all options with defaults.

    ``file`` names the zoo entry in the error (config loading can call this to fail early).
    """
    params = DATASETS.params(name)
    options = dict(options or {})
    where = file or f"dataset {name}"
    if params is None:
        if options:
            raise ConfigError(f"dataset {name!r} takes no options; got {', '.join(sorted(options))}",
                              file=where, field="data.options")
        return {}
    return dataclasses.asdict(parse_dataclass(params, options, file=where, prefix="data.options"))


_CACHE: dict[tuple[str, str, str, str], Any] = {}


def load_split(name: str, split: str, root: Path | str | None = None,
               options: dict[str, Any] | None = None) -> Any:
    """Load one split (``train`` or ``test``) as :class:`TensorData` or ``FolderData``.

    ``root`` defaults to ``robbench.paths.data_root()`` (``$ROBBENCH_DATA`` or ``./data``). Cached per
    process: the same (name, split, root, options) returns the same object.
    """
    from robbench.paths import data_root

    factory = DATASETS.get(name, field="data.dataset")
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; allowed: {', '.join(SPLITS)}", field="split")
    opts = validate_options(name, options)
    root_path = Path(root) if root is not None else data_root()
    key = (name, split, str(root_path.expanduser().resolve()), json.dumps(opts, sort_keys=True))
    if key not in _CACHE:
        _CACHE[key] = factory(root_path.expanduser(), split, opts)
    return _CACHE[key]


def clear_cache() -> None:
    """Forget every loaded split (tests; freeing memory between datasets)."""
    _CACHE.clear()
