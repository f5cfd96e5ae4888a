"""Ensemble-in-One (Cai et al.): the random gated network transform ('rgn'), derivation of single paths
(``robbench derive``) and random-path deployment. The training method lives in
``robbench/train/methods/eio.py``."""
from __future__ import annotations

from typing import Any

from torch import nn

from robbench.eio.rgn import RandomGatedNetwork, RGNOptions, find_rgn, rgn_transform
from robbench.registry import MODEL_TRANSFORMS

__all__ = ["RandomGatedNetwork", "RGNOptions", "find_rgn", "rgn_transform"]


@MODEL_TRANSFORMS.register("rgn", params=RGNOptions)
def rgn(net: nn.Module, options: Any = None, info: Any = None, **kwargs: Any) -> RandomGatedNetwork:
    """``model.transform = 'rgn'``: every conv(+norm) becomes a random gated block (see rgn.py).
    Optional keywords: ``info`` (DatasetInfo), ``rebuild`` (factory of a fresh plain member)."""
    return rgn_transform(net, options, info=info, **kwargs)
