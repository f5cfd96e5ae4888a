"""L2 DeepFool (Moosavi-Dezfooli et al. CVPR 2016), batched, in the original's form.

The original (LTS4/DeepFool ``python/deepfool.py``): at the current point x + (1+overshoot)*r_tot, while
the label is unchanged and fewer than ``max_iter`` = 50 iterations ran, linearise every candidate class
k against the label: w_k = grad f_k - grad f_label, f_k' = f_k - f_label, pick the k with the smallest
|f_k'| / ||w_k||, add r_i = (|f_k'|/||w_k|| + 1e-4) * w_k / ||w_k|| to r_tot; the output is
x + (1 + overshoot) * r_tot with overshoot 0.02. (torchattacks instead applies 1.02 per step and clips
every step; robbench keeps the original's accumulate-then-overshoot.)

The box. The original has none. robbench's inputs live in [0, 1], so every point DeepFool looks at is
``clip(x + (1 + overshoot) * r_tot)``: the loop linearises there and stops once *that* image is
misclassified, and it is the output. Without saturated pixels this is the original exactly; with them,
clipping only the final image would undo most attacks (measured on 8x8 digits: 6% fooled versus 100%
box-aware). ``clip=None`` gives the original unbounded form.

DeepFool is a minimal-norm attack, so a fixed budget needs an explicit success rule; see
``robbench.attacks.registered`` ('norm_within_eps', the default there).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch

from robbench.attacks.core import flat_norm

Model = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class DeepFoolResult:
    x_adv: torch.Tensor
    norms: torch.Tensor  # ||x_adv - x||_2 per sample (after the final clip)
    fooled: torch.Tensor  # model(x_adv).argmax != y
    iterations: torch.Tensor  # linearisation steps each sample used
    stats: dict[str, int]


def deepfool(model: Model, x: torch.Tensor, y: torch.Tensor, *, steps: int = 50, overshoot: float = 0.02,
             candidates: int | None = None, labels_from: Literal["true", "prediction"] = "true",
             clip: tuple[float, float] | None = (0.0, 1.0)) -> DeepFoolResult:
    """Batched L2 DeepFool. steps=50 and overshoot=0.02: the original's ``max_iter``/``overshoot``.

    ``candidates``: how many classes to consider, the label included, taken by the clean output's
    ranking (the original's ``num_classes=10``); None = every class.
    ``labels_from='true'``: attack ``y``; a sample already misclassified is returned unchanged (norm 0).
    ``'prediction'``: attack the clean prediction, as the original does.
    ``clip``: the box every visited point is clipped to (see the module docstring); None = unbounded.
    """
    x = x.detach()
    dev = x.device
    y = y.to(dev)
    b = x.shape[0]
    stats = {"grad": 0, "eval": b}
    with torch.no_grad():
        out0 = model(x)
    n_cls = out0.shape[1]
    pred0 = out0.argmax(dim=1)
    label = pred0 if labels_from == "prediction" else y
    order = out0.argsort(dim=1, descending=True)
    # candidate classes per sample: the others, in the clean output's ranking, label excluded
    others = order.masked_fill(order == label[:, None], -1)
    others = torch.stack([row[row >= 0] for row in others]) if b else others[:, : n_cls - 1]
    if candidates is not None:
        others = others[:, : max(1, int(candidates) - 1)]

    r_tot = torch.zeros_like(x)
    iters = torch.zeros(b, dtype=torch.long, device=dev)
    active = pred0 == label
    for _ in range(steps):
        idx = active.nonzero().squeeze(1)
        if idx.numel() == 0:
            break
        xa = x[idx] + (1.0 + overshoot) * r_tot[idx]
        if clip is not None:
            xa = xa.clamp(*clip)
        xa = xa.requires_grad_(True)
        out = model(xa)
        still = out.argmax(dim=1) == label[idx]
        active[idx[~still]] = False
        if not still.any():
            break
        stats["grad"] += int(idx.numel()) * (others.shape[1] + 1)
        lab = label[idx]
        f0 = out.gather(1, lab[:, None]).squeeze(1)
        g0 = torch.autograd.grad(f0.sum(), xa, retain_graph=True)[0]
        best_pert = torch.full((idx.numel(),), float("inf"), dtype=x.dtype, device=dev)
        best_w = torch.zeros_like(xa)
        for j in range(others.shape[1]):
            k = others[idx, j]
            fk = out.gather(1, k[:, None]).squeeze(1)
            gk = torch.autograd.grad(fk.sum(), xa, retain_graph=j + 1 < others.shape[1])[0]
            w = gk - g0
            pert = (fk - f0).detach().abs() / flat_norm(w, 2).flatten().clamp_min(1e-12)
            better = pert < best_pert
            best_pert = torch.where(better, pert, best_pert)
            best_w[better] = w[better]
        r_i = (best_pert + 1e-4).reshape(-1, *([1] * (x.ndim - 1))) * best_w / flat_norm(best_w, 2).clamp_min(1e-12)
        upd = idx[still]
        r_tot[upd] = r_tot[upd] + r_i[still]
        iters[upd] += 1
    x_adv = x + (1.0 + overshoot) * r_tot
    if clip is not None:
        x_adv = x_adv.clamp(*clip)
    with torch.no_grad():
        fooled = model(x_adv).argmax(dim=1) != y
    stats["eval"] += b
    norms = (x_adv - x).flatten(1).norm(dim=1)
    return DeepFoolResult(x_adv.detach(), norms, fooled, iters, stats)
