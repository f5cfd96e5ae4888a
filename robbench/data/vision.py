"""``cifar10``, ``cifar100``, ``svhn`` through torchvision, with torchvision's md5 checksums, loaded whole
into uint8 N×3×32×32 tensors (CIFAR train: 150 MB).

Where the files are looked for under the data root (``--data-root``, ``$ROBBENCH_DATA``, ``./data``):
- cifar10:  ``<root>/cifar-10-batches-py/`` (torchvision layout: the extracted cifar-10-python.tar.gz)
- cifar100: ``<root>/cifar-100-python/``
- svhn:     ``<root>/svhn/{train,test}_32x32.mat`` (its own folder: torchvision puts the .mat files
  directly in the root it is given)

Missing or corrupt files: when ``options.download`` is true (default) and the download host answers, the
torchvision download runs; otherwise a one-line DataError says where we looked and how to fetch the data.
"""
from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

from robbench.schema import opt
from robbench.data.base import TensorData
from robbench.errors import DataError
from robbench.registry import DATASETS


@dataclass
class DownloadOptions:
    download: bool = opt(True, help="download missing files when the network is reachable")


_CLASS_NAME = {"cifar10": "CIFAR10", "cifar100": "CIFAR100", "svhn": "SVHN"}
# name -> torchvision dataset class, filled on first use (torchvision takes ~2 s to import). Tests put
# subclasses with their own md5 lists here; the real code keeps torchvision's checksums.
TV_CLASSES: dict[str, Any] = {}


def tv_class(name: str) -> Any:
    if name not in TV_CLASSES:
        import torchvision

        TV_CLASSES[name] = getattr(torchvision.datasets, _CLASS_NAME[name])
    return TV_CLASSES[name]


def dataset_dir(name: str, root: Path) -> Path:
    """The directory torchvision is given (``root`` for CIFAR, ``root/svhn`` for SVHN)."""
    return root / "svhn" if name == "svhn" else root


def files_dir(name: str, root: Path) -> Path:
    """Where the data files themselves live (named in the error message)."""
    if name == "svhn":
        return root / "svhn"
    return root / tv_class(name).base_folder


def network_reachable(url: str, timeout: float = 3.0) -> bool:
    """Can we open a TCP connection to the download host? (No DNS fails in ~0.1 s, never hangs.)"""
    u = urlparse(url)
    try:
        with socket.create_connection((u.hostname, u.port or (443 if u.scheme == "https" else 80)), timeout=timeout):
            return True
    except OSError:
        return False


def _download_url(name: str, split: str) -> str:
    cls = tv_class(name)
    return cls.split_list[split][0] if name == "svhn" else cls.url


def _how_to(name: str, root: Path, split: str) -> str:
    tv_dir = dataset_dir(name, root).resolve()
    call = (f"torchvision.datasets.SVHN('{tv_dir}', split='{split}', download=True)" if name == "svhn"
            else f"torchvision.datasets.{_CLASS_NAME[name]}('{tv_dir}', download=True)")
    if name == "svhn":
        copy = f"or copy {tv_class(name).split_list[split][1]} into {tv_dir}"
    else:
        copy = f"or extract {tv_class(name).filename} into {tv_dir}"
    return f"to get them, run on a machine with internet: python -c \"import torchvision; {call}\" and copy the result to {tv_dir} on this one, {copy}"


def _open(name: str, root: Path, split: str, download: bool) -> Any:
    cls = tv_class(name)
    tv_root = str(dataset_dir(name, root))
    kwargs = {"split": split} if name == "svhn" else {"train": split == "train"}
    try:
        return cls(tv_root, download=False, **kwargs)
    except RuntimeError:
        pass  # "Dataset not found or corrupted"
    where = files_dir(name, root).resolve()
    probe = where / cls.split_list[split][1] if name == "svhn" else where
    state = "corrupt (md5 mismatch)" if probe.exists() else "missing"
    url = _download_url(name, split)
    if download and network_reachable(url):
        try:
            dataset_dir(name, root).mkdir(parents=True, exist_ok=True)
            return cls(tv_root, download=True, **kwargs)
        except Exception as e:  # network dropped, disk full, bad archive
            raise DataError(f"{name} {split}: files in {where} are {state} and the download from {url} failed "
                            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                            f"{_how_to(name, root, split)}") from None
    why = "downloads are off (data.options.download = false)" if not download else f"{urlparse(url).hostname} is unreachable"
    raise DataError(f"{name} {split}: files in {where} are {state} and {why}; {_how_to(name, root, split)}")


def _load(name: str, root: Path, split: str, options: dict[str, Any]) -> TensorData:
    ds = _open(name, root, split, bool(options.get("download", True)))
    if name == "svhn":
        x = torch.from_numpy(ds.data)  # already N×C×H×W (torchvision transposes the .mat's H×W×C×N)
        y = torch.from_numpy(ds.labels)  # torchvision maps label 10 to digit 0
    else:
        x = torch.from_numpy(ds.data).permute(0, 3, 1, 2)  # N×H×W×C -> N×C×H×W
        y = torch.as_tensor(ds.targets)
    if x.dtype != torch.uint8 or tuple(x.shape[1:]) != (3, 32, 32):
        raise DataError(f"{name} {split}: files in {files_dir(name, root).resolve()} hold {tuple(x.shape)} "
                        f"{x.dtype}; expected N×3×32×32 uint8")
    return TensorData(x.contiguous(), y.to(torch.int64), name=name, split=split)


@DATASETS.register("cifar10", params=DownloadOptions)
def load_cifar10(root: Path, split: str, options: dict[str, Any]) -> TensorData:
    return _load("cifar10", root, split, options)


@DATASETS.register("cifar100", params=DownloadOptions)
def load_cifar100(root: Path, split: str, options: dict[str, Any]) -> TensorData:
    return _load("cifar100", root, split, options)


@DATASETS.register("svhn", params=DownloadOptions)
def load_svhn(root: Path, split: str, options: dict[str, Any]) -> TensorData:
    return _load("svhn", root, split, options)
