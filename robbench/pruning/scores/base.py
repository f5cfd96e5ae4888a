"""The score-function registry and the data a score may use: a leaf module, so the score modules
(:mod:`.nis`, :mod:`.erm`, :mod:`.ase`, :mod:`.bnsf`) register without importing their package."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

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


@contextlib.contextmanager
def layer_io(layers: Sequence[tuple[str, nn.Module]]) -> Iterator[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]]:
    """``(inputs, outputs)`` of each named layer's forward while the block runs: inputs detached, outputs
    with ``retain_grad`` (the second-order scores read the loss gradient at each layer's output); the
    hooks are removed on exit."""
    inputs: dict[str, torch.Tensor] = {}
    outs: dict[str, torch.Tensor] = {}

    def hook(name: str) -> Callable[[nn.Module, tuple, torch.Tensor], None]:
        def fwd(m: nn.Module, a: tuple, o: torch.Tensor) -> None:
            inputs[name] = a[0].detach()
            if o.requires_grad:
                o.retain_grad()
            outs[name] = o
        return fwd

    handles = [layer.register_forward_hook(hook(name)) for name, layer in layers]
    try:
        yield inputs, outs
    finally:
        for h in handles:
            h.remove()
