"""``baseline``: independent cross-entropy per member (DVERGE ``train/train_baseline.py``: per batch each
model i does CE(f_i(x), y) and a step of its own SGD; the members never interact)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from robbench.registry import METHODS
from robbench.train.methods.base import Batch, Method, member_ce, per_member_metrics

if TYPE_CHECKING:
    from robbench.train.loop import TrainContext


@METHODS.register("baseline")
class Baseline(Method):
    def step(self, ctx: "TrainContext", batch: Batch) -> dict[str, float]:
        losses = member_ce(ctx.members, batch.x, batch.y)
        # The losses decouple (member i's parameters only see loss i), so one backward of the sum gives
        # exactly the per-member gradients of the reference's separate backward passes.
        ctx.update(sum(losses))
        return per_member_metrics("loss", losses)
