"""ResNets: CIFAR ResNet-6n+2 (DVERGE's ResNet-20), CIFAR ResNet-18, torchvision-style ImageNet
ResNet-50/101/152 and the deep ImageNet ResNets (200/338/518/638) of Xie & Yuille (ICLR 2020).

One :class:`ResNet` class with two stems. Every block computes
``grad_scale(residual, self.sgm_gamma) + shortcut`` (SGM sets ``sgm_gamma``), and every network
carries feature taps (:mod:`robbench.models.features`) in forward order.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Sequence

import torch
from torch import nn

from robbench.config import opt
from robbench.data.info import DatasetInfo
from robbench.errors import ConfigError
from robbench.models.common import ArchConfig, arch_config, input_normalization, kaiming_fan_out_init
from robbench.models.features import FeatureTap
from robbench.models.layers import GlobalAvgPool, MixtureBN, grad_scale, scaled_channels
from robbench.registry import ARCHITECTURES


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


def _projection(cin: int, cout: int, stride: int, cfg: ArchConfig) -> nn.Module:
    """Option-B shortcut (1x1 conv + norm), only where the shape changes (DVERGE models/resnet.py
    ``downsample``; torchvision ``downsample``); identity elsewhere."""
    if stride == 1 and cin == cout:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False), cfg.norm_layer(cout))


class BasicBlock(nn.Module):
    """conv3x3-norm-act-conv3x3-norm (+ shortcut) -act. Taps: after bn1 (DVERGE's "intermediate"
    layer) and the block output bn2 + shortcut, both before the activation. One ``relu`` module runs
    twice, as in the reference, so a ReLU-hook version of SGM sees the same calls."""

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int, cfg: ArchConfig) -> None:
        super().__init__()
        self.conv1 = conv3x3(cin, planes, stride)
        self.bn1 = cfg.norm_layer(planes)
        self.tap_mid = FeatureTap(cfg.act_fn())
        self.relu = cfg.act()
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = cfg.norm_layer(planes)
        self.shortcut = _projection(cin, planes, stride, cfg)
        self.tap_out = FeatureTap(cfg.act_fn())
        self.sgm_gamma = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.tap_mid(self.bn1(self.conv1(x))))
        out = self.bn2(self.conv2(out))
        out = grad_scale(out, self.sgm_gamma) + self.shortcut(x)
        return self.relu(self.tap_out(out))

    def last_norm(self) -> nn.Module:
        return self.bn2


class Bottleneck(nn.Module):
    """1x1-3x3-1x1 bottleneck, expansion 4, stride on the 3x3 conv (torchvision v1.5; tensorpack
    ``resnet_bottleneck`` in ImageNet-Adversarial-Training: "stride-2 on 3x3"). Tap: block output."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int, cfg: ArchConfig) -> None:
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(cin, planes, kernel_size=1, bias=False)
        self.bn1 = cfg.norm_layer(planes)
        self.relu = cfg.act()
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = cfg.norm_layer(planes)
        self.conv3 = nn.Conv2d(planes, out, kernel_size=1, bias=False)
        self.bn3 = cfg.norm_layer(out)
        self.shortcut = _projection(cin, out, stride, cfg)
        self.tap_out = FeatureTap(cfg.act_fn())
        self.sgm_gamma = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out = grad_scale(out, self.sgm_gamma) + self.shortcut(x)
        return self.relu(self.tap_out(out))

    def last_norm(self) -> nn.Module:
        return self.bn3


