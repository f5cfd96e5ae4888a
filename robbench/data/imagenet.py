"""``imagenet``: the ImageFolder layout, decoded lazily (``FolderData``).

Layout: ``<dir>/train/<wnid>/*.JPEG`` and ``<dir>/val/<wnid>/*`` (val sorted into class folders, as the
usual ``valprep.sh`` does); classes are the sorted folder names (torchvision ImageFolder), so wnid order
gives the standard 0..999 labels. ``<dir>`` is ``options.dir`` if set, else ``<root>/imagenet``, else
``<root>`` itself when it directly holds ``train/`` and ``val/``.

Transforms (torchvision reference recipe, PIL, bilinear):
- evaluation (``get``, augment ``none``): Resize(256) on the short side + CenterCrop(224);
- ``default`` / ``crop_flip``: RandomResizedCrop(224, scale (0.08, 1), ratio (3/4, 4/3)) + flip;
- ``crop``: RandomResizedCrop only; ``flip``: the evaluation transform + flip.
``options.recipe = "fbresnet"`` replaces these with the reference recipe of Xie & Yuille's codebase
(ImageNet-Adversarial-Training ``third_party/imagenet_utils.py fbresnet_augmentor``): GoogLeNet crop with a
bicubic resize, brightness / contrast / saturation / PCA lighting in a random order on uint8 values, flip;
evaluation resizes the short side to 256 with bicubic interpolation. See ``fbresnet_augment.py``. Every
training policy (any ``data.augment`` but ``none``) then applies the colour steps.
Random numbers come from a generator per (seed, epoch, batch) and per position in the batch, so a batch
decoded in any worker is a pure function of its seed (see loader.py).
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import torch

from robbench.schema import opt
from robbench.data.base import _as_index_tensor, seeded_generator
from robbench.data.fbresnet_augment import fbresnet_colour, googlenet_crop_params
from robbench.data.info import DatasetInfo
from robbench.errors import DataError
from robbench.registry import DATASETS

SPLIT_DIRS = {"train": "train", "test": "val"}


@dataclass
class ImageNetOptions:
    dir: str | None = opt(None, help="ImageNet folder (default <root>/imagenet)")
    crop_size: int = opt(224, min=1, max=4096, help="torchvision reference: 224")
    resize_size: int = opt(256, min=1, max=4096, help="torchvision reference: 256 (= 224 / 0.875)")
    num_workers: int = opt(min(8, os.cpu_count() or 1), min=0, max=256, help="decoding processes")
    recipe: Literal["torchvision", "fbresnet"] = opt(
        "torchvision", help="'torchvision': the torchvision reference transforms; 'fbresnet': tensorpack's "
        "fbresnet_augmentor as ImageNet-Adversarial-Training trains (colour jitter + PCA lighting)")


def random_resized_crop_params(width: int, height: int, g: torch.Generator, scale: tuple[float, float] = (0.08, 1.0),
                               ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """torchvision ``RandomResizedCrop.get_params`` with an explicit generator: (top, left, h, w)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * (scale[0] + (scale[1] - scale[0]) * torch.rand(1, generator=g).item())
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * torch.rand(1, generator=g).item())
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            i = int(torch.randint(0, height - h + 1, (1,), generator=g))
            j = int(torch.randint(0, width - w + 1, (1,), generator=g))
            return i, j, h, w
    in_ratio = width / height  # fallback: central crop, as torchvision
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class FolderData:
    """A split of image files, decoded on demand; ``get`` applies the evaluation transform."""

    def __init__(self, directory: Path, name: str, split: str, crop_size: int = 224, resize_size: int = 256,
                 num_workers: int = 0, recipe: str = "torchvision") -> None:
        self.directory = directory
        self.recipe = recipe
        self.name = name
        self.split = split
        self.crop_size = crop_size
        self.resize_size = resize_size
        self.num_workers = num_workers
        from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

        self.classes, self.class_to_idx = find_classes(str(directory))
        self.samples: list[tuple[str, int]] = make_dataset(str(directory), self.class_to_idx, IMG_EXTENSIONS)
        if not self.samples:
            raise DataError(f"{name} {split}: no images in {directory.resolve()}/<class>/; "
                            f"allowed extensions: {', '.join(IMG_EXTENSIONS)}")
        self.y = torch.tensor([c for _, c in self.samples], dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def targets(self) -> torch.Tensor:
        return self.y

    def load(self, index: int, policy: str = "none", generator: torch.Generator | None = None) -> torch.Tensor:
        """One image as float32 3×crop×crop in [0, 1]."""
        import torchvision.transforms.functional as TF
        from torchvision.datasets.folder import default_loader

        img = default_loader(self.samples[index][0])  # PIL RGB
        fb = self.recipe == "fbresnet"
        # fbresnet_augmentor resizes with cv2.INTER_CUBIC in training and evaluation
        interp = TF.InterpolationMode.BICUBIC if fb else TF.InterpolationMode.BILINEAR
        size = self.crop_size
        box = None
        if policy in ("crop_flip", "crop"):
            assert generator is not None
            box = (googlenet_crop_params(img.width, img.height, generator) if fb
                   else random_resized_crop_params(img.width, img.height, generator))
        if box is not None:
            img = TF.resized_crop(img, *box, [size, size], interpolation=interp, antialias=True)
        else:  # evaluation, or the GoogLeNet crop's fallback (ResizeShortestEdge(224) + CenterCrop(224))
            short = size if fb and policy in ("crop_flip", "crop") else self.resize_size
            img = TF.center_crop(TF.resize(img, short, interpolation=interp, antialias=True), size)
        x = TF.pil_to_tensor(img)
        if fb and policy != "none":
            assert generator is not None
            out = fbresnet_colour(x, generator)  # before the flip, as in fbresnet_augmentor
        else:
            out = x.to(torch.float32).div_(255.0)
        if policy in ("crop_flip", "flip"):
            assert generator is not None
            if torch.rand(1, generator=generator).item() < 0.5:
                out = out.flip(-1)
        return out

    def load_batch(self, indices: Sequence[int], policy: str, seed_parts: tuple[Any, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch; sample k of it uses the generator seeded by (*seed_parts, k)."""
        xs = [self.load(i, policy, seeded_generator(*seed_parts, k) if policy != "none" else None)
              for k, i in enumerate(indices)]
        return torch.stack(xs), self.y[torch.as_tensor(list(indices), dtype=torch.int64)]

    def get(self, indices: Sequence[int] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x float [0, 1], y) with the evaluation transform."""
        idx = _as_index_tensor(indices)
        if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= len(self)):
            raise DataError(f"{self.name} {self.split}: sample index out of range; allowed: 0..{len(self) - 1}")
        return self.load_batch(idx.tolist(), "none", ())


def imagenet_dir(root: Path, options: dict[str, Any]) -> Path:
    if options.get("dir"):
        return Path(options["dir"]).expanduser()
    if not (root / "imagenet").exists() and (root / "train").is_dir() and (root / "val").is_dir():
        return root
    return root / "imagenet"


@DATASETS.register("imagenet", params=ImageNetOptions)
def load_imagenet(root: Path, split: str, options: dict[str, Any]) -> FolderData:
    base = imagenet_dir(root, options)
    directory = base / SPLIT_DIRS[split]
    if not directory.is_dir():
        raise DataError(f"imagenet {split}: no folder {directory.resolve()}; ImageNet cannot be downloaded "
                        "automatically: get ILSVRC2012 from image-net.org and lay it out as "
                        f"{base.resolve()}/train/<wnid>/*.JPEG and {base.resolve()}/val/<wnid>/*.JPEG "
                        "(or set data.options.dir)")
    return FolderData(directory, "imagenet", split, options.get("crop_size", 224), options.get("resize_size", 256),
                      options.get("num_workers", 0), options.get("recipe", "torchvision"))


def adjust_info(info: DatasetInfo, o: dict[str, Any]) -> DatasetInfo:
    return dataclasses.replace(info, image_size=o["crop_size"])


load_imagenet.adjust_info = adjust_info  # type: ignore[attr-defined]
