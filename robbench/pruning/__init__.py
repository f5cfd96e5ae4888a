"""Score-based adversarial pruning as one framework (HYDRA straight-through top-k scores, optional
HARP learnable per-layer rates): masked layers (``masked.py``), the 'masked' model transform
(``transform.py``), the four EED importance scores as initialisers (``scores/``), HARP's compression
loss (``rates.py``) and measurements from the masks (``measure.py``). The training method is
``score_prune`` in ``robbench/train/methods/score_prune.py`` (prune phase, then fine-tune phase)."""
from __future__ import annotations

from typing import Any

from torch import nn

from robbench.pruning.masked import MaskedConv2d, MaskedLinear, masked_layers, set_phase
from robbench.pruning.measure import Footprint, bake_masks, footprint
from robbench.pruning.transform import MaskOptions, mask_network
from robbench.registry import MODEL_TRANSFORMS

__all__ = ["Footprint", "MaskOptions", "MaskedConv2d", "MaskedLinear", "bake_masks", "footprint",
           "mask_network", "masked_layers", "set_phase"]


@MODEL_TRANSFORMS.register("masked", params=MaskOptions)
def masked(net: nn.Module, options: Any = None, **kwargs: Any) -> nn.Module:
    """``model.transform = 'masked'``: conv (and linear) layers get scores and a 0/1 mask."""
    return mask_network(net, options)
