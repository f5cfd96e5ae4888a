"""``dverge_advt``: DVERGE + adversarial training (paper App. C.4, Eq. 6; reference ``train_dverge.py
--plus-adv``).

loss_i = λ·Σ_{j≠i} CE(f_i(x'_j), y_s) + CE(f_i(PGD_i(x_s)), y_s), where PGD_i attacks **member i alone**
(paper App. A: "adversarial examples are generated on each sub-model instead of the whole ensemble"),
eps 8/255, step 2/255, 10 steps, random start, members in train mode (reference). λ = ``coeff``:
1.0 (``--dverge-coeff`` default; paper C.4 "We set λ = 1.0") and 0.5 for the 8-member variant (C.4).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch.nn.functional as F

from robbench.config import opt
from robbench.registry import METHODS
from robbench.train.methods.base import Batch, per_member_metrics
from robbench.train.methods.advt import AdvOptions, pgd
from robbench.train.methods.dverge import DVERGEBase, DVERGEOptions, all_pairs_losses

if TYPE_CHECKING:
    from robbench.train.loop import TrainContext


@dataclass
class DVERGEAdvTOptions(DVERGEOptions, AdvOptions):
    coeff: float = opt(1.0, min=0.0, help="lambda on the DVERGE term (--dverge-coeff 1.0; C.4: 0.5 variant)")


@METHODS.register("dverge_advt", params=DVERGEAdvTOptions)
class DVERGEAdvT(DVERGEBase):
    def step(self, ctx: "TrainContext", batch: Batch) -> dict[str, float]:
        o: DVERGEAdvTOptions = self.options
        (x_t, _y_t), = batch.extra
        xs = self.distilled(ctx, batch.x, x_t)
        advs = [pgd(m, m, batch.x, batch.y, o) for m in ctx.members]
        div = all_pairs_losses(self.cross_logits(ctx, xs), batch.y)
        adv = [F.cross_entropy(m(a), batch.y) for m, a in zip(ctx.members, advs)]
        losses = [o.coeff * d + a for d, a in zip(div, adv)]
        ctx.update(sum(losses))
        out = per_member_metrics("loss", losses)
        out.update(per_member_metrics("dverge_loss", div))
        out.update(per_member_metrics("adv_loss", adv))
        return out
