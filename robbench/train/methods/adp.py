"""``adp``: Adaptive Diversity Promoting (Pang et al. 2019), as ported in DVERGE ``train/train_adp.py``.

loss = Σ_i CE(f_i(x), y) − α·H(mean_i p_i) − β·log det(G + 1e-6·I), G_b = M̃_bᵀM̃_b the members' Gram
matrix of L2-normalised non-true-class probabilities (per sample; the log det and the entropy are
averaged over the batch; the entropy uses log(p + 1e-20)). α = 2, β = 0.5 (DVERGE arguments.py
adp_train_args; ADP README for CIFAR). One joint Adam over all members (lr 1e-3, wd 1e-4, eps 1e-7,
train_adp.py), set in the zoo entry's optimizer table.

``plus_adv`` (reference ``--plus-adv``) adds Σ_i CE(f_i(x_adv), y), x_adv = PGD on the ensemble.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from robbench.config import opt
from robbench.registry import METHODS
from robbench.train.methods.base import Batch, Method
from robbench.train.methods.advt import AdvOptions, pgd

if TYPE_CHECKING:
    from robbench.train.loop import TrainContext

LOG_OFFSET = 1e-20  # train_adp.py self.log_offset
DET_OFFSET = 1e-6  # train_adp.py self.det_offset


@dataclass
class ADPOptions(AdvOptions):
    alpha: float = opt(2.0, min=0.0, help="ensemble-entropy weight (DVERGE arguments.py --alpha 2.0)")
    beta: float = opt(0.5, min=0.0, help="log-det weight (DVERGE arguments.py --beta 0.5)")
    plus_adv: bool = opt(False, help="add CE on PGD examples against the ensemble (reference --plus-adv)")


def ensemble_entropy(probs: torch.Tensor) -> torch.Tensor:
    """H(mean_i p_i) per sample; ``probs`` [M, B, C]."""
    p = probs.mean(dim=0)
    return -(p * torch.log(p + LOG_OFFSET)).sum(dim=-1)


def non_true_gram(probs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """[B, M, M] Gram matrices of each member's L2-normalised non-true-class probabilities."""
    m, b, c = probs.shape
    keep = ~F.one_hot(y, c).to(torch.bool)  # [B, C]
    other = probs.permute(1, 0, 2)[keep[:, None, :].expand(b, m, c)].reshape(b, m, c - 1)
    other = other / torch.norm(other, p=2, dim=-1, keepdim=True)
    return other @ other.transpose(1, 2)


def log_det_diversity(probs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """log det(G + 1e-6·I) per sample (the ADP ensemble diversity)."""
    g = non_true_gram(probs, y)
    eye = torch.eye(g.shape[-1], dtype=g.dtype, device=g.device)
    return torch.logdet(g + DET_OFFSET * eye)


def adp_loss(logits: torch.Tensor, y: torch.Tensor, alpha: float, beta: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The ADP objective from member logits [M, B, C]; returns (loss, parts)."""
    ce = sum(F.cross_entropy(z, y) for z in logits)
    probs = torch.softmax(logits, dim=-1)
    ee = ensemble_entropy(probs).mean()
    ld = log_det_diversity(probs, y).mean()
    loss = ce - alpha * ee - beta * ld
    return loss, {"ce": ce, "ensemble_entropy": ee, "log_det": ld}


@METHODS.register("adp", params=ADPOptions)
class ADP(Method):
    def step(self, ctx: "TrainContext", batch: Batch) -> dict[str, float]:
        o: ADPOptions = self.options
        # Reference order: the PGD examples are crafted before the clean forward (train_adp.py).
        x_adv = pgd(ctx.model, ctx.model, batch.x, batch.y, o) if o.plus_adv else None
        logits = torch.stack([m(batch.x) for m in ctx.members])
        loss, parts = adp_loss(logits, batch.y, o.alpha, o.beta)
        if x_adv is not None:
            adv = sum(F.cross_entropy(m(x_adv), batch.y) for m in ctx.members)
            loss = loss + adv
            parts["adv_ce"] = adv
        ctx.update(loss)
        out = {k: float(v.detach()) for k, v in parts.items()}
        out["loss"] = float(loss.detach())
        return out
