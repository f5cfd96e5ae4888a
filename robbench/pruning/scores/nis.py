"""NIS / NISP (Yu et al., CVPR 2018; EED Eqs. 7-8): neuron importance back-propagated from the final
responses, s_k = |W_{k+1}|^T s_{k+1}, and a weight's score s_out(j) * |w_jk| (NISP scores neurons; EED
prunes weights, so the weight score is its output neuron's importance times its magnitude -- notes §B,
[unverified] reading).

NISP's recursion is the backward pass of the network with every weight replaced by its absolute value,
biases and shifts dropped and activations linearised. That is computed here with autograd on such a
copy: BatchNorm becomes its channel scale |gamma| / sqrt(var + eps), ReLU the identity, max-pooling an
average pool of the same window, the input normalisation the identity. The gradient of
``sum(s_final * logits)`` at a layer's output, summed over positions, is the importance of its output
channels; residual additions sum the importance of both branches (NISP's chain rule for a DAG).

The seed s_final (NISP ranks the final responses with Inf-FS, which EED does not describe):
'uniform' (every class 1, default, an assumption) or 'logit_abs' (mean |logit| over the score batches).
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from robbench.pruning.masked import MASKED_TYPES, masked_layers
from robbench.pruning.scores.base import ScoreData, register
from robbench.pruning.trace import probe_input


class ChannelScale(nn.Module):
    def __init__(self, scale: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("scale", scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale.reshape(1, -1, *([1] * (x.dim() - 2)))


class AvgPoolLike(nn.Module):
    """The linear stand-in of a max-pool: average over the same window (2x2/2 for VGG's adaptive pool)."""

    def __init__(self, kernel: int = 2, stride: int = 2, padding: int = 0, adaptive_skip: bool = False) -> None:
        super().__init__()
        self.kernel, self.stride, self.padding, self.adaptive_skip = kernel, stride, padding, adaptive_skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.adaptive_skip and (x.shape[-1] < 2 or x.shape[-2] < 2):
            return x
        return F.avg_pool2d(x, self.kernel, self.stride, self.padding, count_include_pad=False)


def _linearise(net: nn.Module) -> nn.Module:
    lin = copy.deepcopy(net)
    for parent in list(lin.modules()):
        for name, child in list(parent.named_children()):
            new: nn.Module | None = None
            if isinstance(child, nn.modules.batchnorm._BatchNorm):
                g = child.weight.detach().abs() if child.weight is not None else torch.ones_like(child.running_var)
                new = ChannelScale(g / torch.sqrt(child.running_var + child.eps))
            elif isinstance(child, (nn.ReLU, nn.LeakyReLU)):
                new = nn.Identity()
            elif isinstance(child, nn.MaxPool2d):
                new = AvgPoolLike(int(child.kernel_size), int(child.stride), int(child.padding))  # type: ignore[arg-type]
            elif type(child).__name__ == "AdaptiveMaxPool":  # robbench VGG's pool (models/vgg.py)
                new = AvgPoolLike(adaptive_skip=True)
            elif type(child).__name__ == "Normalize":
                new = nn.Identity()
            if new is not None:
                setattr(parent, name, new)
    with torch.no_grad():
        for m in lin.modules():
            if isinstance(m, MASKED_TYPES):
                m.scores.requires_grad_(False)
                if m.k_score is not None:
                    m.k_score.requires_grad_(False)
                m.weight.copy_((m.weight * m.mask).abs())
                if m.bias is not None:  # type: ignore[attr-defined]
                    m.bias.zero_()  # type: ignore[attr-defined]
    for p in lin.parameters():
        p.requires_grad_(False)
    return lin.eval()


def neuron_importance(net: nn.Module, seed: torch.Tensor | None = None, x: torch.Tensor | None = None
                      ) -> dict[str, torch.Tensor]:
    """{masked layer: importance of each output channel/unit} by NISP's propagation."""
    lin = _linearise(net)
    outs: dict[str, torch.Tensor] = {}
    handles = []
    for name, layer in masked_layers(lin):
        def hook(m: nn.Module, a: tuple, o: torch.Tensor, name: str = name) -> torch.Tensor:
            o.retain_grad()
            outs[name] = o
            return o
        handles.append(layer.register_forward_hook(hook))  # type: ignore[attr-defined]
    try:
        inp = (x if x is not None else probe_input(net))[:1]
        inp = torch.ones_like(inp).requires_grad_(True)  # any input: the network is linear without biases
        with torch.enable_grad():
            logits = lin(inp)
            s = seed.to(logits) if seed is not None else torch.ones(logits.shape[-1], dtype=logits.dtype,
                                                                    device=logits.device)
            (logits * s).sum().backward()
    finally:
        for h in handles:
            h.remove()
    imp = {}
    for name, o in outs.items():
        g = o.grad if o.grad is not None else torch.zeros_like(o)
        imp[name] = g.sum(dim=0) if g.dim() == 2 else g.sum(dim=(0, 2, 3))
    return imp


@register("nis")
@torch.no_grad()
def nis_scores(net: nn.Module, data: ScoreData) -> dict[str, torch.Tensor]:
    seed = None
    x = data.batches[0][0] if data.batches else None
    if data.options.get("nis_seed", "uniform") == "logit_abs" and data.batches:
        was = net.training
        net.eval()
        seed = torch.stack([net(xb).abs().mean(0) for xb, _ in data.batches]).mean(0)
        net.train(was)
    imp = neuron_importance(net, seed, x)
    out = {}
    for name, layer in masked_layers(net):
        w = layer.weight
        out[name] = imp[name].reshape(-1, *([1] * (w.dim() - 1))) * w.abs()
    return out
