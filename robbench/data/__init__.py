"""Datasets, batch loading, augmentation and evaluation subsets (see docs/architecture.md, "data").

Importing this package registers every dataset in ``robbench.registry.DATASETS``.
"""
from robbench.data.augment import DEFAULT_AUGMENT, augment_batch
from robbench.data.base import TensorData, clear_cache, derive_seed, get_info, load_split, validate_options
from robbench.data.info import INFOS, DatasetInfo
from robbench.data.loader import BatchLoader
from robbench.data.subsets import Subset, dverge_subset, indices_sha256, make_subset

# Dataset modules: importing them registers them.
from robbench.data import digits, imagenet, synthetic, vision  # noqa: E402,F401
from robbench.data.imagenet import FolderData  # noqa: E402

__all__ = [
    "BatchLoader", "DEFAULT_AUGMENT", "DatasetInfo", "FolderData", "INFOS", "Subset", "TensorData",
    "augment_batch", "clear_cache", "derive_seed", "dverge_subset", "get_info", "indices_sha256",
    "load_split", "make_subset", "validate_options",
]
