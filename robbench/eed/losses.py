"""EED's joint team objective L_EED = L_E + omega * L_R + gamma * L_C (Eqs. 14-19).

Every term EED leaves undefined is one named reading here, with the alternative as an option:

- L_E (Eq. 14) = sum_i CE(F_i(x), y) + alpha * Reg(h) + beta * Div(h^1..h^N, y), h = mean member
  probability. EED gives neither Reg, Div, alpha nor beta; the form is ADP's (Pang et al. 2019,
  ``Loss_withEE_DPP``; notes §B [unverified]): Reg = -H(h) (ensemble entropy, maximised) and
  Div = -log det(M~^T M~ + 1e-6 I) with M~'s columns each member's L2-normalised non-true-class
  probabilities (log offset 1e-20). Defaults alpha = 2, beta = 0.5 (ADP README, CIFAR); alpha = beta = 0
  gives plain summed CE.
- L_E with GAL's diversity (supp. C.2, Table 9 "EED+GAL"; ``ensemble_loss = 'gal'``): sum_i CE_i +
  beta * coherence, coherence = mean_batch log sum_{a<b} exp(cos(g_a, g_b)) of the members' input
  gradients g_i = dCE_i/dx (Kariyappa & Qureshi's GAL as DVERGE's ``train_gal.py`` ports it, double
  backprop). GAL has no ensemble-entropy term, so alpha is unused; beta = 0.5 is ADP's and GAL's
  lambda alike. EED's Eq. 33 also names a Jensen-Shannon prediction-diversity term against label-
  smoothed targets; its formula is not in the text, so it is left out (a partial reading).
- L_E with DVERGE's vulnerability diversity (supp. C.3, Eq. 34; Table 9 "EED+DVERGE";
  ``ensemble_loss = 'dverge'``): sum_i CE_i + beta * sum_i sum_{j != i} CE(f_i(x'_j), y), x'_j the
  feature-distilled example of member j (DVERGE: x' near x_s with member j's layer-l features of another
  image, labelled y_s), as DVERGE+AdvT adds its all-pairs term to the adversarial CE (lambda = 1).
- L_R (Eq. 15, after iGAT, Deng & Mu 2023) is printed as -err(h(x), y) * log(1 - C * max_i max_j h_i^j(x)).
  "1 - C * max" can be negative and C is never defined, so the reading is ``lr_c = 1`` and the max over
  the *wrong* classes j != y (``lr_wrong_only = true``): -1[argmax h != y] * log(1 - max_i max_{j!=y} p_i^j),
  averaged over the batch; the argument is clamped at 1e-12.
- L_C (Eqs. 16-18) = lambda1 * sum_i ||W_i||_1 + lambda2 * sum_i ||h^i(x)||_0. The L0 norm has no
  gradient: the L1 norm stands in, and both terms are normalised by their element counts (mean |w| over
  the kept weights of every member, mean |a| over the activations), otherwise lambda1 = 0.7 on a raw
  weight sum dominates everything (notes §B). ``lc_normalise = false`` uses raw sums. The activations
  are the classifier's input (the penultimate post-ReLU features, ``activation_site = 'penultimate'``)
  or the logits (``'logits'``).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from robbench.pruning.masked import MASKED_TYPES
from robbench.train.methods.gal import gal_coherence


def ensemble_entropy(mean_probs: torch.Tensor) -> torch.Tensor:
    """H(h) per sample (ADP: log offset 1e-20)."""
    return -(mean_probs * torch.log(mean_probs + 1e-20)).sum(1)


def log_det_diversity(probs: Sequence[torch.Tensor], y: torch.Tensor) -> torch.Tensor:
    """ADP's log det(M~^T M~ + 1e-6 I) per sample, M~ = [non-true-class probabilities, L2-normalised]."""
    c = probs[0].shape[1]
    keep = ~F.one_hot(y, c).bool()
    cols = [p[keep].reshape(len(y), c - 1) for p in probs]
    m = torch.stack([v / (v.norm(dim=1, keepdim=True) + 1e-20) for v in cols], dim=2)  # [B, C-1, N]
    gram = m.transpose(1, 2) @ m + 1e-6 * torch.eye(len(probs), device=m.device, dtype=m.dtype)
    return torch.logdet(gram)


