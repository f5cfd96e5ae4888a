"""``model.transform = 'masked'``: every Conv2d and Linear of a member becomes a score-masked layer
(:mod:`robbench.pruning.masked`) with the keep rate ``1 - sparsity``.

HYDRA (inspire-group/hydra ``models/layers.py``) and HARP build every conv and linear layer as a
Subnet layer, first and last included; ``layers = 'conv'`` leaves the Linear layers dense.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

from robbench.config import opt, parse_dataclass
from robbench.errors import ConfigError
from robbench.pruning.masked import MaskedConv2d, MaskedLinear


@dataclass
class MaskOptions:
    sparsity: float = opt(0.8, min=0.0, max=0.999, help="fraction of each masked layer's weights pruned "
                                                        "(EED §5.2: s_r = 80%; per sub-model c_r = 95% for s_r = 80%)")
    layers: Literal["conv_linear", "conv"] = opt("conv_linear", help="which layers are masked (HYDRA/HARP: every "
                                                                     "conv and linear layer)")
    learn_rates: bool = opt(False, help="HARP: a learnable keep rate per layer (k_score) under a global target; "
                                        "false = HYDRA's fixed per-layer rate")
    k_min_factor: float = opt(0.1, min=0.0, max=1.0, help="HARP k_min = factor * target keep rate "
                                                          "(HARP set_prune_rate alpha; README: 0.1)")
    k_score_init: float | None = opt(None, help="HARP initial k_score; none = the value whose rate equals the "
                                                "target (HARP's uniform '*_uni' strategies); HARP layers.py "
                                                "constant is 1.0")

    @property
    def keep(self) -> float:
        return 1.0 - self.sparsity

    def validate(self, file: str) -> None:
        if self.keep <= 0:
            raise ConfigError("sparsity must leave some weights; allowed: [0, 0.999]", file=file,
                              field="model.transform_options.sparsity")


def initial_k_score(o: MaskOptions) -> float:
    """k_score with keep_rate(k_score, k_min) = target keep (inverse sigmoid), unless given."""
    if o.k_score_init is not None:
        return o.k_score_init
    k_min = o.k_min_factor * o.keep
    frac = (o.keep - k_min) / (1 - k_min) if k_min < 1 else 1.0
    frac = min(max(frac, 1e-6), 1 - 1e-6)
    return math.log(frac / (1 - frac))


def mask_network(net: nn.Module, options: MaskOptions | dict[str, Any] | None = None) -> nn.Module:
    """Replace (in place) every Conv2d (and Linear) of ``net`` by its masked version; returns ``net``."""
    o = options if isinstance(options, MaskOptions) else parse_dataclass(
        MaskOptions, dict(options or {}), file="model.transform_options", prefix="model.transform_options")
    k_min = o.k_min_factor * o.keep if o.learn_rates else 0.0
    k0 = initial_k_score(o)
    for parent in list(net.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, (MaskedConv2d, MaskedLinear)):
                continue
            if isinstance(child, nn.Conv2d):
                new: nn.Module = MaskedConv2d.from_dense(child, o.keep, o.learn_rates, k_min, k0)
            elif isinstance(child, nn.Linear) and o.layers == "conv_linear":
                new = MaskedLinear.from_dense(child, o.keep, o.learn_rates, k_min, k0)
            else:
                continue
            setattr(parent, name, new)
    return net
