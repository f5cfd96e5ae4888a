"""Score-masked layers (HYDRA ``SubnetConv``/``SubnetLinear``; HARP's learnable per-layer rates).

A masked layer keeps its dense ``weight`` and adds
- ``scores`` (a Parameter shaped like ``weight``): the importance scores; the mask keeps the top-k of
  ``|scores|`` in the layer (HYDRA ``GetSubnet``: sort, zero the lowest ``int((1 - k) * numel)``, one
  the rest) and passes the gradient straight through to the scores;
- ``mask`` (a float buffer of 0/1 shaped like ``weight``): the mask in use. It is part of the state dict,
  so it lands in ``model.safetensors`` (hashed in the manifest) and every measurement (kept parameters,
  sparsity, FLOPs) reads it;
- ``k_score`` (a scalar Parameter, HARP only): the layer's keep rate is
  ``k = sigmoid(k_score) * (1 - k_min) + k_min`` (HARP ``utils.rate_act_func``; ``k_min = 0.1 * k_target``
  by default) and the straight-through gradient to ``k`` is ``sum(g)`` over the whole mask gradient
  (HARP ``models/layers.py`` ``GetSubnet.backward``: ``g_r = torch.sum(g)``).

In the prune phase (``learning_mask``, set by :func:`set_phase`) the forward recomputes the mask from
the scores and stores it in ``mask``; otherwise (a fresh build: all ones; fine-tune phase, evaluation,
a loaded checkpoint) it uses ``mask`` as stored. ``weight * mask`` is what the layer computes with, so a pruned weight gets a zero gradient.
"""
from __future__ import annotations

import math
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn


class TopKMask(torch.autograd.Function):
    """mask = top-``k`` fraction of ``scores`` (per layer); backward: straight-through to the scores and
    ``sum(g)`` to ``k`` (HARP), as the references' ``GetSubnet``."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, k: torch.Tensor | float) -> torch.Tensor:  # type: ignore[override]
        # k: a Python float for a fixed rate (HYDRA: int((1 - 0.2) * n) in double precision), a tensor
        # for HARP's learnable rate (its float32 value, as HARP's rate_act_func output)
        ctx.k_is_tensor = isinstance(k, torch.Tensor)
        flat = torch.zeros(scores.numel(), dtype=scores.dtype, device=scores.device)
        _, idx = scores.flatten().sort()  # flatten() follows the logical order whatever the memory format
        j = int((1 - float(k)) * scores.numel())
        flat[idx[j:]] = 1.0
        return flat.view(scores.shape)

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        return g, (g.sum() if ctx.k_is_tensor else None)


def keep_rate(k_score: torch.Tensor, k_min: float) -> torch.Tensor:
    """HARP ``rate_act_func``: sigmoid(k_score) * (1 - k_min) + k_min, in [k_min, 1]."""
    return torch.sigmoid(k_score) * (1 - k_min) + k_min


class MaskedMixin:
    """Shared state and logic of :class:`MaskedConv2d` and :class:`MaskedLinear`."""

    weight: nn.Parameter
    scores: nn.Parameter
    mask: torch.Tensor
    k_score: nn.Parameter | None
    keep: float
    k_min: float

    def _init_masking(self, keep: float, learn_rate: bool, k_min: float, k_score_init: float) -> None:
        self.scores = nn.Parameter(torch.empty_like(self.weight))
        # HYDRA/HARP initialise the scores with kaiming_uniform_(a=sqrt(5)); a score initialiser
        # (robbench.pruning.scores) replaces them before pruning starts.
        nn.init.kaiming_uniform_(self.scores, a=math.sqrt(5))
        self.register_buffer("mask", torch.ones_like(self.weight))
        self.keep = float(keep)
        self.k_min = float(k_min)
        # HARP layers.py: nn.init.constant_(self.k_score, 1.0) (the strategy file may replace it)
        self.k_score = nn.Parameter(torch.tensor(float(k_score_init))) if learn_rate else None
        self.learning_mask = False  # plain attribute: never in the state dict

    def rate(self) -> torch.Tensor | float:
        """This layer's keep fraction (a tensor when learnable under HARP, else the fixed float)."""
        if self.k_score is not None:
            return keep_rate(self.k_score, self.k_min)
        return self.keep

    def effective_weight(self) -> torch.Tensor:
        if self.learning_mask:
            m = TopKMask.apply(self.scores.abs(), self.rate())
            with torch.no_grad():
                self.mask.copy_(m.detach())
            return self.weight * m
        return self.weight * self.mask

    @torch.no_grad()
    def refresh_mask(self) -> None:
        """Recompute ``mask`` from the scores (after a score initialiser; before freezing the scores)."""
        k = self.rate()
        self.mask.copy_(TopKMask.apply(self.scores.abs(), k.detach() if isinstance(k, torch.Tensor) else k))

    def masked_parameters(self) -> Iterator[nn.Parameter]:
        yield self.weight


