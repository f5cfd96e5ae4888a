"""MAD's learned-mask adversarial saliency (Lee, Kim & Ro, CVPR 2022; ByungKwanLee/Masking-Adversarial-
Damage ``compute_saliency.py``, ``pruner/kfac_MAD_pruner.py``, ``models/operator/mask.py``): ASE's
``saliency = 'mad'`` option. EED's Eq. 10 prints the simplified 1/2 * H_ii * w^2 (ASE's default); MAD
itself scores the *damage* a learned soft mask does:

1. per training batch, adversarial examples (here the run's training attack, ``ScoreData.craft``; MAD:
   PGD-10, eps 0.03) against the model with no mask;
2. a factor softplus(m) on every weight and bias of the masked layers, m reset so the factor is 1
   (``initial_mask = 1`` through softplus's inverse), then ``mask_steps`` Adam steps (MAD: 20, lr 0.1)
   minimising CE on those examples with respect to m only, m clamped after each step to the inverse
   images of [0, 1] (0 taken as 1e-4, as MAD's ``f_inv``);
3. the true-label Fisher of the masked model on the same examples: K-FAC blocks G (x) A with G the
   second moment of the layer-output gradients (diagonal used) and A the full second moment of the
   layer inputs (conv: unfolded patches; a ones column when the layer has a bias, the bias being the
   last column of MAD's weight matrix);
4. the damage Delta w = w - w * softplus(m) (bias included) and, per weight (o, j),
   Delta L_oj = 1/2 * G_oo * Delta w_oj * (Delta w_o A)_j -- the diagonal of the per-row block
   1/2 * G_oo * Delta w_o^T Delta w_o A that MAD's ``_compute_delta_L`` keeps;
5. the mean of Delta L over the batches.

The score ranks weights within a layer (the framework's per-layer top-k); MAD prunes globally over the
convs instead, a choice of the pruning framework, not of the score. ``Delta w_o A`` is computed without
forming A (for a conv A is (C kh kw)^2): ``(Delta w_o . a_p) a_p`` averaged over samples and positions.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from robbench.pruning.masked import MaskedConv2d, MaskedMixin
from robbench.pruning.scores.base import layer_io

MASK_LOW = math.log(math.expm1(1e-4))  # softplus^-1(0), with 0 read as 1e-4 (MAD f_inv)
MASK_HIGH = math.log(math.expm1(1.0))  # softplus^-1(1): the factor starts at 1


def input_columns(layer: MaskedMixin, a: torch.Tensor) -> torch.Tensor:
    """[N, J] rows the layer's weight rows multiply: conv patches (one row per sample and position) or
    linear inputs, with a ones column last when the layer has a bias."""
    if isinstance(layer, MaskedConv2d):
        if layer.groups != 1:
            raise ValueError("the MAD saliency supports ungrouped convolutions only")
        cols = F.unfold(a, layer.kernel_size, dilation=layer.dilation, padding=layer.padding,  # type: ignore[arg-type]
                        stride=layer.stride)  # [B, C kh kw, L]
        cols = cols.transpose(1, 2).reshape(-1, cols.shape[1])
    else:
        cols = a.reshape(-1, a.shape[-1])
    if layer.bias is not None:  # type: ignore[attr-defined]
        cols = torch.cat([cols, cols.new_ones(len(cols), 1)], dim=1)
    return cols


def output_second_moment(g: torch.Tensor, batch: int) -> torch.Tensor:
    """G_oo: mean over samples (and positions) of the per-sample output gradient squared."""
    g = g * batch  # gradients of the batch-mean loss are 1/B of each sample's own
    if g.dim() == 4:
        return g.pow(2).mean(dim=(0, 2, 3))
    return g.reshape(-1, g.shape[-1]).pow(2).mean(dim=0)


def damage(delta: torch.Tensor, cols: torch.Tensor, g_diag: torch.Tensor) -> torch.Tensor:
    """1/2 G_oo Delta w_oj (Delta w_o A)_j with A = mean_p a_p a_p^T; ``delta`` is [O, J] (bias last)."""
    delta_a = (cols @ delta.t()).t() @ cols / len(cols)  # [O, J] = Delta w A
    return 0.5 * g_diag.reshape(-1, 1) * delta * delta_a


def _weight_matrix(layer: MaskedMixin) -> torch.Tensor:
    """MAD's ``fetch_mat_weights``: the (masked) weight as [O, J], the bias as the last column."""
    w = (layer.weight * layer.mask).reshape(layer.weight.shape[0], -1)
    b = layer.bias  # type: ignore[attr-defined]
    return torch.cat([w, b.reshape(-1, 1)], dim=1) if b is not None else w


def learn_mask(net: nn.Module, layers: list[tuple[str, MaskedMixin]], x: torch.Tensor, y: torch.Tensor,
               steps: int, lr: float) -> dict[str, torch.Tensor]:
    """Step 2: the raw mask m per weight and bias ([O, J], bias last) after ``steps`` Adam steps."""
    raw = {n: torch.full(_weight_matrix(l).shape, MASK_HIGH, device=l.weight.device, dtype=l.weight.dtype,
                         requires_grad=True) for n, l in layers}
    opt = torch.optim.Adam(list(raw.values()), lr=lr)
    for _ in range(steps):
        loss = F.cross_entropy(functional_call(net, _masked_params(layers, raw), (x,)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            for m in raw.values():
                m.clamp_(MASK_LOW, MASK_HIGH)
    return {n: m.detach() for n, m in raw.items()}


def _masked_params(layers: list[tuple[str, MaskedMixin]], raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name, layer in layers:
        f = F.softplus(raw[name])
        k = layer.weight[0].numel()
        out[f"{name}.weight"] = layer.weight.detach() * f[:, :k].reshape(layer.weight.shape)
        if layer.bias is not None:  # type: ignore[attr-defined]
            out[f"{name}.bias"] = layer.bias.detach() * f[:, k]  # type: ignore[attr-defined]
    return out


def mad_scores(net: nn.Module, layers: list[tuple[str, MaskedMixin]],
               batches: list[tuple[torch.Tensor, torch.Tensor]], craft, steps: int = 20,
               lr: float = 0.1) -> dict[str, torch.Tensor]:
    """Steps 1-5 over ``batches``; ``net`` in eval mode with its parameters' requires_grad off."""
    total = {n: torch.zeros_like(l.weight) for n, l in layers}
    for x, y in batches:
        xa = craft(x, y) if craft is not None else x
        raw = learn_mask(net, layers, xa, y, steps, lr)
        params = _masked_params(layers, raw)
        with layer_io(layers) as (inputs, outs), torch.enable_grad():  # type: ignore[arg-type]
            xg = xa.detach().requires_grad_(True)  # a graph through every layer output
            F.cross_entropy(functional_call(net, params, (xg,)), y).backward()
        with torch.no_grad():
            for name, layer in layers:
                w = _weight_matrix(layer)
                delta = w - w * F.softplus(raw[name])
                g = outs[name].grad
                g_diag = output_second_moment(g if g is not None else torch.zeros_like(outs[name]), len(xg))
                d = damage(delta, input_columns(layer, inputs[name]), g_diag)
                total[name] += d[:, :layer.weight[0].numel()].reshape(layer.weight.shape)
    return {n: t / len(batches) for n, t in total.items()}
