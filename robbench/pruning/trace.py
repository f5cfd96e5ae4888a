"""Trace which normalisation layer consumes each masked layer's output (one probe forward)."""
from __future__ import annotations

import torch
from torch import nn

from robbench.pruning.masked import masked_layers

NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm)


def probe_input(net: nn.Module) -> torch.Tensor:
    """One zero image shaped for ``net``'s first conv/linear (the first masked or plain layer met)."""
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            size = getattr(net, "probe_size", 8)
            p = m.weight
            return torch.zeros(2, m.in_channels, size, size, device=p.device, dtype=p.dtype)
        if isinstance(m, nn.Linear):
            return torch.zeros(2, m.in_features, device=m.weight.device, dtype=m.weight.dtype)
    raise ValueError("network has no conv or linear layer")


def conv_norm_pairs(net: nn.Module, x: torch.Tensor | None = None) -> dict[str, nn.Module]:
    """{masked layer name: the norm module whose input is exactly that layer's output}."""
    outputs: dict[int, tuple[str, torch.Tensor]] = {}  # the tensor is held so its id is not reused
    pairs: dict[str, nn.Module] = {}
    handles = []
    for name, layer in masked_layers(net):
        handles.append(layer.register_forward_hook(  # type: ignore[attr-defined]
            lambda m, a, o, name=name: outputs.__setitem__(id(o), (name, o))))
    for m in net.modules():
        if isinstance(m, NORMS):
            def pre(mod: nn.Module, args: tuple) -> None:
                hit = outputs.get(id(args[0]))
                if hit is not None and hit[1] is args[0] and hit[0] not in pairs:
                    pairs[hit[0]] = mod
            handles.append(m.register_forward_pre_hook(pre))
    was = [(m, m.training) for m in net.modules()]
    net.eval()
    try:
        with torch.no_grad():
            net(x if x is not None else probe_input(net))
    finally:
        for h in handles:
            h.remove()
        for m, flag in was:
            m.training = flag
    return pairs