class MaskedConv2d(MaskedMixin, nn.Conv2d):
    @classmethod
    def from_dense(cls, conv: nn.Conv2d, keep: float, learn_rate: bool = False, k_min: float = 0.0,
                   k_score_init: float = 1.0) -> "MaskedConv2d":
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,  # type: ignore[arg-type]
                  padding=conv.padding, dilation=conv.dilation, groups=conv.groups,  # type: ignore[arg-type]
                  bias=conv.bias is not None, padding_mode=conv.padding_mode,
                  device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            new.weight.copy_(conv.weight)
            if conv.bias is not None:
                new.bias.copy_(conv.bias)  # type: ignore[union-attr]
        new._init_masking(keep, learn_rate, k_min, k_score_init)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.effective_weight(), self.bias)


class MaskedLinear(MaskedMixin, nn.Linear):
    @classmethod
    def from_dense(cls, lin: nn.Linear, keep: float, learn_rate: bool = False, k_min: float = 0.0,
                   k_score_init: float = 1.0) -> "MaskedLinear":
        new = cls(lin.in_features, lin.out_features, bias=lin.bias is not None, device=lin.weight.device,
                  dtype=lin.weight.dtype)
        with torch.no_grad():
            new.weight.copy_(lin.weight)
            if lin.bias is not None:
                new.bias.copy_(lin.bias)  # type: ignore[union-attr]
        new._init_masking(keep, learn_rate, k_min, k_score_init)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.effective_weight(), self.bias)


MASKED_TYPES = (MaskedConv2d, MaskedLinear)


def masked_layers(model: nn.Module) -> list[tuple[str, MaskedMixin]]:
    """(qualified name, layer) of every masked layer, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, MASKED_TYPES)]  # type: ignore[misc]


def set_phase(model: nn.Module, phase: str, *, train_bn: bool = True) -> None:
    """Which parameters train (HYDRA ``freeze_vars``/``unfreeze_vars``):

    - 'prune': scores (and HARP's ``k_score``) train; every masked layer's weight and bias are frozen;
      BatchNorm affine parameters stay trainable unless ``train_bn`` is false (HYDRA ``--freeze-bn``);
    - 'finetune': scores and ``k_score`` frozen (the mask is fixed as stored), everything else trains;
    - 'dense': no pruning: scores and rates frozen, everything else trains (the masks, all ones or
      inherited, still apply).
    """
    if phase not in ("prune", "finetune", "dense"):
        raise ValueError(f"phase must be 'prune', 'finetune' or 'dense', got {phase!r}")
    pruning = phase == "prune"
    masked_ids: set[int] = set()
    for _, layer in masked_layers(model):
        layer.learning_mask = pruning
        layer.scores.requires_grad_(pruning)
        if layer.k_score is not None:
            layer.k_score.requires_grad_(pruning)
        for p in (layer.weight, layer.bias):  # type: ignore[attr-defined]
            if p is not None:
                p.requires_grad_(not pruning)
        masked_ids.update(id(p) for p in layer.parameters(recurse=False))
    for mod in model.modules():
        if isinstance(mod, MASKED_TYPES):
            continue
        is_norm = isinstance(mod, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm))
        for p in mod.parameters(recurse=False):
            p.requires_grad_(not pruning or (is_norm and train_bn))
