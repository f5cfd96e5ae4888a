"""Adversarial-training bases any entry can name: Madry PGD-AT (``pgd_at``), TRADES (``trades``) and
MART (``mart``). EED trains its base model with Madry-AT and names TRADES/MART as alternatives
(EED §5.1 "We use the Madry as AT method"; App. A.1 "we adopted Madry-AT, TRADES-AT and MART-AT ...
the original regularization values of beta ... were set"); HYDRA's adversarial trainer is TRADES.

Each objective is a function ``(model, module, x, y, options) -> (loss, metrics)`` so score-based
pruning and EED's joint training reuse the same code. The examples are crafted through the shared attack
core (:func:`robbench.attacks.core.iterative_attack`, last iterate, no extra forward), with ``module`` in
``attack_bn_mode`` while crafting.

- **Madry PGD-AT**: CE(f(x_adv), y), x_adv from PGD on CE with a uniform start in the eps-ball.
- **TRADES** (yaodongyu/TRADES ``trades.py``): CE(f(x), y) + beta * (1/B) * sum_i KL(p(x_i) || p(x_adv_i)),
  the attack ascends the same KL from x + 0.001 * N(0, 1) (start not clipped). The reference forwards
  x_nat twice in train mode (once for CE, once for the KL target, which is *not* detached): kept as
  ``nat_forwards = 2`` (the outputs are equal; BatchNorm running statistics move twice).
- **MART** (YisenWang/MART ``mart.py``): BCE-style adversarial term
  CE(f(x_adv), y) + NLL(log(1.0001 - p_adv + 1e-12), y~) with y~ the most likely wrong class under x_adv,
  plus beta * (1/B) * sum_i KL(p_nat,i || p_adv,i) * (1.0000001 - p_nat,i[y_i]); the attack ascends CE
  from x + 0.001 * N(0, 1).

The training attack defaults are EED §5.1's ("PGD-20 attacker with a step size of 2/255 to generate
adversarial examples for training", eps 8/255); the TRADES/MART references use 10 steps of 0.007 with
eps 0.031 (set ``adv_steps``/``adv_step``/``adv_eps`` for those recipes). The attacks run with
BatchNorm in eval mode, as MART's ``model.eval()`` before crafting and TRADES' later ``trades.py``
(the notes' commit 6e8e11b calls ``model.eval()`` in ``trades_loss``) and Madry-style training.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Literal

import torch
import torch.nn.functional as F
from torch import nn

from robbench.attacks.losses import AttackLoss
from robbench.config import opt
from robbench.registry import METHODS
from robbench.train.methods.base import Batch, BNMode, Method, module_mode

if TYPE_CHECKING:
    from robbench.train.loop import TrainContext

Init = Literal["uniform", "normal", "none"]
Objective = Callable[..., tuple[torch.Tensor, dict[str, float]]]


@dataclass
class AdvBaseOptions:
    # EED §5.1: "PGD-20 attacker with a step size of 2/255 ... perturbation strength eps = 8/255".
    adv_eps: float = opt(8 / 255, min=0.0, max=1.0, help="training attack L-inf radius (EED §5.1: 8/255)")
    adv_step: float = opt(2 / 255, min=0.0, max=1.0, help="training attack step (EED §5.1: 2/255)")
    adv_steps: int = opt(20, min=0, max=10000, help="training attack steps (EED §5.1: PGD-20; TRADES/MART code: 10)")
    init: Init = opt("uniform", help="attack start: 'uniform' in the eps-ball (Madry), 'normal' = x + 0.001*N(0,1) "
                                     "(TRADES/MART code), 'none'")
    attack_bn_mode: BNMode = opt("eval", help="BatchNorm mode while crafting (MART/TRADES code: model.eval())")


@dataclass
class TradesOptions(AdvBaseOptions):
    init: Init = opt("normal", help="attack start (trades.py: x + 0.001 * randn, not clipped)")
    beta: float = opt(6.0, min=0.0, help="KL weight (TRADES paper/README CIFAR: 6; EED App. A.1: original value)")
    nat_forwards: int = opt(2, min=1, max=2, help="train-mode forwards of x_nat (trades.py: 2, the KL target "
                                                   "is a second forward; 1 reuses the CE logits)")


@dataclass
class MartOptions(AdvBaseOptions):
    init: Init = opt("normal", help="attack start (mart.py: x + 0.001 * randn, not clipped)")
    beta: float = opt(6.0, min=0.0, help="KL weight (mart.py default and paper CIFAR: 6; EED App. A.1)")


@dataclass(frozen=True)
class KLToTarget(AttackLoss):
    """Per-sample KL(target || softmax(out)) where the target is a probability row per sample (passed as
    the attack's ``targeted`` tensor, so the core indexes it per sample). ``trades.py``'s
    ``KLDivLoss(sum)(log_softmax(model(x_adv)), softmax(model(x_nat)))`` summed over the batch has the
    same per-sample sign gradient."""

    name: str = "kl_to_target"

    def __call__(self, out: torch.Tensor, y: torch.Tensor | None, target: object = None) -> torch.Tensor:
        assert isinstance(target, torch.Tensor)
        return F.kl_div(F.log_softmax(out, dim=1), target, reduction="none").sum(dim=1)


def _init_delta(x: torch.Tensor, init: Init) -> torch.Tensor | str:
    if init == "normal":
        # global RNG (saved with the resume state), as the references' torch.randn
        return 0.001 * torch.randn(x.shape, device=x.device, dtype=x.dtype)
    return init


def craft(model: Callable[[torch.Tensor], torch.Tensor], module: nn.Module, x: torch.Tensor, y: torch.Tensor,
          o: AdvBaseOptions, loss: str | AttackLoss = "ce", target: torch.Tensor | None = None) -> torch.Tensor:
    """Untargeted L-inf attack on ``loss`` (last iterate), ``module`` in ``o.attack_bn_mode``; detached."""
    from robbench.attacks.core import iterative_attack

    if o.adv_steps == 0:
        return x.detach()
    with module_mode(module, o.attack_bn_mode):
        res = iterative_attack(model, x, y, o.adv_eps, norm="linf", steps=o.adv_steps, step_size=o.adv_step,
                               loss=loss, init=_init_delta(x, o.init), evaluate=False, seed=None,
                               targeted=target)
    return res.x_adv.detach()


def madry_objective(model: Callable[[torch.Tensor], torch.Tensor], module: nn.Module, x: torch.Tensor,
                    y: torch.Tensor, o: AdvBaseOptions) -> tuple[torch.Tensor, dict[str, float]]:
    """Madry et al.: CE on PGD examples."""
    x_adv = craft(model, module, x, y, o, "ce")
    loss = F.cross_entropy(model(x_adv), y)
    return loss, {"adv_loss": float(loss.detach())}


def trades_objective(model: Callable[[torch.Tensor], torch.Tensor], module: nn.Module, x: torch.Tensor,
                     y: torch.Tensor, o: TradesOptions) -> tuple[torch.Tensor, dict[str, float]]:
    """TRADES: CE(f(x), y) + beta * (1/B) * sum KL(p_nat || p_adv); the attack ascends that KL."""
    with module_mode(module, o.attack_bn_mode), torch.no_grad():
        p_attack = F.softmax(model(x), dim=1)  # trades.py recomputes it each step: constant in eval mode
    x_adv = craft(model, module, x, y, o, KLToTarget(), target=p_attack)
    logits = model(x)
    natural = F.cross_entropy(logits, y)
    nat_target = model(x) if o.nat_forwards == 2 else logits
    robust = F.kl_div(F.log_softmax(model(x_adv), dim=1), F.softmax(nat_target, dim=1), reduction="sum") / len(x)
    loss = natural + o.beta * robust
    return loss, {"loss": float(loss.detach()), "natural_loss": float(natural.detach()),
                  "robust_kl": float(robust.detach())}


def mart_objective(model: Callable[[torch.Tensor], torch.Tensor], module: nn.Module, x: torch.Tensor,
                   y: torch.Tensor, o: MartOptions) -> tuple[torch.Tensor, dict[str, float]]:
    """MART (mart.py ``mart_loss``)."""
    x_adv = craft(model, module, x, y, o, "ce")
    logits = model(x)
    logits_adv = model(x_adv)
    adv_probs = F.softmax(logits_adv, dim=1)
    top2 = torch.argsort(adv_probs, dim=1)[:, -2:]
    new_y = torch.where(top2[:, -1] == y, top2[:, -2], top2[:, -1])
    loss_adv = F.cross_entropy(logits_adv, y) + F.nll_loss(torch.log(1.0001 - adv_probs + 1e-12), new_y)
    nat_probs = F.softmax(logits, dim=1)
    true_probs = nat_probs.gather(1, y.unsqueeze(1)).squeeze(1)
    kl = F.kl_div(torch.log(adv_probs + 1e-12), nat_probs, reduction="none").sum(dim=1)
    robust = (kl * (1.0000001 - true_probs)).sum() / len(x)
    loss = loss_adv + o.beta * robust
    return loss, {"loss": float(loss.detach()), "adv_bce": float(loss_adv.detach()), "robust_kl": float(robust.detach())}


OBJECTIVES: dict[str, tuple[type, Objective]] = {
    "pgd_at": (AdvBaseOptions, madry_objective),
    "trades": (TradesOptions, trades_objective),
    "mart": (MartOptions, mart_objective),
}


class _AdvBase(Method):
    objective: Objective

    def step(self, ctx: "TrainContext", batch: Batch) -> dict[str, float]:
        loss, metrics = type(self).objective(ctx.model, ctx.model, batch.x, batch.y, self.options)
        ctx.update(loss)
        return metrics


@METHODS.register("pgd_at", params=AdvBaseOptions)
class MadryAT(_AdvBase):
    """Madry et al. (ICLR 2018) PGD adversarial training of the whole model (its output)."""

    objective = staticmethod(madry_objective)


@METHODS.register("trades", params=TradesOptions)
class TRADES(_AdvBase):
    objective = staticmethod(trades_objective)


@METHODS.register("mart", params=MartOptions)
class MART(_AdvBase):
    objective = staticmethod(mart_objective)
