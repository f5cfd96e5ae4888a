"""Randomized models (a forward that draws randomness, e.g. Ensemble-in-One random-path inference) and
the expectation-over-transformation wrapper attacks take their gradients through."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def is_randomized(model: nn.Module) -> bool:
    """A model whose forward draws randomness (``randomized = True`` on it or on a submodule)."""
    return any(bool(getattr(m, "randomized", False)) for m in model.modules())


class EOT(nn.Module):
    """Expectation over transformation: log of the mean softmax over ``k`` forward draws (Athalye et al.
    2018); the gradient of a loss on it is the gradient of the expected prediction."""

    def __init__(self, model: nn.Module, k: int) -> None:
        super().__init__()
        self.model, self.k = model, int(k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = torch.stack([F.softmax(self.model(x), dim=-1) for _ in range(self.k)]).mean(0)
        return p.clamp_min(1e-40).log()
