"""Training augmentations by name, applied to whole batches of tensors with an explicit generator.

Names (``data.augment`` in a zoo entry):
- ``default``: the dataset's paper default, see :data:`DEFAULT_AUGMENT`;
- ``crop_flip``: random crop with zero padding + horizontal flip (p = 0.5);
- ``crop``: random crop only; ``flip``: horizontal flip only; ``none``.

Crops match torchvision ``RandomCrop(size, padding=p)`` (zero padding, offset uniform in 0..2p for each
axis independently) and flips ``RandomHorizontalFlip(0.5)``, per sample; the random numbers come from
the generator passed in, not torch's global RNG, so a batch is a pure function of its seed.
Works on uint8 or float batches (zero padding is 0 in both).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from robbench.errors import ConfigError

NAMES = ("default", "crop_flip", "crop", "flip", "none")

# What "default" means per dataset, with its source.
DEFAULT_AUGMENT: dict[str, str] = {
    # DVERGE reference (train.py): RandomCrop(32, padding=4) + RandomHorizontalFlip + ToTensor.
    "cifar10": "crop_flip",
    # Same CIFAR pipeline; no paper in the set states otherwise for CIFAR-100 (EED appendix gives none).
    "cifar100": "crop_flip",
    # EED (§5.1) gives no SVHN augmentation. Crop only: a mirrored house number is not a valid digit
    # (2/5, 3, 7 change shape or meaning) and never occurs at test time, so the usual SVHN recipes skip flips.
    "svhn": "crop",
    # Our choice (no paper uses digits): pad 1 on 8x8 is the CIFAR pad-4-on-32 ratio; no flip (digits).
    "digits": "crop",
    # Test data: none, so tests see the exact generated samples.
    "synthetic": "none",
    # ImageNet (FolderData): RandomResizedCrop(224) + flip, torchvision reference recipe; see imagenet.py.
    "imagenet": "crop_flip",
}

# Zero padding for the random crop: 4 px on 32x32 (DVERGE reference); 1 px on 8x8 (our choice, same ratio).
CROP_PADDING: dict[int, int] = {32: 4, 8: 1}


def crop_padding(image_size: int) -> int:
    return CROP_PADDING.get(image_size, max(1, image_size // 8))


def resolve(name: str, dataset: str) -> str:
    """``default`` -> the dataset's own policy; any other name is checked and returned."""
    if name not in NAMES:
        raise ConfigError(f"unknown augmentation {name!r}; allowed: {', '.join(NAMES)}", field="data.augment")
    if name == "default":
        return DEFAULT_AUGMENT.get(dataset, "none")
    return name


def random_crop(x: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Per-sample random crop back to H×W after zero padding by ``padding`` on every side."""
    n, c, h, w = x.shape
    if padding <= 0 or n == 0:
        return x
    xp = F.pad(x, (padding, padding, padding, padding))
    oy = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    ox = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    rows = (oy[:, None] + torch.arange(h))[:, None, :, None]
    cols = (ox[:, None] + torch.arange(w))[:, None, None, :]
    return xp[torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]


def random_flip(x: torch.Tensor, generator: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """Flip each sample left-right with probability ``p``."""
    if len(x) == 0:
        return x
    mask = torch.rand(len(x), generator=generator) < p
    return torch.where(mask[:, None, None, None], x.flip(-1), x)


def augment_batch(x: torch.Tensor, policy: str, generator: torch.Generator, padding: int | None = None) -> torch.Tensor:
    """Apply a resolved policy (``crop_flip``, ``crop``, ``flip``, ``none``) to an N×C×H×W batch."""
    if policy == "none":
        return x
    pad = crop_padding(x.shape[-1]) if padding is None else padding
    if policy in ("crop_flip", "crop"):
        x = random_crop(x, pad, generator)
    if policy in ("crop_flip", "flip"):
        x = random_flip(x, generator)
    if policy not in ("crop_flip", "crop", "flip"):
        raise ConfigError(f"unknown augmentation {policy!r}; allowed: {', '.join(NAMES)}", field="data.augment")
    return x
