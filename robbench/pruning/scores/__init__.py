"""The four importance scores of EED §3.2, each an initialiser of the one score-mask framework
(:mod:`robbench.pruning.masked`): it fills every masked layer's ``scores`` before the prune phase.

- ``nis``  -- NISP's back-propagated neuron importance (Yu et al. CVPR 2018), :mod:`.nis`;
- ``erm``  -- HYDRA's scaled-magnitude init (Sehwag et al. 2020; EED Eq. 9), :mod:`.erm`;
- ``ase``  -- MAD's adversarial saliency 1/2 * H_ii * w^2 (Lee et al. CVPR 2022; EED Eq. 10), :mod:`.ase`;
- ``bnsf`` -- BNAP's BN-scaled weight |gamma * w / sqrt(var + eps)| (Wei et al. IJCNN 2021; EED Eq. 11),
  :mod:`.bnsf`.

A score function takes ``(net, data)`` where ``data`` is a :class:`ScoreData` (batches and the
attack that crafts adversarial examples; only ASE and NIS's ``logit_abs`` seed use it) and returns
``{layer name: score tensor shaped like its weight}``. Only the order of scores *within* a layer
matters for the per-layer top-k mask, so per-layer constant factors are free.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from robbench.pruning.masked import masked_layers
from robbench.pruning.scores.base import SCORES, ScoreData, ScoreFn, register  # noqa: F401  (the package's API)


@torch.no_grad()
def apply_scores(net: nn.Module, scores: dict[str, torch.Tensor]) -> None:
    """Write scores into the masked layers and recompute their masks."""
    layers = dict(masked_layers(net))
    missing = sorted(set(layers) - set(scores))
    if missing:
        raise ValueError(f"score function gave no scores for {missing[0]}")
    for name, layer in layers.items():
        s = scores[name]
        if s.shape != layer.scores.shape:
            raise ValueError(f"{name}: score shape {tuple(s.shape)} != weight shape {tuple(layer.scores.shape)}")
        layer.scores.copy_(s.to(layer.scores))
        layer.refresh_mask()


def initialise_scores(net: nn.Module, name: str, data: ScoreData | None = None) -> None:
    """Fill ``net``'s masked layers with score ``name`` and set the masks from them."""
    from robbench.pruning.scores import ase, bnsf, erm, nis  # noqa: F401  (register)

    apply_scores(net, SCORES[name](net, data or ScoreData()))


def score_names() -> Iterable[str]:
    from robbench.pruning.scores import ase, bnsf, erm, nis  # noqa: F401

    return sorted(SCORES)
