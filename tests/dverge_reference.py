"""DVERGE's attack loops (zjysteven/DVERGE ``distillation.py`` ``Linf_PGD`` and ``Linf_distillation`` with
``gradient_wrt_input``/``gradient_wrt_feature``), transcribed as written, for parity checks in tests and
benchmarks (kept out of the robbench package). CUDA-only random start left out (``rand_start=False``)."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def _steps(grad_of: Callable[[torch.Tensor], torch.Tensor], dat: torch.Tensor, eps: float, alpha: float,
           steps: int, descend: bool, momentum: bool, mu: float) -> torch.Tensor:
    x_nat = dat.clone().detach()
    x_adv = torch.clamp(dat.clone().detach(), 0.0, 1.0)  # respect image bounds
    g = torch.zeros_like(x_adv)
    for _ in range(steps):
        grad = grad_of(x_adv)
        with torch.no_grad():
            if momentum:
                l1 = torch.norm(grad.view(grad.shape[0], -1), 1, dim=1)
                grad = grad / torch.clamp(l1, min=1e-12).view(grad.shape[0], 1, 1, 1)
                g = mu * g + grad
                new_grad = g
            else:
                new_grad = grad
            x_adv = x_adv - alpha * new_grad.sign() if descend else x_adv + alpha * new_grad.sign()
            x_adv = torch.max(torch.min(x_adv, x_nat + eps), x_nat - eps)
            x_adv = torch.clamp(x_adv, 0.0, 1.0)
    return x_adv.clone().detach()


def linf_pgd(model: nn.Module, dat: torch.Tensor, lbl: torch.Tensor, eps: float, alpha: float, steps: int,
             momentum: bool = False, mu: float = 1.0) -> torch.Tensor:
    """``Linf_PGD(rand_start=False, is_targeted=False)`` with ``nn.CrossEntropyLoss()`` (mean)."""
    def grad_of(x_adv: torch.Tensor) -> torch.Tensor:
        x_adv.requires_grad = True
        loss = nn.CrossEntropyLoss()(model(x_adv), lbl)
        model.zero_grad()
        loss.backward()
        return x_adv.grad.data.clone().detach()

    return _steps(grad_of, dat, eps, alpha, steps, False, momentum, mu)


def linf_distillation(model: nn.Module, dat: torch.Tensor, target: torch.Tensor, eps: float, alpha: float,
                      steps: int, layer: int, before_relu: bool = True, mu: float = 1.0,
                      momentum: bool = True) -> torch.Tensor:
    """``Linf_distillation(rand_start=False)``: descend ``nn.MSELoss()`` between layer-``layer`` features
    of x' and of ``target`` (recomputed every step), ``loss.backward()`` with the model in its mode."""
    from robbench.models import get_features

    def grad_of(x_adv: torch.Tensor) -> torch.Tensor:
        x_adv.requires_grad = True
        out = get_features(model, x_adv, layer, before_relu)
        tgt = get_features(model, target, layer, before_relu).data.clone().detach()
        loss = nn.MSELoss()(out, tgt)
        model.zero_grad()
        loss.backward()
        return x_adv.grad.data.clone().detach()

    return _steps(grad_of, dat, eps, alpha, steps, True, momentum, mu)
