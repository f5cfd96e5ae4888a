"""DVERGE's attack loops (zjysteven/DVERGE ``distillation.py`` ``Linf_PGD`` and ``Linf_distillation`` with
``gradient_wrt_input``/``gradient_wrt_feature``), transcribed as written, for parity checks in tests and
benchmarks (kept out of the robbench package). CUDA-only random start left out (``rand_start=False``).
Also DVERGE's ``models/resnet.py`` ResNet-20 re-stated (same init RNG order, forward and
``get_features`` indexing, ``nn.AvgPool2d(8)`` pooling)."""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn


def _steps(grad_of: Callable[[torch.Tensor], torch.Tensor], dat: torch.Tensor, eps: float, alpha: float,
           steps: int, descend: bool, momentum: bool, mu: float) -> torch.Tensor:
    x_nat = dat.clone().detach()
    x_adv = torch.clamp(dat.clone().detach(), 0.0, 1.0)  # respect image bounds
    g = torch.zeros_like(x_adv)
    for _ in range(steps):
        grad = grad_of(x_adv)
        with torch.no_grad():
            if momentum:
                l1 = torch.norm(grad.view(grad.shape[0], -1), 1, dim=1)
                grad = grad / torch.clamp(l1, min=1e-12).view(grad.shape[0], 1, 1, 1)
                g = mu * g + grad
                new_grad = g
            else:
                new_grad = grad
            x_adv = x_adv - alpha * new_grad.sign() if descend else x_adv + alpha * new_grad.sign()
            x_adv = torch.max(torch.min(x_adv, x_nat + eps), x_nat - eps)
            x_adv = torch.clamp(x_adv, 0.0, 1.0)
    return x_adv.clone().detach()


def linf_pgd(model: nn.Module, dat: torch.Tensor, lbl: torch.Tensor, eps: float, alpha: float, steps: int,
             momentum: bool = False, mu: float = 1.0) -> torch.Tensor:
    """``Linf_PGD(rand_start=False, is_targeted=False)`` with ``nn.CrossEntropyLoss()`` (mean)."""
    def grad_of(x_adv: torch.Tensor) -> torch.Tensor:
        x_adv.requires_grad = True
        loss = nn.CrossEntropyLoss()(model(x_adv), lbl)
        model.zero_grad()
        loss.backward()
        return x_adv.grad.data.clone().detach()

    return _steps(grad_of, dat, eps, alpha, steps, False, momentum, mu)


def linf_distillation(model: nn.Module, dat: torch.Tensor, target: torch.Tensor, eps: float, alpha: float,
                      steps: int, layer: int, before_relu: bool = True, mu: float = 1.0,
                      momentum: bool = True) -> torch.Tensor:
    """``Linf_distillation(rand_start=False)``: descend ``nn.MSELoss()`` between layer-``layer`` features
    of x' and of ``target`` (recomputed every step), ``loss.backward()`` with the model in its mode.
    The features are the model's own ``get_features`` when it has one (:class:`RefResNet20`), else
    robbench's taps."""
    from robbench.models import get_features as robbench_features

    def get_features(m: nn.Module, x: torch.Tensor, layer: int, before_relu: bool) -> torch.Tensor:
        own = getattr(m, "get_features", None)
        return own(x, layer, before_relu) if own is not None else robbench_features(m, x, layer, before_relu)

    def grad_of(x_adv: torch.Tensor) -> torch.Tensor:
        x_adv.requires_grad = True
        out = get_features(model, x_adv, layer, before_relu)
        tgt = get_features(model, target, layer, before_relu).data.clone().detach()
        loss = nn.MSELoss()(out, tgt)
        model.zero_grad()
        loss.backward()
        return x_adv.grad.data.clone().detach()

    return _steps(grad_of, dat, eps, alpha, steps, True, momentum, mu)


# ----------------------------------------------------------------------------------------------
# models/resnet.py ResNet-20 (CIFAR, 3x32x32)
# ----------------------------------------------------------------------------------------------


class RefBlock(nn.Module):
    def __init__(self, cin, planes, stride, downsample):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x, before_relu=False, intermediate=False):
        out = self.bn1(self.conv1(x))
        if intermediate:
            return out if before_relu else self.relu(out)
        out = self.bn2(self.conv2(self.relu(out)))
        out = out + (self.downsample(x) if self.downsample is not None else x)
        return out if before_relu else self.relu(out)


class RefResNet20(nn.Module):
    def __init__(self):
        super().__init__()
        self.inplanes = 16
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make(16, 1)
        self.layer2 = self._make(32, 2)
        self.layer3 = self._make(64, 2)
        self.avgpool = nn.AvgPool2d(8)
        self.fc = nn.Linear(64, 10)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.data.normal_(0, math.sqrt(2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)))
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.data.fill_(1)
                m.bias.data.zero_()

    def _make(self, planes, stride):
        ds = None
        if stride != 1 or self.inplanes != planes:  # built before the block, as the reference does
            ds = nn.Sequential(nn.Conv2d(self.inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
        blocks = [RefBlock(self.inplanes, planes, stride, ds)]
        self.inplanes = planes
        blocks += [RefBlock(planes, planes, 1, None) for _ in range(2)]
        return nn.Sequential(*blocks)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.avgpool(x).flatten(1))

    def get_features(self, x, layer, before_relu):
        x = self.bn1(self.conv1(x))
        if layer == 1:
            return x
        x = self.relu(x)
        for stage in (self.layer1, self.layer2, self.layer3):
            if layer <= 7:
                rel = layer - 1  # 1..6
                for blk in stage[: (rel - 1) // 2]:
                    x = blk(x)
                return stage[(rel - 1) // 2](x, before_relu, intermediate=(rel % 2 == 1))
            x = stage(x)
            layer -= 6
        return self.fc(self.avgpool(x).flatten(1))


def ref_state_as_ours(ref: nn.Module) -> dict[str, torch.Tensor]:
    return {k.replace("downsample", "shortcut"): v for k, v in ref.state_dict().items()}
