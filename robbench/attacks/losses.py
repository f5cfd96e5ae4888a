"""Attack losses: each maps a model output to a per-sample objective that the attack core *ascends*.

Per-sample (shape [B]) so restarts, eps values and samples stay independent; the core sums them for the
gradient (the sum's input gradient is each sample's own gradient). Untargeted losses are maximised;
targeted variants are written so that maximising them moves towards the target class; feature losses
(``feature_mse``) are distances the caller minimises with ``descend=True``.

A protocol names a loss with ``loss = "cw", kappa = 0.1`` (and ``mask_bug = true`` for parity runs);
:func:`get_loss` turns that into a :class:`AttackLoss`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch
import torch.nn.functional as F

from robbench.errors import ConfigError

LossName = Literal["ce", "cw", "dlr", "feature_mse"]
LOSS_NAMES: tuple[str, ...] = ("ce", "cw", "dlr", "feature_mse")

Target = torch.Tensor | Callable[[], torch.Tensor] | None


def _true_logit_and_other_max(z: torch.Tensor, y: torch.Tensor, mask_bug: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """z_y and max_{j != y} z_j. ``mask_bug`` reproduces ``max((1 - onehot) * z)`` of the DVERGE
    (eval/eval_wbox.py CarliniWagnerLoss) and MAD reference code: the true class enters the max as 0,
    so when every wrong logit is negative (always, for log-probabilities) the "other" term is 0."""
    onehot = F.one_hot(y, z.shape[1]).to(torch.bool)
    true = z.gather(1, y[:, None]).squeeze(1)
    if mask_bug:
        other = ((1.0 - onehot.to(z.dtype)) * z).max(dim=1).values
    else:
        other = z.masked_fill(onehot, float("-inf")).max(dim=1).values
    return true, other


def ce(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per sample (advertorch/DVERGE use CE with sum/mean reduction: same gradient sign)."""
    return F.cross_entropy(z, y, reduction="none")


def ce_targeted(z: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """-CE(z, target): ascending it is Xie & Yuille's x <- x - a*sign(grad CE(target))."""
    return -F.cross_entropy(z, target, reduction="none")


def cw(z: torch.Tensor, y: torch.Tensor, kappa: float = 0.0, mask_bug: bool = False) -> torch.Tensor:
    """Carlini-Wagner margin objective -max(z_y - max_{j!=y} z_j, -kappa) written as
    ``-relu(z_y - max_other + kappa)`` (= that minus the constant kappa; identical gradient), the form of
    advertorch/DVERGE ``CarliniWagnerLoss``. The true class is masked with -inf unless ``mask_bug``."""
    true, other = _true_logit_and_other_max(z, y, mask_bug)
    return -F.relu(true - other + kappa)


def cw_targeted(z: torch.Tensor, target: torch.Tensor, kappa: float = 0.0, mask_bug: bool = False) -> torch.Tensor:
    """Targeted CW: -relu(max_{j!=t} z_j - z_t + kappa); maximal once z_t leads by kappa."""
    true, other = _true_logit_and_other_max(z, target, mask_bug)
    return -F.relu(other - true + kappa)


def dlr(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Difference of Logits Ratio (Croce & Hein 2020, Eq. 5), as pyautoattack ``APGDAttack.dlr_loss``:
    -(z_y - max_{j!=y} z_j) / (z_pi1 - z_pi3 + 1e-12)."""
    zs, ind = z.sort(dim=1)
    top_is_y = (ind[:, -1] == y).to(z.dtype)
    u = torch.arange(z.shape[0], device=z.device)
    return -(z[u, y] - zs[:, -2] * top_is_y - zs[:, -1] * (1.0 - top_is_y)) / (zs[:, -1] - zs[:, -3] + 1e-12)


def dlr_targeted(z: torch.Tensor, y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Targeted DLR (Croce & Hein 2020, Eq. 6; pyautoattack ``dlr_loss_targeted``):
    -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4)/2 + 1e-12). Needs at least 4 classes."""
    zs, _ = z.sort(dim=1)
    u = torch.arange(z.shape[0], device=z.device)
    return -(z[u, y] - z[u, target]) / (zs[:, -1] - 0.5 * (zs[:, -3] + zs[:, -4]) + 1e-12)


def feature_mse(f: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error to target features, per sample. DVERGE ``gradient_wrt_feature`` uses
    ``nn.MSELoss()`` (mean over everything): the same input gradient up to a positive factor, so the
    sign steps are identical. Minimised: pass ``descend=True``."""
    return (f - target).pow(2).flatten(1).mean(dim=1)


def feature_mse_batch(f: torch.Tensor, target: torch.Tensor, batch: int) -> torch.Tensor:
    """``nn.MSELoss()`` over a batch of ``batch`` samples, split per sample: sum of squares / (batch *
    features per sample). Its sum is DVERGE's loss and its input gradient the reference's to the bit
    (``mse_loss`` backward is fl(2/N)*(f-t); here 2*(f-t)*fl(1/N), the same float), for any batch size;
    :func:`feature_mse`'s gradient differs from it by the factor batch, exact only for powers of 2."""
    return (f - target).pow(2).flatten(1).sum(dim=1) * (1.0 / (batch * f[0].numel()))


@dataclass(frozen=True)
class AttackLoss:
    """A named loss with its parameters. ``__call__(out, y, target)`` -> objective [B] to ascend.

    ``classifies``: the output is class scores, so "fooled" (argmax != y) is defined.
    For ``feature_mse`` the target is a feature tensor, or a zero-argument callable re-evaluated at
    every step (DVERGE recomputes the target features every step; in train mode that forward also
    updates BatchNorm statistics, so parity needs it).
    """

    name: str
    kappa: float = 0.0
    mask_bug: bool = False
    mse_batch: int = 0  # feature_mse: 0 = per-sample mean; B = the reference's batch mean (feature_mse_batch)

    @property
    def classifies(self) -> bool:
        return self.name != "feature_mse"

    def __call__(self, out: torch.Tensor, y: torch.Tensor | None, target: Target = None) -> torch.Tensor:
        if self.name == "feature_mse":
            if target is None:
                raise ValueError("feature_mse needs target features")
            t = target() if callable(target) else target
            if self.mse_batch:
                return feature_mse_batch(out, t.detach(), self.mse_batch)
            return feature_mse(out, t.detach())
        assert y is not None
        if target is None:
            if self.name == "ce":
                return ce(out, y)
            if self.name == "cw":
                return cw(out, y, self.kappa, self.mask_bug)
            return dlr(out, y)
        if callable(target):
            raise ValueError("a classification loss takes a target label tensor, not a callable")
        if self.name == "ce":
            return ce_targeted(out, target)
        if self.name == "cw":
            return cw_targeted(out, target, self.kappa, self.mask_bug)
        return dlr_targeted(out, y, target)


def get_loss(name: str | AttackLoss, *, kappa: float = 0.0, mask_bug: bool = False,
             file: str | None = None, field: str | None = "loss") -> AttackLoss:
    """A loss by name ('ce', 'cw', 'dlr', 'feature_mse'); an :class:`AttackLoss` passes through."""
    if isinstance(name, AttackLoss):
        return name
    if name not in LOSS_NAMES:
        raise ConfigError(f"unknown attack loss {name!r}; allowed: {', '.join(LOSS_NAMES)}", file=file, field=field)
    if kappa < 0:
        raise ConfigError(f"kappa must be >= 0, got {kappa}", file=file, field="kappa")
    return AttackLoss(name, float(kappa), bool(mask_bug))
