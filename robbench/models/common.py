"""What every architecture factory needs from a ModelSpec and a DatasetInfo."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from robbench.data.info import CIFAR_MEAN, DVERGE_STD, DatasetInfo
from robbench.errors import ConfigError
from robbench.models.layers import Normalize, activation_fn, make_activation, make_norm

NORMALIZATIONS = ("dataset", "dverge", "none")


def input_normalization(spec: Any, info: DatasetInfo) -> nn.Module:
    """The model's first layer for ``spec.normalization``:

    'dataset' -> Normalize(info.mean, info.std); 'dverge' -> CIFAR mean (0.4914, 0.4822, 0.4465) with
    DVERGE's std (0.2023, 0.1994, 0.2010) (DVERGE utils.py ModelWrapper); 'none' -> identity.
    """
    kind = spec.normalization
    if kind == "dataset":
        return Normalize(info.mean, info.std)
    if kind == "dverge":
        if info.in_channels != len(CIFAR_MEAN):
            raise ConfigError(f"'dverge' normalization is for 3-channel input; dataset {info.name!r} has "
                              f"{info.in_channels} channel(s); allowed here: 'dataset' or 'none'",
                              field="model.normalization")
        return Normalize(CIFAR_MEAN, DVERGE_STD)
    if kind == "none":
        return nn.Identity()
    raise ConfigError(f"got {kind!r}; allowed: {', '.join(repr(n) for n in NORMALIZATIONS)}",
                      field="model.normalization")


@dataclass(frozen=True)
class ArchConfig:
    """The spec fields an architecture uses, resolved once."""

    in_channels: int
    num_classes: int
    image_size: int
    width: float
    norm: str
    act_kind: str
    slope: float

    def norm_layer(self, channels: int) -> nn.Module:
        return make_norm(self.norm, channels)

    def act(self) -> nn.Module:
        return make_activation(self.act_kind, self.slope)

    def act_fn(self) -> Callable[[torch.Tensor], torch.Tensor]:
        return activation_fn(self.act_kind, self.slope)


def arch_config(spec: Any, info: DatasetInfo) -> ArchConfig:
    return ArchConfig(in_channels=info.in_channels, num_classes=info.num_classes, image_size=info.image_size,
                      width=float(spec.width), norm=spec.norm_layer, act_kind=spec.activation,
                      slope=float(spec.leaky_slope))


def kaiming_fan_out_init(net: nn.Module) -> None:
    """Convs ~ normal(0, sqrt(2 / (k*k*out_channels))); BatchNorm weight 1, bias 0; Linear keeps the
    torch default. DVERGE models/resnet.py init loop (also EIO resnet.py); torchvision's
    kaiming_normal_(mode='fan_out', nonlinearity='relu') is the same distribution."""
    for m in net.modules():
        if getattr(getattr(m, "weight", None), "is_meta", False):
            continue  # structure-only build (torch.device("meta")): nothing to initialize
        if isinstance(m, nn.Conv2d):
            n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, (2.0 / n) ** 0.5)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
