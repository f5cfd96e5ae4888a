"""``dverge``: DVERGE (Yang et al., NeurIPS 2020), reference ``train/train_dverge.py``.

Per epoch a distillation layer l (uniform in 1..L, L = the member's feature taps, 20 for ResNet-20;
reference ``random.randint(1, depth)``), or a fixed layer (``--distill-fixed-layer --distill-layer``).
Per batch, two independent streams give (x_s, y_s) and (x_t, y_t) (reference ``DistillationLoader``);
every member j distils x'_j from x_s towards x_t's layer-l features (:mod:`robbench.train.distill`)
with the current weights; then member i is trained on the **all-pairs** loss
    loss_i = Σ_{j≠i} CE(f_i(x'_j), y_s)
with one forward per j (BatchNorm batch statistics per set, as the reference) and its own optimizer.

BatchNorm mode during distillation: the reference distils in train mode (``bn_mode = "train"``);
``"eval"`` uses running statistics. Target features are computed once per batch
(``recompute_target_each_step = true`` recomputes them every step as the reference, which only
changes the BN running statistics). ``iterate = "x"`` (default) is the reference's x' update to the
bit (``Linf_distillation``); ``"delta"`` the advertorch form robbench used before (last-bit differences).

Layer sequence: ``random.Random(seed)`` drawn once per epoch, i.e. the reference's
``random.seed(seed)`` + one ``random.randint(1, 20)`` per epoch (its main process draws nothing else
from Python's ``random``); a pure function of (seed, epoch), so resuming mid-epoch redraws it exactly.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F

from robbench.config import opt
from robbench.errors import ConfigError
from robbench.registry import METHODS
from robbench.train.methods.base import Batch, BNMode, Method, module_mode, per_member_metrics

if TYPE_CHECKING:
    from robbench.train.loop import TrainContext


@dataclass
class DVERGEOptions:
    # DVERGE arguments.py dverge_train_args; paper §4.1 (eps 0.07, step 0.007, 10 steps).
    eps: float = opt(0.07, min=0.0, max=1.0, help="distillation L-inf radius (--distill-eps 0.07)")
    step_size: float = opt(0.007, min=0.0, max=1.0, help="distillation step (--distill-alpha 0.007)")
    steps: int = opt(10, min=1, max=10000, help="distillation steps (--distill-steps 10)")
    momentum: float = opt(1.0, min=0.0, help="mu of the momentum (Linf_distillation mu=1; 0 = --distill-no-momentum)")
    rand_start: bool = opt(False, help="uniform random start (--distill-rand-start, off)")
    layer: int = opt(0, min=0, help="0 = random layer per epoch (reference); L = fixed layer L (Table 7: 7, 13, 19, 20)")
    before_relu: bool = opt(True, help="features before the ReLU (hard-coded True in the reference)")
    bn_mode: BNMode = opt("train", help="BatchNorm mode while distilling: 'train' = reference, 'eval'")
    recompute_target_each_step: bool = opt(False, help="recompute target features every step (reference; "
                                           "only moves BN running stats) instead of once per batch")
    batched_distillation: bool = opt(True, help="distil all members in one attack call (same result as a loop)")
    iterate: Literal["x", "delta"] = opt("x", help="'x' = distillation.py Linf_distillation's in-place x' update "
                                         "(reference, to the bit); 'delta' = advertorch's x_s + delta form")


def layer_for_epoch(seed: int, epoch: int, num_layers: int) -> int:
    """The reference's random layer of 0-based ``epoch``: random.seed(seed), then randint(1, L) per epoch."""
    rng = random.Random(seed)
    layer = 0
    for _ in range(epoch + 1):
        layer = rng.randint(1, num_layers)
    return layer


def all_pairs_losses(logits: list[list[torch.Tensor | None]], y: torch.Tensor) -> list[torch.Tensor]:
    """loss_i = Σ_{j≠i} CE(logits[i][j], y); ``logits[i][j]`` = f_i(x'_j) (the diagonal is ignored)."""
    n = len(logits)
    out = []
    for i in range(n):
        terms = [F.cross_entropy(logits[i][j], y) for j in range(n) if j != i]  # type: ignore[arg-type]
        out.append(sum(terms))
    return out


class DVERGEBase(Method):
    """Distillation and the all-pairs loss; :class:`DVERGE` and DVERGE+AdvT add only their objective."""

    streams = 2
    num_layers = 0
    layer = 0

    def setup(self, ctx: "TrainContext") -> None:
        from robbench.models import num_feature_layers

        o = self.options
        if len(ctx.members) < 2:
            raise ConfigError("DVERGE needs at least 2 members", file=ctx.entry.source, field="model.members")
        self.num_layers = num_feature_layers(ctx.members[0])
        if self.num_layers == 0:
            raise ConfigError(f"architecture {ctx.entry.model.arch!r} has no feature taps for distillation",
                              file=ctx.entry.source, field="model.arch")
        if o.layer > self.num_layers:
            raise ConfigError(f"layer {o.layer} does not exist; allowed: 0 (random) or 1..{self.num_layers}",
                              file=ctx.entry.source, field="train.params.layer")

    def on_epoch_start(self, ctx: "TrainContext", epoch: int) -> None:
        o = self.options
        self.layer = o.layer if o.layer else layer_for_epoch(ctx.seed, epoch, self.num_layers)
        ctx.extras["log_distill_layer"] = self.layer

    def distilled(self, ctx: "TrainContext", x_s: torch.Tensor, x_t: torch.Tensor) -> list[torch.Tensor]:
        from robbench.train.distill import distill

        o = self.options
        with module_mode(ctx.model, o.bn_mode):
            return distill(ctx.members, x_s, x_t, self.layer, eps=o.eps, step_size=o.step_size, steps=o.steps,
                           momentum=o.momentum, rand_start=o.rand_start, before_relu=o.before_relu,
                           recompute_target=o.recompute_target_each_step, batched=o.batched_distillation,
                           iterate=o.iterate)

    @staticmethod
    def cross_logits(ctx: "TrainContext", xs: list[torch.Tensor]) -> list[list[torch.Tensor | None]]:
        """f_i(x'_j) for every i ≠ j, one forward per (i, j) as the reference."""
        members = ctx.members
        return [[None if i == j else m(x) for j, x in enumerate(xs)] for i, m in enumerate(members)]


@METHODS.register("dverge", params=DVERGEOptions)
class DVERGE(DVERGEBase):
    def step(self, ctx: "TrainContext", batch: Batch) -> dict[str, float]:
        (x_t, _y_t), = batch.extra
        xs = self.distilled(ctx, batch.x, x_t)
        losses = all_pairs_losses(self.cross_logits(ctx, xs), batch.y)
        ctx.update(sum(losses))  # loss i touches only member i: equal to per-member backward + step
        return per_member_metrics("loss", losses)