class ResNet(nn.Module):
    """A ResNet with normalization as its first layer.

    stem 'cifar': conv3x3(stride 1, no bias)-norm-act (DVERGE ResNet-20, kuangliu ResNet-18);
    stem 'imagenet': conv7x7/2-norm-act-maxpool3x3/2 (torchvision, tensorpack resnet_backbone).
    Stage i has ``blocks[i]`` blocks of width ``widths[i]``; stride 1 for the first stage, 2 after.
    Ends with a global average pool (== AvgPool2d(8) at 32x32 for ResNet-20) and a Linear.
    """

    def __init__(self, cfg: ArchConfig, normalize: nn.Module, block: type[BasicBlock] | type[Bottleneck],
                 blocks: Sequence[int], widths: Sequence[int], stem_width: int,
                 stem: Literal["cifar", "imagenet"]) -> None:
        super().__init__()
        self.normalize = normalize
        self.blocks_per_stage = list(blocks)
        self.sgm_bottleneck = block is Bottleneck  # informational: the hook-based SGM reference needs sqrt(gamma) here; our explicit op does not (attacks/sgm.py)
        if stem == "cifar":
            self.conv1 = conv3x3(cfg.in_channels, stem_width)
        else:
            self.conv1 = nn.Conv2d(cfg.in_channels, stem_width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = cfg.norm_layer(stem_width)
        # Layer 1 = stem conv+BN output, always read before the ReLU (DVERGE and EIO get_features).
        self.tap_stem = FeatureTap(cfg.act_fn(), pre_activation_only=(stem == "cifar"))
        self.relu = cfg.act()
        self.maxpool: nn.Module = (nn.MaxPool2d(kernel_size=3, stride=2, padding=1) if stem == "imagenet"
                                   else nn.Identity())
        cin = stem_width
        self.stage_names: list[str] = []
        for i, (n, w) in enumerate(zip(blocks, widths)):
            stage = []
            for j in range(n):
                stride = (1 if i == 0 else 2) if j == 0 else 1
                stage.append(block(cin, w, stride, cfg))
                cin = w * block.expansion
            name = f"layer{i + 1}"
            self.add_module(name, nn.Sequential(*stage))
            self.stage_names.append(name)
        self.avgpool = GlobalAvgPool()
        self.fc = nn.Linear(cin, cfg.num_classes)
        self.tap_logits = FeatureTap(None)
        self.feature_dim = cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.normalize(x)
        x = self.maxpool(self.relu(self.tap_stem(self.bn1(self.conv1(x)))))
        for name in self.stage_names:
            x = getattr(self, name)(x)
        return self.tap_logits(self.fc(self.avgpool(x)))

    def residual_blocks(self) -> list[nn.Module]:
        return [m for m in self.modules() if isinstance(m, (BasicBlock, Bottleneck))]


def _zero_last_norm(net: ResNet) -> None:
    """Zero-init each block's last norm scale ("ImageNet in 1 Hour" Sec 5.1, used by
    ImageNet-Adversarial-Training resnet_model.py ``get_bn(zero_init=True)``)."""
    for blk in net.residual_blocks():
        norm = blk.last_norm()
        norms = [norm.bn_clean, norm.bn_adv] if isinstance(norm, MixtureBN) else [norm]
        for n in norms:
            nn.init.zeros_(n.weight)


# ----------------------------------------------------------------------------------------------
# CIFAR ResNet-6n+2 (ResNet-20 = DVERGE / EIO)
# ----------------------------------------------------------------------------------------------

def resnet_cifar(depth: int, spec: Any, info: DatasetInfo) -> ResNet:
    """CIFAR ResNet-``depth`` (He et al. 2016 Sec 4.2): n = (depth-2)/6 BasicBlocks per stage, widths
    16/32/64 (x width), strides 1/2/2, option-B shortcuts, DVERGE init. ResNet-20: 272,474 params.

    The DVERGE/EIO model code switches to Bottleneck blocks for depth >= 44; robbench keeps BasicBlocks
    (the paper's 6n+2 definition) since no reproduced paper uses a CIFAR ResNet deeper than 20.
    """
    if depth < 8 or (depth - 2) % 6:
        raise ConfigError(f"CIFAR ResNet depth must be 6n+2 >= 8 (20, 32, 44, 56, ...), got {depth}",
                          field="model.options.depth")
    cfg = arch_config(spec, info)
    n = (depth - 2) // 6
    widths = [scaled_channels(c, cfg.width) for c in (16, 32, 64)]
    net = ResNet(cfg, input_normalization(spec, info), BasicBlock, [n, n, n], widths, widths[0], "cifar")
    kaiming_fan_out_init(net)
    return net


@dataclass
class CifarResNetOptions:
    depth: int = opt(20, min=8, max=1202, help="6n+2; 20 = DVERGE/EIO ResNet-20")

    def validate(self, file: str) -> None:
        if (self.depth - 2) % 6:
            raise ConfigError(f"{self.depth} is not 6n+2; allowed: 20, 32, 44, 56, 110, ...",
                              file=file, field="model.options.depth")


@ARCHITECTURES.register("resnet_cifar", params=CifarResNetOptions)
def _resnet_cifar(spec: Any, info: DatasetInfo, options: CifarResNetOptions | None = None) -> nn.Module:
    return resnet_cifar((options or CifarResNetOptions()).depth, spec, info)


@ARCHITECTURES.register("resnet20")
def resnet20(spec: Any, info: DatasetInfo, options: Any = None) -> nn.Module:
    """DVERGE's ResNet-20 (zjysteven/DVERGE models/resnet.py)."""
    return resnet_cifar(20, spec, info)


@ARCHITECTURES.register("resnet32")
def resnet32(spec: Any, info: DatasetInfo, options: Any = None) -> nn.Module:
    return resnet_cifar(32, spec, info)


@ARCHITECTURES.register("resnet56")
def resnet56(spec: Any, info: DatasetInfo, options: Any = None) -> nn.Module:
    return resnet_cifar(56, spec, info)


@ARCHITECTURES.register("resnet18")
def resnet18(spec: Any, info: DatasetInfo, options: Any = None) -> nn.Module:
    """CIFAR ResNet-18 (kuangliu/pytorch-cifar layout, as used by HYDRA/HARP and EED): 3x3 stem, no
    maxpool, [2, 2, 2, 2] BasicBlocks of 64/128/256/512 (x width), option-B shortcuts.
    Init: torch defaults, as kuangliu's code (it has no init loop)."""
    cfg = arch_config(spec, info)
    widths = [scaled_channels(c, cfg.width) for c in (64, 128, 256, 512)]
    return ResNet(cfg, input_normalization(spec, info), BasicBlock, [2, 2, 2, 2], widths, widths[0], "cifar")


# ----------------------------------------------------------------------------------------------
# ImageNet ResNets (bottleneck)
# ----------------------------------------------------------------------------------------------

# He et al. 2016 Table 1 (= ImageNet-Adversarial-Training nets.py NUM_BLOCKS for 50/101/152).
# 200: He et al. 2016b "Identity Mappings" / fb.resnet.torch. Xie & Yuille name ResNet-200/338/518/638
# but neither the paper nor its code (nets.py only has 50/101/152) gives their block counts; robbench
# extends ResNet-200's pattern: res2 = res5 = 3 blocks and the other (depth-2)/3 - 6 blocks split
# 2:3 between res3 and res4 (24:36 at depth 200), giving 338 = [3, 42, 64, 3], 518 = [3, 66, 100, 3],
# 638 = [3, 82, 124, 3]. [unverified] -- override with model.options.blocks.
IMAGENET_BLOCKS: dict[int, list[int]] = {
    50: [3, 4, 6, 3],
    101: [3, 4, 23, 3],
    152: [3, 8, 36, 3],
}


def deep_resnet_blocks(depth: int, file: str | None = None) -> list[int]:
    """Bottleneck blocks per stage for an ImageNet ResNet-``depth`` (see IMAGENET_BLOCKS)."""
    if depth in IMAGENET_BLOCKS:
        return list(IMAGENET_BLOCKS[depth])
    if depth < 200 or (depth - 2) % 3:  # below 200 only the He et al. depths are defined
        raise ConfigError(f"ImageNet ResNet depth {depth} unknown; allowed: 50, 101, 152, or 3k+2 >= 200 "
                          "(200, 338, 518, 638, ...), or give model.options.blocks",
                          file=file, field="model.options.depth")
    middle = (depth - 2) // 3 - 6
    res3 = round(middle * 2 / 5)
    return [3, res3, middle - res3, 3]


def resnet_depth(blocks: Sequence[int], block: type[BasicBlock] | type[Bottleneck] = Bottleneck) -> int:
    """Weighted layers on the main path: stem conv + convs per block + fc (shortcuts not counted)."""
    per_block = 3 if block is Bottleneck else 2
    return 2 + per_block * sum(blocks)


def resnet_imagenet(blocks: Sequence[int], spec: Any, info: DatasetInfo, *, zero_init_residual: bool,
                    fc_init_std: float | None, stem: Literal["cifar", "imagenet"] = "imagenet") -> ResNet:
    cfg = arch_config(spec, info)
    widths = [scaled_channels(c, cfg.width) for c in (64, 128, 256, 512)]
    net = ResNet(cfg, input_normalization(spec, info), Bottleneck, blocks, widths, widths[0], stem)
    if net.fc.weight.is_meta:
        return net  # structure-only build: nothing to initialize
    kaiming_fan_out_init(net)  # torchvision: kaiming_normal_(fan_out, relu); tensorpack: variance_scaling(2, fan_out)
    if zero_init_residual:
        _zero_last_norm(net)
    if fc_init_std is not None:
        nn.init.normal_(net.fc.weight, 0.0, fc_init_std)
        nn.init.zeros_(net.fc.bias)
    return net


@dataclass
class ImageNetResNetOptions:
    # torchvision resnet defaults: zero_init_residual=False, Linear with torch's default init.
    zero_init_residual: bool = opt(False, help="zero each block's last BN scale (Goyal et al.)")
    fc_init_std: float | None = opt(None, min=0.0, help="normal(0, std) fc init; none = torch default")
    # The bottleneck ResNets adversarial-pruning code trains on 32x32 inputs (HARP models/resnet_cifar.py,
    # from kuangliu/pytorch-cifar) keep the stages and widths but replace the 7x7/2 stem and its max-pool
    # by one 3x3 stride-1 conv, so the last stage still sees 4x4 maps.
    stem: Literal["imagenet", "cifar"] = opt("imagenet", help="imagenet: 7x7/2 conv + maxpool (torchvision); "
                                                              "cifar: 3x3/1 conv, no maxpool (32x32 inputs)")


def _imagenet_factory(depth: int) -> Any:
    def make(spec: Any, info: DatasetInfo, options: ImageNetResNetOptions | None = None) -> nn.Module:
        o = options or ImageNetResNetOptions()
        return resnet_imagenet(IMAGENET_BLOCKS[depth], spec, info, zero_init_residual=o.zero_init_residual,
                               fc_init_std=o.fc_init_std, stem=o.stem)
    make.__name__ = f"resnet{depth}"
    make.__doc__ = f"torchvision-style ResNet-{depth}: 7x7/2 stem + maxpool, bottlenecks {IMAGENET_BLOCKS[depth]}."
    return make


for _d in (50, 101, 152):
    ARCHITECTURES.register(f"resnet{_d}", params=ImageNetResNetOptions)(_imagenet_factory(_d))


@dataclass
class DeepResNetOptions:
    depth: int = opt(200, min=14, max=2000, help="50, 101, 152, or 3k+2 >= 200 (Xie & Yuille: 200/338/518/638)")
    blocks: list[int] = opt([], help="explicit bottleneck blocks per stage (4 numbers); overrides depth")
    # ImageNet-Adversarial-Training resnet_model.py: last BN of each block gamma=0 and fc ~ N(0, 0.01).
    zero_init_residual: bool = opt(True, help="zero each block's last BN scale (Xie & Yuille code: yes)")
    fc_init_std: float | None = opt(0.01, min=0.0, help="fc weight std (Xie & Yuille code: 0.01)")

    def resolved_blocks(self) -> list[int]:
        return list(self.blocks) if self.blocks else deep_resnet_blocks(self.depth)

    def validate(self, file: str) -> None:
        if self.blocks:
            if len(self.blocks) != 4 or any(b < 1 for b in self.blocks):
                raise ConfigError(f"expected 4 positive block counts, got {self.blocks}",
                                  file=file, field="model.options.blocks")
            if resnet_depth(self.blocks) != self.depth:
                raise ConfigError(f"blocks {self.blocks} give depth {resnet_depth(self.blocks)}, "
                                  f"not depth = {self.depth}; allowed: depth = 2 + 3 * sum(blocks)",
                                  file=file, field="model.options.blocks")
        else:
            deep_resnet_blocks(self.depth, file)


@ARCHITECTURES.register("resnet_imagenet", params=DeepResNetOptions)
def resnet_imagenet_deep(spec: Any, info: DatasetInfo, options: DeepResNetOptions | None = None) -> nn.Module:
    """Depth-parameterized ImageNet ResNet (Xie & Yuille ResNet-200/338/518/638)."""
    o = options or DeepResNetOptions()
    return resnet_imagenet(o.resolved_blocks(), spec, info, zero_init_residual=o.zero_init_residual,
                           fc_init_std=o.fc_init_std)
