"""``advt``: adversarial training of an ensemble (DVERGE paper App. A; reference ``train/train_adv.py``).

Per batch one PGD against the **whole ensemble** (its log-mean-softmax output, so CE is the NLL of
the averaged probabilities), eps 8/255, step 2/255, 10 steps, uniform random start; then every member
takes CE(f_i(x_adv), y) and a step of its own SGD. The reference attacks with the members in train mode
(BatchNorm uses batch statistics and updates its running statistics on every attack forward):
``attack_bn_mode = "train"`` reproduces that, ``"eval"`` attacks with running statistics (Madry-style).

:class:`AdvOptions` and :func:`pgd` are shared with ADP/GAL ``plus_adv`` and DVERGE+AdvT.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from robbench.config import opt
from robbench.registry import METHODS
from robbench.train.methods.base import Batch, BNMode, Method, member_ce, module_mode, per_member_metrics

if TYPE_CHECKING:
    from robbench.train.loop import TrainContext


@dataclass
class AdvOptions:
    # DVERGE arguments.py adv_train_args / dverge_train_args: --eps 8/255, --alpha 2/255, --steps 10;
    # paper App. A: "10-step PGD with eps = 8/255 and a step size alpha = 2/255".
    adv_eps: float = opt(8 / 255, min=0.0, max=1.0, help="PGD L-inf radius (reference 8/255)")
    adv_step: float = opt(2 / 255, min=0.0, max=1.0, help="PGD step size (reference 2/255)")
    adv_steps: int = opt(10, min=1, max=10000, help="PGD steps (reference 10)")
    # distillation.py Linf_PGD(rand_start=True): uniform(-eps, eps) start, clipped to [0, 1].
    adv_rand_start: bool = opt(True, help="uniform random start (reference: yes)")
    # The reference trainers call m.train() once per epoch and attack in that mode.
    attack_bn_mode: BNMode = opt("train", help="BatchNorm mode while crafting: 'train' = reference, 'eval'")


def pgd(model: Callable[[torch.Tensor], torch.Tensor], module: nn.Module, x: torch.Tensor, y: torch.Tensor,
        o: AdvOptions) -> torch.Tensor:
    """Untargeted L-inf PGD with CE through the shared attack core (last iterate, like the reference's
    ``Linf_PGD``), with ``module`` in ``o.attack_bn_mode`` for the attack only. Returns a detached tensor."""
    from robbench.attacks.core import iterative_attack

    with module_mode(module, o.attack_bn_mode):
        # evaluate=False: exactly ``adv_steps`` gradient forwards, no extra forward that would move BN
        # statistics in train mode; seed=None: the random start draws from the global torch RNG (saved
        # with the resume state), as the reference's torch.FloatTensor(...).uniform_().
        res = iterative_attack(model, x, y, o.adv_eps, norm="linf", steps=o.adv_steps, step_size=o.adv_step,
                               loss="ce", init="uniform" if o.adv_rand_start else "none", evaluate=False,
                               seed=None)
    return res.x_adv.detach()


@METHODS.register("advt", params=AdvOptions)
class AdvT(Method):
    def step(self, ctx: "TrainContext", batch: Batch) -> dict[str, float]:
        x_adv = pgd(ctx.model, ctx.model, batch.x, batch.y, self.options)
        losses = member_ce(ctx.members, x_adv, batch.y)
        ctx.update(sum(losses))  # decoupled per-member losses: equal to per-member backward + step
        return per_member_metrics("adv_loss", losses)
