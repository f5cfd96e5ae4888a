"""Static facts about each dataset that models need before any file is read."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    in_channels: int
    num_classes: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    train_size: int
    test_size: int


CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
# DVERGE models/ModelWrapper std (reference code utils.py); the commonly quoted CIFAR std differs.
DVERGE_STD = (0.2023, 0.1994, 0.2010)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
SVHN_MEAN = (0.4377, 0.4438, 0.4728)
SVHN_STD = (0.1980, 0.2010, 0.1970)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

INFOS: dict[str, DatasetInfo] = {
    "cifar10": DatasetInfo("cifar10", 3, 10, 32, CIFAR_MEAN, DVERGE_STD, 50000, 10000),
    "cifar100": DatasetInfo("cifar100", 3, 100, 32, CIFAR100_MEAN, CIFAR100_STD, 50000, 10000),
    "svhn": DatasetInfo("svhn", 3, 10, 32, SVHN_MEAN, SVHN_STD, 73257, 26032),
    "imagenet": DatasetInfo("imagenet", 3, 1000, 224, IMAGENET_MEAN, IMAGENET_STD, 1281167, 50000),
    # load_digits: 1797 images, 8x8, values 0..16 scaled to [0,1]; fixed stratified split (see digits.py).
    # mean/std measured on that train split (0.3052, 0.3760).
    "digits": DatasetInfo("digits", 1, 10, 8, (0.3052,), (0.3760,), 1347, 450),
    # Synthetic templates + noise (see synthetic.py); mean/std measured on the default train split.
    "synthetic": DatasetInfo("synthetic", 3, 10, 8, (0.5, 0.5, 0.5), (0.28, 0.28, 0.28), 2000, 500),
}
