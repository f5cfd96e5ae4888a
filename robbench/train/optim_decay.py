"""Weight decay on a chosen set of parameters only, applied to the gradients.

ImageNet-Adversarial-Training (``third_party/imagenet_utils.py``) adds
``regularize_cost('.*/W', l2_regularizer(1e-4))`` to the loss: wd * sum(W**2) / 2 over every variable
named ``.../W`` -- the convolution and fully-connected kernels -- and not over BatchNorm gamma/beta or
the fc bias ``linear/b``. Its gradient is ``wd * W``, which is what :func:`add_weight_decay_` adds to
``W.grad`` (before the data-parallel average: every rank holds the same W, so the average keeps it),
the same update as torch's ``SGD(weight_decay=wd)`` restricted to those tensors.
"""
from __future__ import annotations

import torch
from torch import nn

CONV_FC: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def conv_fc_weights(model: nn.Module) -> list[nn.Parameter]:
    """The ``weight`` of every convolution and Linear layer (tensorpack's ``.*/W``), each once."""
    seen: set[int] = set()
    out: list[nn.Parameter] = []
    for m in model.modules():
        if isinstance(m, CONV_FC) and isinstance(m.weight, nn.Parameter) and id(m.weight) not in seen:
            seen.add(id(m.weight))
            out.append(m.weight)
    return out


@torch.no_grad()
def add_weight_decay_(params: list[nn.Parameter], wd: float) -> None:
    """``p.grad += wd * p`` for every parameter that has a gradient (the L2 term's gradient)."""
    if wd == 0.0:
        return
    with_grad = [p for p in params if p.grad is not None]
    if with_grad:
        torch._foreach_add_([p.grad for p in with_grad], [p.detach() for p in with_grad], alpha=wd)


def l2_term(params: list[nn.Parameter], wd: float) -> torch.Tensor:
    """wd * sum(p**2) / 2 (``tf.contrib.layers.l2_regularizer``'s value, for logging and tests)."""
    return wd * 0.5 * sum((p.detach().float() ** 2).sum() for p in params)
