"""The method interface every training method implements (see :mod:`robbench.train.methods`): the
:class:`Method` base class, the :class:`Batch` it steps on, and helpers shared by several methods.
A leaf module: methods import it, the package imports the methods, nothing imports back."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, Literal

import torch
from torch import nn

if TYPE_CHECKING:
    from robbench.train.loop import TrainContext

BNMode = Literal["train", "eval"]


@dataclass
class Batch:
    """One training step's data: the main stream and any extra independent streams."""

    x: torch.Tensor
    y: torch.Tensor
    extra: tuple[tuple[torch.Tensor, torch.Tensor], ...] = field(default_factory=tuple)


class Method:
    """Base class: defaults for the optional hooks (see the module docstring)."""

    streams: int = 1
    needs_init_from: bool = False

    def __init__(self, options: Any = None) -> None:
        self.options = options

    def setup(self, ctx: "TrainContext") -> None:
        pass

    def on_epoch_start(self, ctx: "TrainContext", epoch: int) -> None:
        pass

    def step(self, ctx: "TrainContext", batch: Batch) -> dict[str, float]:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


@contextlib.contextmanager
def module_mode(module: nn.Module, mode: BNMode) -> Iterator[nn.Module]:
    """Put ``module`` (every submodule) in train or eval mode; restore each submodule's flag after."""
    saved = [(m, m.training) for m in module.modules()]
    module.train(mode == "train")
    try:
        yield module
    finally:
        for m, flag in saved:
            m.training = flag


def member_ce(members: list[nn.Module], x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """Cross-entropy of each member on (x, y), one forward per member."""
    return [nn.functional.cross_entropy(m(x), y) for m in members]


def per_member_metrics(name: str, values: list[torch.Tensor]) -> dict[str, float]:
    """{name: mean over members, name/i: member i} as floats for the log."""
    vals = [float(v.detach()) for v in values]
    out = {name: sum(vals) / len(vals)}
    out.update({f"{name}/{i}": v for i, v in enumerate(vals)})
    return out
