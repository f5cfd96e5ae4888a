"""CIFAR VGG-16 with BatchNorm (the Ensemble-in-One / EED VGG-16).

Layout as cai-y13/Ensemble-in-One vgg.py: 13 conv3x3 (with bias) each followed by BN and ReLU,
max-pools after conv 2, 4, 7, 10, 13, then one Linear(512, classes). EIO's "14 RGBs for VGG-16"
(ICLR paper, Sec. 4.1) is 13 gated convs plus the classifier: its code gates the 13 convs and its
``get_features`` has 14 layers, layer 14 = logits. robbench's taps match: 13 (after each conv's BN,
ReLU follows) + logits = 14 feature layers.

Pooling adapts to the input size: a max-pool is skipped when the map is already 1x1 (8x8 digits go
8 -> 4 -> 2 -> 1 and skip the last two pools), and a global average pool before the classifier is
the identity at 32x32 (the map is 1x1 there) and keeps 512 features for any other size.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from robbench.data.info import DatasetInfo
from robbench.models.common import ArchConfig, arch_config, input_normalization
from robbench.models.features import FeatureTap
from robbench.models.layers import GlobalAvgPool, scaled_channels
from robbench.registry import ARCHITECTURES

VGG16_CFG: list[int | str] = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


class AdaptiveMaxPool(nn.Module):
    """MaxPool2d(2, 2) that passes a map through unchanged once it is smaller than 2x2."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] < 2 or x.shape[-2] < 2:
            return x
        return nn.functional.max_pool2d(x, kernel_size=2, stride=2)


class ConvBNAct(nn.Module):
    def __init__(self, cin: int, cout: int, cfg: ArchConfig) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size=3, padding=1)  # bias=True as EIO vgg.py
        self.bn = cfg.norm_layer(cout)
        self.tap = FeatureTap(cfg.act_fn())
        self.relu = cfg.act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.tap(self.bn(self.conv(x))))


class VGG(nn.Module):
    def __init__(self, cfg: ArchConfig, normalize: nn.Module, layout: list[int | str]) -> None:
        super().__init__()
        self.normalize = normalize
        layers: list[nn.Module] = []
        cin = cfg.in_channels
        for item in layout:
            if item == "M":
                layers.append(AdaptiveMaxPool())
            else:
                cout = scaled_channels(int(item), cfg.width)
                layers.append(ConvBNAct(cin, cout, cfg))
                cin = cout
        self.features = nn.Sequential(*layers)
        self.avgpool = GlobalAvgPool()
        self.classifier = nn.Linear(cin, cfg.num_classes)
        self.tap_logits = FeatureTap(None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(self.normalize(x))
        return self.tap_logits(self.classifier(self.avgpool(x)))


@ARCHITECTURES.register("vgg16")
def vgg16(spec: Any, info: DatasetInfo, options: Any = None) -> nn.Module:
    """CIFAR VGG-16-BN. Init: torch defaults (EIO vgg.py has no init loop)."""
    return VGG(arch_config(spec, info), input_normalization(spec, info), VGG16_CFG)
