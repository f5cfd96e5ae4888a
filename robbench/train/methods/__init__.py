"""Training methods: each module registers one per-batch objective in ``robbench.registry.METHODS``.

The method interface (what a new method, e.g. Ensemble-in-One's ``eio``, implements)::

    @dataclass
    class MyOptions:                       # validated from the entry's [train.params] table
        coeff: float = opt(0.5, min=0.0, help="... (paper §x / reference file:line)")

    @METHODS.register("mine", params=MyOptions)
    class Mine(Method):
        streams = 1             # independent training-data streams the loop zips (DVERGE: 2)
        needs_init_from = False # True: the entry must set train.init_from (a ConfigError otherwise)

        def setup(self, ctx): ...              # once, after model, optimizers and a resumed state exist
        def on_epoch_start(self, ctx, epoch): ...  # also called when resuming mid-epoch: must be a pure
                                               # function of (seed, epoch, method state), never draw
                                               # from the global RNGs
        def step(self, ctx, batch) -> dict[str, float]:
            # batch.x, batch.y: the main stream (on ctx.device, channels_last); batch.extra: the other
            # streams' (x, y). Build the loss, then ctx.update(loss): zero grads, backward, DDP
            # gradient all-reduce, optimizer step(s). A method that runs its own backward passes
            # (accumulating gradients) calls ctx.zero_grad() first and ctx.step_optimizers() last.
            # Return floats to log (averaged per epoch); values of ctx.extras["log_*"] are logged too.
        def state_dict(self) -> dict: ...      # only for state the RNGs and weights do not capture
        def load_state_dict(self, state): ...

``self.options`` holds the validated options dataclass (``None`` for a method without options).
Randomness inside ``step`` must come from torch's global RNG (or generators derived from
``ctx.seed``): the loop saves and restores every global RNG state with the resume state.

The BatchNorm mode during inner attacks/distillation is each method's named option; use
:func:`module_mode` to switch and restore it (the attack core never changes train/eval mode).
"""
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


# Importing the modules registers the methods.
from robbench.train.methods import adp, advt, baseline, dverge, dverge_advt, gal  # noqa: E402,F401
from robbench.train.methods import eio  # noqa: E402,F401  (Ensemble-in-One; engineer E)
from robbench.train.methods import adv_bases, eed, score_prune  # noqa: E402,F401  (AT bases, pruning, EED)
from robbench.train.methods import xie  # noqa: E402,F401  (Xie & Yuille adversarial training at scale)
