"""``eio``: Ensemble-in-One training of a random gated network (preprint/ICLR Alg. 1; reference
cai-y13/Ensemble-in-One ``rgn_manager.py``). The entry's model must be one member with
``model.transform = 'rgn'``.

Two phases, each its own entry and run (so each runs the paper's full schedule, lr 0.1 ÷10 at 100/150:
the reference trains them in one process and its step schedule mutates ``init_lr``, so its
diversification silently starts at lr 0.001; separate runs cannot inherit that):

- ``phase = 'pretrain'`` (Alg. 1 lines 1-7, reference ``warm_up``): per batch one uniformly random
  path, clean CE, one step.
- ``phase = 'diversify'`` (lines 8-26, reference ``train``), started from the pre-trained RGN
  (``train.init_from``): per batch
    l ~ U{1..L} (L = the feature layers: 20 for ResNet-20, 14 for VGG-16; min(k, L) for topk);
    p_cur = min(p, n**g_l) paths that pairwise differ within the first g_l gates (those feeding layer l);
    x'_k = distillation of x_s towards x_t's layer-l features on path k (eps_d, 10 steps of eps_d/10,
           uniform random start, plain sign steps, BatchNorm in eval mode, features after the ReLU:
           the reference's choices, each a named option; one path at a time unless batched_distillation);
    loss_i = s * Σ_{j≠i} CE(f_i(x'_j), y_s)  [+ s * CE(f_i(PGD_i(x_s)), y_s) with adv_train, Eq. 5],
           s = 1/p_cur (reference) or 1 (Alg. 1 line 21);
    gradients accumulate over every (i, j) term (one backward per forward, so activation memory stays
    one path's), then one optimizer step for the whole network (Alg. 1 line 24).

Random draws (layer, paths) come from a generator seeded by (seed, epoch, batch): identical on every
data-parallel rank and after a resume. Distillation/PGD random starts use the global RNG (saved with
the resume state). Between steps the RGN is left in its deployment gate mode, so the loop's per-epoch
test accuracy is the random-path (per-input) accuracy.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from robbench.config import opt
from robbench.data.base import seeded_generator
from robbench.eio.rgn import RandomGatedNetwork, find_rgn
from robbench.errors import ConfigError
from robbench.registry import METHODS
from robbench.train.methods.base import Batch, BNMode, Method, module_mode
from robbench.train.methods.advt import AdvOptions, pgd

if TYPE_CHECKING:
    from robbench.train.loop import TrainContext


@dataclass
class EIOOptions(AdvOptions):
    phase: Literal["pretrain", "diversify"] = opt(
        "diversify", help="'pretrain': random path per batch, clean CE (Alg. 1 l.1-7); 'diversify': "
                          "vulnerability diversification (l.8-26), from the pre-trained RGN via train.init_from")
    paths: int = opt(3, min=2, max=64, help="p paths per batch (paper §4.1: 3; reference checkpoint *_batch3_*)")
    eps_d: float = opt(0.07, min=0.0, max=1.0, help="distillation L-inf radius (paper §4.1: 0.07; VGG-16: 0.03)")
    distill_steps: int = opt(10, min=1, max=10000, help="distillation steps (paper §4.1: 10)")
    distill_step_size: float | None = opt(None, min=0.0, max=1.0, help="none = eps_d/10 (paper §4.1)")
    distill_rand_start: bool = opt(True, help="uniform random start (reference distillation.py: yes; DVERGE: no)")
    distill_momentum: float = opt(0.0, min=0.0, help="momentum mu (reference: 0 = plain sign steps; DVERGE: 1)")
    distill_bn_mode: BNMode = opt("eval", help="BatchNorm mode while distilling (reference: eval; DVERGE: train)")
    feature_before_relu: bool = opt(False, help="distil features before the ReLU (reference: after, except "
                                                "the stem; DVERGE: before)")
    layer: int = opt(0, min=0, help="0 = random layer per batch (Alg. 1 line 11, reference); L = fixed layer")
    loss_scale: Literal["reference", "paper"] = opt(
        "reference", help="'reference': each path's loss / p_cur (rgn_manager.py); 'paper': no factor (Alg. 1 l.21)")
    adv_train: bool = opt(False, help="EIO+AdvT (preprint App. A.2, Eq. 5): + CE on PGD examples of each path "
                                      "(PGD options adv_*: 8/255, 2/255, 10 steps, random start, train-mode BN "
                                      "as the reference --adv_train)")
    batched_distillation: bool = opt(False, help="false: distil one path at a time (activation memory of one "
                                                 "model, the paper's App. A.3 claim); true: the p paths in one "
                                                 "attack call (p x the activations; faster on GPUs)")
    from_scratch: bool = opt(False, help="allow 'diversify' without train.init_from (skips pre-training)")


class PathView(nn.Module):
    """One path of an RGN as a module: opens ``path`` then runs the gated network. Not registered in the
    model (no parameters of its own); :func:`robbench.models.get_features` finds the taps through it."""

    def __init__(self, rgn: RandomGatedNetwork, path: Sequence[int]) -> None:
        super().__init__()
        object.__setattr__(self, "rgn", rgn)  # not a submodule: the view must not own the weights
        self.net = rgn.net  # submodule reference so get_features sees the taps
        self.path = tuple(path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.rgn.set_path(self.path)  # type: ignore[attr-defined]
        return self.net(x)


@METHODS.register("eio", params=EIOOptions)
class EnsembleInOne(Method):
    def __init__(self, options: EIOOptions | None = None) -> None:
        super().__init__(options or EIOOptions())
        self.streams = 2 if self.options.phase == "diversify" else 1  # x_t from an independent stream
        self.rgn: RandomGatedNetwork | None = None

    def setup(self, ctx: "TrainContext") -> None:
        o: EIOOptions = self.options
        file = ctx.entry.source
        if len(ctx.members) != 1 or ctx.entry.model.transform != "rgn":
            raise ConfigError("Ensemble-in-One trains one random gated network; allowed: model.members = 1 with "
                              "model.transform = 'rgn'", file=file, field="model.transform")
        self.rgn = find_rgn(ctx.members[0])
        if o.phase == "diversify":
            if not ctx.entry.train.init_from and not o.from_scratch:
                raise ConfigError("the diversification phase starts from the pre-trained RGN (Alg. 1 lines 1-7); "
                                  "set train.init_from to the 'pretrain' entry, or train.params.from_scratch = true",
                                  file=file, field="train.init_from")
            if o.layer > self.rgn.max_layer:
                raise ConfigError(f"layer {o.layer} is out of range; allowed: 0 (random) or 1..{self.rgn.max_layer}",
                                  file=file, field="train.params.layer")
        if o.adv_train and o.phase != "diversify":
            raise ConfigError("adv_train belongs to the diversification phase (Eq. 5)", file=file,
                              field="train.params.adv_train")

    def _generator(self, ctx: "TrainContext") -> torch.Generator:
        return seeded_generator("eio", ctx.seed, ctx.epoch, ctx.step)

    def step(self, ctx: "TrainContext", batch: Batch) -> dict[str, float]:
        rgn = self.rgn
        assert rgn is not None
        mode = rgn.options.gate_mode
        try:
            if self.options.phase == "pretrain":
                return self._pretrain(ctx, rgn, batch)
            return self._diversify(ctx, rgn, batch)
        finally:
            rgn.set_path(rgn.path, mode=mode)  # back to deployment gates for the loop's evaluation

    def _pretrain(self, ctx: "TrainContext", rgn: RandomGatedNetwork, batch: Batch) -> dict[str, float]:
        rgn.set_path(rgn.sample_path(self._generator(ctx)))
        loss = F.cross_entropy(rgn(batch.x), batch.y)
        ctx.update(loss)
        return {"loss": float(loss.detach())}

    def distill_paths(self, ctx: "TrainContext", rgn: RandomGatedNetwork, paths: list[tuple[int, ...]],
                      x_s: torch.Tensor, x_t: torch.Tensor, layer: int) -> list[torch.Tensor]:
        """x'_k for each path (one attack per path, or one batched call over the paths)."""
        from robbench.train.distill import distill

        o: EIOOptions = self.options
        step = o.distill_step_size if o.distill_step_size is not None else o.eps_d / 10
        views = [PathView(rgn, p) for p in paths]
        with module_mode(ctx.model, o.distill_bn_mode):
            return distill(views, x_s, x_t, layer, eps=o.eps_d, step_size=step, steps=o.distill_steps,
                           momentum=o.distill_momentum or None, rand_start=o.distill_rand_start,
                           before_relu=o.feature_before_relu, batched=o.batched_distillation)

    def _diversify(self, ctx: "TrainContext", rgn: RandomGatedNetwork, batch: Batch) -> dict[str, float]:
        o: EIOOptions = self.options
        (x_t, _y_t), = batch.extra
        gen = self._generator(ctx)
        layer = o.layer or int(torch.randint(1, rgn.max_layer + 1, (1,), generator=gen))
        paths = rgn.sample_paths(o.paths, layer, gen)
        p = len(paths)
        xs = self.distill_paths(ctx, rgn, paths, batch.x, x_t, layer)
        scale = 1.0 / p if o.loss_scale == "reference" else 1.0
        advs: list[torch.Tensor] = []
        if o.adv_train:  # crafted before any update, all with the same weights (reference order)
            advs = [pgd(PathView(rgn, q), ctx.model, batch.x, batch.y, o) for q in paths]
        ctx.zero_grad()
        div_total, adv_total = 0.0, 0.0
        for i, path in enumerate(paths):
            rgn.set_path(path)
            for j, x_j in enumerate(xs):
                if j == i:
                    continue
                loss = scale * F.cross_entropy(rgn.net(x_j), batch.y)
                loss.backward()  # accumulate: one forward's activations alive at a time
                div_total += float(loss.detach())
            if o.adv_train:
                loss = scale * F.cross_entropy(rgn.net(advs[i]), batch.y)
                loss.backward()
                adv_total += float(loss.detach())
        ctx.step_optimizers()
        out = {"loss": div_total + adv_total, "div_loss": div_total, "layer": float(layer), "paths": float(p)}
        if o.adv_train:
            out["adv_loss"] = adv_total
        return out
