"""Score-masked layers (HYDRA ``SubnetConv``/``SubnetLinear``; HARP's learnable per-layer rates).

A masked layer keeps its dense ``weight`` and adds
- ``scores`` (a Parameter shaped like ``weight``): the importance scores; the mask keeps the top-k of
  ``|scores|`` in the layer (HYDRA ``GetSubnet``: sort, zero the lowest ``int((1 - k) * numel)``, one
  the rest; here a selection of the threshold gives the same mask, :func:`topk_mask`) and passes the
  gradient straight through to the scores;
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


def topk_mask_sort(scores: torch.Tensor, j: int) -> torch.Tensor:
    """The references' rule by sorting: zero the ``j`` lowest of ``scores`` (in sort order), one the rest."""
    flat = torch.zeros(scores.numel(), dtype=scores.dtype, device=scores.device)
    _, idx = scores.flatten().sort()  # flatten() follows the logical order whatever the memory format
    flat[idx[j:]] = 1.0
    return flat.view(scores.shape)


BRACKET_MIN = 1 << 20  # layers this large select their threshold among a bracket of candidates
BRACKET_SAMPLE = 1 << 14


def kth_smallest(flat: torch.Tensor, j: int) -> torch.Tensor:
    """The (j + 1)-th smallest of ``flat`` (``kthvalue(j + 1)``). A large layer first brackets it between
    two quantiles of a fixed strided sample (no random numbers: the run's RNG streams stay as they
    were), then selects within the bracket; a bracket that misses falls back to the whole layer, so
    the value is always exact."""
    n = flat.numel()
    if n >= BRACKET_MIN:
        sample = flat[::n // BRACKET_SAMPLE].sort().values
        m = sample.numel()
        q = j / n
        half = 6.0 * (q * (1 - q) / m) ** 0.5 + 2.0 / m  # six standard errors of the sample quantile
        lo, hi = sample[max(0, int((q - half) * m))], sample[min(m - 1, int((q + half) * m) + 1)]
        below = int((flat < lo).sum())
        cand = flat[(flat >= lo) & (flat <= hi)]
        if below <= j < below + cand.numel():
            return cand.kthvalue(j - below + 1).values
    return flat.kthvalue(j + 1).values


def topk_mask(scores: torch.Tensor, j: int) -> torch.Tensor:
    """:func:`topk_mask_sort`'s mask without the full sort: the threshold v = the (j + 1)-th smallest
    score (a selection, :func:`kth_smallest`), mask = scores >= v. That is the sort's mask exactly
    unless scores equal to v fall on both sides of position j (a tie at the cut: which of them the
    sort keeps depends on its order); then the sort itself decides."""
    n = scores.numel()
    if j <= 0:
        return torch.ones_like(scores)
    if j >= n:
        return torch.zeros_like(scores)
    keep = (scores >= kth_smallest(scores.flatten(), j)).to(scores.dtype)
    if int(keep.sum()) != n - j:
        return topk_mask_sort(scores, j)
    return keep


def cut_index(k: torch.Tensor | float, n: int) -> int:
    """How many of ``n`` scores the keep fraction ``k`` zeroes: HYDRA's ``int((1 - k) * n)`` (a Python
    float for a fixed rate, in double precision; HARP's learnable rate at its float32 value)."""
    return int((1 - float(k.detach() if isinstance(k, torch.Tensor) else k)) * n)


class TopKMask(torch.autograd.Function):
    """mask = top-``k`` fraction of ``scores`` (per layer); backward: straight-through to the scores and
    ``sum(g)`` to ``k`` (HARP), as the references' ``GetSubnet``. ``known``: the mask these scores and
    this ``k`` give, when already computed (the prune phase's cache), returned instead of recomputing."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, k: torch.Tensor | float,  # type: ignore[override]
                known: torch.Tensor | None = None) -> torch.Tensor:
        ctx.k_is_tensor = isinstance(k, torch.Tensor)
        if known is not None:
            return known.clone()
        return topk_mask(scores, cut_index(k, scores.numel()))

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        return g, (g.sum() if ctx.k_is_tensor else None), None


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
        # (scores storage, scores version, cut, mask version): the scores and cut ``mask`` was computed from
        self._mask_key: tuple[int, int, int, int] | None = None

    def rate(self) -> torch.Tensor | float:
        """This layer's keep fraction (a tensor when learnable under HARP, else the fixed float)."""
        if self.k_score is not None:
            return keep_rate(self.k_score, self.k_min)
        return self.keep

    def effective_weight(self) -> torch.Tensor:
        if self.learning_mask:
            # the mask depends only on the scores and the cut: while neither changed (the attack's
            # forwards within one training step, a forward and its backward) the stored mask is it
            k = self.rate()
            key = (self.scores.data_ptr(), self.scores._version, cut_index(k, self.scores.numel()))
            known = self.mask if self._mask_key == (*key, self.mask._version) else None
            m = TopKMask.apply(self.scores.abs(), k, known)
            if known is None:
                with torch.no_grad():
                    self.mask.copy_(m.detach())
                self._mask_key = (*key, self.mask._version)
            return self.weight * m
        return self.weight * self.mask

    @torch.no_grad()
    def refresh_mask(self) -> None:
        """Recompute ``mask`` from the scores (after a score initialiser; before freezing the scores)."""
        self.mask.copy_(topk_mask(self.scores.abs(), cut_index(self.rate(), self.scores.numel())))
        self._mask_key = None

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
