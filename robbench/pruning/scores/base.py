"""The score-function registry and the data a score may use: a leaf module, so the score modules
(:mod:`.nis`, :mod:`.erm`, :mod:`.ase`, :mod:`.bnsf`) register without importing their package."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

ScoreFn = Callable[[nn.Module, "ScoreData"], dict[str, torch.Tensor]]


@dataclass
class ScoreData:
    """What a data-dependent score may use."""

    batches: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    craft: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None  # (x, y) -> x_adv
    options: dict[str, object] = field(default_factory=dict)


SCORES: dict[str, ScoreFn] = {}


def register(name: str) -> Callable[[ScoreFn], ScoreFn]:
    def deco(fn: ScoreFn) -> ScoreFn:
        SCORES[name] = fn
        return fn
    return deco