def ensemble_loss(logits: Sequence[torch.Tensor], y: torch.Tensor, alpha: float, beta: float) -> tuple[torch.Tensor, dict[str, float]]:
    """L_E = sum_i CE_i + alpha * (-H(h)) + beta * (-log det), batch means."""
    probs = [F.softmax(z, dim=1) for z in logits]
    ce = sum(F.cross_entropy(z, y) for z in logits)
    mean = torch.stack(probs).mean(0)
    reg = -ensemble_entropy(mean).mean()
    div = -log_det_diversity(probs, y).mean() if (beta and len(probs) > 1) else torch.zeros((), device=y.device)
    loss = ce + alpha * reg + beta * div
    return loss, {"ce": float(ce.detach()), "reg": float(reg.detach()), "div": float(div.detach())}


def gal_ensemble_loss(logits: Sequence[torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                      beta: float) -> tuple[torch.Tensor, dict[str, float]]:
    """L_E with GAL's gradient coherence for ``logits`` computed from ``x`` (which requires grad)."""
    ces = [F.cross_entropy(z, y) for z in logits]
    grads = torch.stack([torch.autograd.grad(ce, x, create_graph=True)[0].flatten(1) for ce in ces])
    coh = gal_coherence(grads)
    ce = sum(ces)
    loss = ce + beta * coh
    return loss, {"ce": float(ce.detach()), "coherence": float(coh.detach())}  # type: ignore[union-attr]


def dverge_ensemble_loss(logits: Sequence[torch.Tensor], cross: Sequence[Sequence[torch.Tensor | None]],
                         y: torch.Tensor, y_s: torch.Tensor, beta: float) -> tuple[torch.Tensor, dict[str, float]]:
    """L_E with DVERGE's term: ``cross[i][j]`` = f_i(x'_j) (the diagonal unused), labelled ``y_s``."""
    ce = sum(F.cross_entropy(z, y) for z in logits)
    div = sum(F.cross_entropy(cross[i][j], y_s) for i in range(len(cross))  # type: ignore[arg-type]
              for j in range(len(cross)) if j != i)
    loss = ce + beta * div
    return loss, {"ce": float(ce.detach()), "dverge": float(div.detach())}  # type: ignore[union-attr]


def misclassification_loss(logits: Sequence[torch.Tensor], y: torch.Tensor, c: float = 1.0,
                           wrong_only: bool = True) -> torch.Tensor:
    """L_R: on examples the ensemble misclassifies, -log(1 - c * max_i max_j p_i^j)."""
    probs = torch.stack([F.softmax(z, dim=1) for z in logits])  # [N, B, C]
    wrong = (probs.mean(0).argmax(1) != y).to(probs.dtype)
    if wrong_only:
        probs = probs.masked_fill(F.one_hot(y, probs.shape[2]).bool().unsqueeze(0), 0.0)
    top = probs.amax(dim=(0, 2))
    return -(wrong * torch.log((1.0 - c * top).clamp_min(1e-12))).mean()


def weight_l1(nets: Sequence[nn.Module], normalise: bool = True) -> torch.Tensor:
    """sum_i ||W_i||_1 over the conv/linear weights (masked: only the kept weights), or its mean."""
    total, count = None, 0
    for net in nets:
        for m in net.modules():
            if isinstance(m, MASKED_TYPES):
                w = (m.weight * m.mask).abs().sum()  # type: ignore[attr-defined]
                count += int(m.mask.count_nonzero())  # type: ignore[attr-defined]
            elif isinstance(m, (nn.Conv2d, nn.Linear)):
                w = m.weight.abs().sum()
                count += m.weight.numel()
            else:
                continue
            total = w if total is None else total + w
    if total is None:
        return torch.zeros(())
    return total / max(1, count) if normalise else total


def activation_l1(acts: Sequence[torch.Tensor], normalise: bool = True) -> torch.Tensor:
    total = sum(a.abs().sum() for a in acts)
    count = sum(a.numel() for a in acts)
    return total / max(1, count) if normalise else total  # type: ignore[return-value]
