"""HARP's global compression control (Zhao & Wressnegger, ICLR 2023; intellisec/harp ``utils/hw.py``;
EED App. A.2 Eq. 25): with layer keep rates k_l (learnable, :mod:`robbench.pruning.masked`) and n_l
weights per layer, L_hw = max(sum_l n_l k_l / sum_l n_l / k_target - 1, 0). HARP weighs it by
(epoch + 1) * gamma (its ``gamma_dynamic``); README CIFAR gamma = 0.01, and EED App. A.1 sets "the
hyperparameter" to 0.01 for small-scale and 0.1 for large-scale datasets (read here as this gamma)."""
from __future__ import annotations

import torch
from torch import nn

from robbench.pruning.masked import masked_layers


def global_keep(model: nn.Module) -> torch.Tensor:
    """sum_l n_l k_l / sum_l n_l (differentiable in the k_scores)."""
    layers = [layer for _, layer in masked_layers(model)]
    if not layers:
        return torch.tensor(1.0)
    n = [float(layer.weight.numel()) for layer in layers]
    total = sum(ni * torch.as_tensor(layer.rate()) for ni, layer in zip(n, layers))
    return total / sum(n)  # type: ignore[return-value]


def hardware_loss(model: nn.Module, target_keep: float) -> torch.Tensor:
    return torch.clamp(global_keep(model) / target_keep - 1.0, min=0.0)


def has_learnable_rates(model: nn.Module) -> bool:
    return any(layer.k_score is not None for _, layer in masked_layers(model))
