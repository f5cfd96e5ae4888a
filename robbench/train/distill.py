"""DVERGE feature distillation as thin glue over the shared attack core.

x'_j = argmin_{‖x' − x_s‖∞ ≤ ε} ‖f_j^l(x') − f_j^l(x_t)‖² for every member j (DVERGE ``distillation.py``
``Linf_distillation``): start at x_s (no random start by default), ``steps`` momentum sign steps of
size ``step_size`` *descending* the feature MSE (g ← μ·g + ∇/‖∇‖₁ per sample, μ = 1, L1 floor 1e-12),
projection to the ε ball and [0, 1]. Features come from :func:`robbench.models.get_features`
(partial forward up to the tap, ``before_relu`` as DVERGE's hard-coded True).

Speed (vs the reference's member-by-member loop that recomputes the target features at every step):
- all members are distilled by **one** attack call: the input is the M copies of x_s stacked, the
  "model" runs member j on copy j (each member still sees its own B samples, so BatchNorm batch
  statistics are those of the reference), and one backward per step serves every member;
- the target features f_j^l(x_t) are computed **once per batch**; they do not change across steps
  (in train mode BN normalises with the batch's own statistics). The reference's per-step recompute
  only moves BN running statistics once more per step: ``recompute_target=True`` reproduces it;
- input gradients only (the core uses ``autograd.grad`` w.r.t. x; the reference's ``loss.backward()``
  also computes every weight gradient).
The caller sets the BatchNorm mode (the core never changes it); DVERGE distils in train mode.

Exactness (``iterate``): 'x' is the reference's arithmetic to the bit -- the core's in-place x' update,
``max(min(x', x_s+eps), x_s-eps)``, clamp, momentum by division with ``torch.norm`` (see
``robbench.attacks.core``), and the loss as ``nn.MSELoss()`` over the member's batch
(``losses.feature_mse_batch``, so the input gradient is the reference's float for any batch size).
'delta' is the advertorch form (x_s + delta iterated, per-sample mean MSE): the same maths, but the last
bit differs and a near-zero momentum component can flip sign after a few steps.
"""
from __future__ import annotations

from typing import Callable, Literal, Sequence

import torch
from torch import nn


def _memory_format_of(x: torch.Tensor) -> torch.memory_format:
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def _stacked_features(members: Sequence[nn.Module], layer: int, before_relu: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """x [M*B, ...] -> features [M*B, ...]: member j on rows j*B..(j+1)*B."""
    from robbench.models import get_features

    n = len(members)

    def run(x: torch.Tensor) -> torch.Tensor:
        chunks = x.chunk(n)
        return torch.cat([get_features(m, c, layer, before_relu) for m, c in zip(members, chunks)])

    return run


def distill(members: Sequence[nn.Module], x_s: torch.Tensor, x_t: torch.Tensor, layer: int, *,
            eps: float = 0.07, step_size: float = 0.007, steps: int = 10, momentum: float | None = 1.0,
            rand_start: bool = False, before_relu: bool = True, recompute_target: bool = False,
            batched: bool = True, iterate: Literal["delta", "x"] = "delta") -> list[torch.Tensor]:
    """Distilled inputs x'_j (detached), one per member, for source ``x_s`` towards target ``x_t``.

    Defaults: DVERGE arguments.py ``--distill-eps 0.07 --distill-alpha 0.007 --distill-steps 10``,
    momentum on with mu = 1 (``Linf_distillation(mu=1, momentum=True)``), no random start.
    ``momentum=None`` (or 0) = plain sign steps (``--distill-no-momentum``).
    ``batched=False`` runs one attack per member (same result up to float reduction order).
    ``iterate='x'``: DVERGE ``Linf_distillation``'s update to the bit; 'delta' (default, kept for callers
    whose trained checkpoints rely on it, e.g. EIO): advertorch's form (see the module docstring).
    """
    from robbench.attacks.core import iterative_attack
    from robbench.attacks.losses import AttackLoss
    from robbench.models import get_features

    mu = momentum if momentum else None
    init = "uniform" if rand_start else "none"
    # 'x': nn.MSELoss() over each member's own batch of B (the reference calls it once per member)
    loss = AttackLoss("feature_mse", mse_batch=x_s.shape[0]) if iterate == "x" else AttackLoss("feature_mse")
    groups = [list(members)] if batched else [[m] for m in members]
    out: list[torch.Tensor] = []
    for group in groups:
        k = len(group)
        xs = x_s
        if k > 1:
            xs = torch.cat([x_s] * k).contiguous(memory_format=_memory_format_of(x_s))
        fn = _stacked_features(group, layer, before_relu)

        def target_fn(group: list[nn.Module] = group) -> torch.Tensor:
            with torch.no_grad():
                return torch.cat([get_features(m, x_t, layer, before_relu) for m in group])

        target: torch.Tensor | Callable[[], torch.Tensor] = target_fn if recompute_target else target_fn()
        dummy_y = torch.zeros(xs.shape[0], dtype=torch.long, device=xs.device)
        res = iterative_attack(fn, xs, dummy_y, eps, norm="linf", steps=steps, step_size=step_size,
                               loss=loss, init=init, momentum=mu, momentum_floor=1e-12,
                               feature_target=target, descend=True, evaluate=False, seed=None, iterate=iterate)
        out.extend(res.x_adv.detach().chunk(k))
    return out


def feature_distance(member: nn.Module, x: torch.Tensor, x_t: torch.Tensor, layer: int,
                     before_relu: bool = True) -> torch.Tensor:
    """Per-sample MSE between f^l(x) and f^l(x_t) (no grad): the distillation objective."""
    from robbench.models import get_features

    with torch.no_grad():
        a = get_features(member, x, layer, before_relu)
        b = get_features(member, x_t, layer, before_relu)
    return (a - b).pow(2).flatten(1).mean(1)
