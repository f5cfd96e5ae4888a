"""BNSF / BNAP (Wei, Zhu & Xia, IJCNN 2021; EED Eq. 11): the effective weight of a conv followed by
BatchNorm, s_jk = |gamma_j * w_jk / sqrt(var_j + eps)| over output channel j. EED prints sigma^2 + eps
without the square root; BN divides by the standard deviation, so the root is used (notes §B).

The conv->BN pairs are found by tracing one forward (a BN whose input is exactly a conv's output).
A layer no BN follows (the classifier, a conv feeding an addition) keeps |w| (the effective weight with
gamma = 1, var + eps = 1): an assumption, BNAP only defines the score for conv+BN pairs.
"""
from __future__ import annotations

import torch
from torch import nn

from robbench.pruning.masked import masked_layers
from robbench.pruning.scores.base import ScoreData, register
from robbench.pruning.trace import conv_norm_pairs


@register("bnsf")
@torch.no_grad()
def bnsf_scores(net: nn.Module, data: ScoreData) -> dict[str, torch.Tensor]:
    pairs = conv_norm_pairs(net)
    out = {}
    for name, layer in masked_layers(net):
        w = layer.weight
        bn = pairs.get(name)
        if isinstance(bn, nn.modules.batchnorm._BatchNorm) and bn.running_var is not None:
            gamma = bn.weight if bn.weight is not None else torch.ones_like(bn.running_var)
            scale = gamma / torch.sqrt(bn.running_var + bn.eps)
            out[name] = (w * scale.reshape(-1, *([1] * (w.dim() - 1)))).abs()
        else:
            out[name] = w.abs()
    return out
