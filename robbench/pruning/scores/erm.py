"""ERM / HYDRA scaled init (inspire-group/hydra ``utils/model.py:initialize_scaled_score``; EED Eq. 9):
s = sqrt(6 / fan_in) * w / max|w| per layer (fan_in = in_channels/groups * kernel area)."""
from __future__ import annotations

import math

import torch
from torch import nn

from robbench.pruning.masked import masked_layers
from robbench.pruning.scores.base import ScoreData, register


@register("erm")
@torch.no_grad()
def erm_scores(net: nn.Module, data: ScoreData) -> dict[str, torch.Tensor]:
    out = {}
    for name, layer in masked_layers(net):
        w = layer.weight
        fan_in = nn.init._calculate_correct_fan(w, "fan_in")
        out[name] = math.sqrt(6.0 / fan_in) * w / w.abs().max().clamp_min(1e-12)
    return out
