"""``digits``: scikit-learn's bundled ``load_digits`` (1797 gray 8×8 images, 10 classes), the embedded
default dataset: it is on every machine with scikit-learn, so the demo needs no download.

Pixels are 0..16 and are scaled by 1/16 to [0, 1]; stored as float32 1×8×8. The split is fixed:
``train_test_split(arange(1797), test_size=450, stratify=target, random_state=0)`` (25%, the
scikit-learn default fraction, rounded), both index lists then sorted so a split is a set in dataset
order. The test indices are pinned by their sha256 below; if a future scikit-learn ever produced another
split, loading fails instead of silently changing every digits result.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from robbench.data.base import TensorData
from robbench.data.subsets import indices_sha256
from robbench.errors import DataError
from robbench.registry import DATASETS

TEST_SIZE = 450
SPLIT_SEED = 0
# sha256 of the canonical JSON of the sorted test indices (scikit-learn 1.x StratifiedShuffleSplit).
TEST_INDICES_SHA256 = "80662efaa9319321ec4222af19c401c32ad4f89adfaa1b77005a01d40729a053"


def split_indices() -> tuple[np.ndarray, np.ndarray]:
    """(train, test) row indices into ``load_digits()``, each sorted."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    target = load_digits().target
    train, test = train_test_split(np.arange(len(target)), test_size=TEST_SIZE, stratify=target,
                                   random_state=SPLIT_SEED)
    return np.sort(train), np.sort(test)


@DATASETS.register("digits")
def load_digits_split(root: Path, split: str, options: dict[str, Any]) -> TensorData:
    from sklearn.datasets import load_digits

    d = load_digits()
    train, test = split_indices()
    if indices_sha256(test) != TEST_INDICES_SHA256:
        import sklearn

        raise DataError(f"digits: scikit-learn {sklearn.__version__} produced a different train/test split "
                        f"than the pinned one (sha256 {TEST_INDICES_SHA256[:12]}...); results would not be "
                        "comparable; use the scikit-learn version in pyproject.toml")
    rows = train if split == "train" else test
    x = torch.from_numpy(d.images[rows] / 16.0).to(torch.float32).unsqueeze(1)
    y = torch.from_numpy(d.target[rows]).to(torch.int64)
    return TensorData(x, y, name="digits", split=split)
