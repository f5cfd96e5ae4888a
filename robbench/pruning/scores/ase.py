"""ASE / MAD adversarial saliency (Lee, Kim & Ro, CVPR 2022; EED Eq. 10): s = 1/2 * H_ii * w^2 with the
Hessian diagonal of the loss on adversarial examples approximated by a Fisher diagonal.

MAD (ByungKwanLee/Masking-Adversarial-Damage ``pruner/kfac_MAD_pruner.py``) uses block-wise K-FAC,
H ~ G (x) A with G the second moment of the output gradients and A of the layer inputs (true-label
Fisher), and keeps the element-wise diagonal term. The diagonal of G (x) A at weight (o, i) is
G_oo * A_ii: ``fisher = 'kfac'`` (default) accumulates E[g_o^2] and E[a_i^2] (conv inputs unfolded into
patches, means over samples and positions) over the score batches. ``fisher = 'empirical'`` uses the
squared mini-batch gradient instead. ``saliency = 'eq10'`` (default) is that score, as EED's Eq. 10
states it; ``saliency = 'mad'`` is MAD's own learned-mask damage (Delta w = w - w * softplus(m) after
``mask_steps`` Adam steps per batch, then 1/2 Delta w^T H Delta w per weight; :mod:`.mad`).
The adversarial examples come from ``data.craft`` (the pruning run's training attack); without it the
clean batches are used.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from robbench.pruning.masked import MaskedConv2d, masked_layers
from robbench.pruning.scores.base import ScoreData, layer_io, register
from robbench.pruning.scores.mad import mad_scores


def _input_second_moment(layer: nn.Module, a: torch.Tensor) -> torch.Tensor:
    """E[a_i^2] over samples (and positions) for each weight input index i, shaped to broadcast."""
    if isinstance(layer, MaskedConv2d):
        cols = F.unfold(a, layer.kernel_size, dilation=layer.dilation, padding=layer.padding,  # type: ignore[arg-type]
                        stride=layer.stride)  # [B, C*kh*kw, L]
        m = cols.pow(2).mean(dim=(0, 2))  # [C*kh*kw]
        g = layer.groups
        if g > 1:  # per group: weight[o] sees group (o // out_per_group) of the channels
            m = m.reshape(g, -1)
            return m.repeat_interleave(layer.out_channels // g, dim=0).reshape(layer.weight.shape)
        return m.reshape(1, *layer.weight.shape[1:])
    return a.pow(2).mean(dim=0).reshape(1, -1)


def _output_second_moment(g: torch.Tensor, batch: int) -> torch.Tensor:
    g = g * batch  # per-sample gradients of the mean loss are 1/B of the sample's own
    if g.dim() == 4:
        return g.pow(2).mean(dim=(0, 2, 3)).reshape(-1, 1, 1, 1)
    return g.pow(2).mean(dim=0).reshape(-1, 1)


@register("ase")
def ase_scores(net: nn.Module, data: ScoreData) -> dict[str, torch.Tensor]:
    if not data.batches:
        raise ValueError("the ASE score needs data batches")
    mode = data.options.get("fisher", "kfac")
    layers = masked_layers(net)
    if data.options.get("saliency", "eq10") == "mad":
        return _mad(net, layers, data)
    acc_a = {n: torch.zeros(()) for n, _ in layers}
    acc_g = {n: torch.zeros(()) for n, _ in layers}
    acc_emp = {n: torch.zeros_like(l.weight) for n, l in layers}
    was = [(m, m.training) for m in net.modules()]
    flags = [(p, p.requires_grad) for p in net.parameters()]
    try:
        with layer_io(layers) as (inputs, outs):  # type: ignore[arg-type]
            net.eval()  # Fisher of the trained model: BatchNorm statistics fixed
            for _, layer in layers:
                layer.weight.requires_grad_(True)
            for x, y in data.batches:
                xa = data.craft(x, y) if data.craft is not None else x
                for _, layer in layers:
                    layer.weight.grad = None
                with torch.enable_grad():
                    loss = F.cross_entropy(net(xa), y)
                    loss.backward()
                for name, layer in layers:
                    if mode == "empirical":
                        acc_emp[name] = acc_emp[name] + layer.weight.grad.detach().pow(2)
                    else:
                        o = outs[name]
                        g = o.grad if o.grad is not None else torch.zeros_like(o)
                        acc_a[name] = acc_a[name] + _input_second_moment(layer, inputs[name])
                        acc_g[name] = acc_g[name] + _output_second_moment(g.detach(), len(x))
    finally:
        for m, flag in was:
            m.training = flag
        for p, flag in flags:
            p.requires_grad_(flag)
            p.grad = None
    out = {}
    with torch.no_grad():
        for name, layer in layers:
            h = acc_emp[name] if mode == "empirical" else acc_g[name] * acc_a[name]
            out[name] = 0.5 * (h / len(data.batches)) * (layer.weight * layer.mask).pow(2)
    return out


def _mad(net: nn.Module, layers: list, data: ScoreData) -> dict[str, torch.Tensor]:
    was = [(m, m.training) for m in net.modules()]
    flags = [(p, p.requires_grad) for p in net.parameters()]
    try:
        net.eval()  # MAD optimises the mask and takes the Fisher with the model in eval mode
        for p in net.parameters():
            p.requires_grad_(False)
        return mad_scores(net, layers, data.batches, data.craft, int(data.options.get("mask_steps", 20)),  # type: ignore[arg-type]
                          float(data.options.get("mask_lr", 0.1)))  # type: ignore[arg-type]
    finally:
        for m, flag in was:
            m.training = flag
        for p, flag in flags:
            p.requires_grad_(flag)
