"""Feature taps: named intermediate outputs any trainer can read (DVERGE / EIO feature distillation).

Architectures place identity :class:`FeatureTap` modules at their candidate layers, in forward order.
:func:`get_features` runs a network only as far as the requested tap (a forward hook raises and the
exception is caught), so a layer-1 feature costs one conv, not a full forward. Nothing here knows
about a particular architecture.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from robbench.errors import ConfigError


class FeatureTap(nn.Module):
    """Identity marking a candidate feature layer.

    ``activation`` is the function the network applies right after this point (None when nothing
    follows, e.g. logits). ``pre_activation_only`` marks taps the references always read before the
    activation whatever ``before_relu`` says: the stem conv+BN output, layer 1 in both DVERGE
    (``get_features``: layer 1 returns before the ReLU) and EIO (``resnet.py:get_features``).
    The activation is stored outside the module tree so hooks and state dicts see no extra module.
    """

    def __init__(self, activation: Callable[[torch.Tensor], torch.Tensor] | None = None, *,
                 pre_activation_only: bool = False) -> None:
        super().__init__()
        object.__setattr__(self, "activation", activation)
        self.pre_activation_only = pre_activation_only

    @property
    def relu_follows(self) -> bool:
        return self.activation is not None  # type: ignore[attr-defined]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def extra_repr(self) -> str:
        return f"relu_follows={self.relu_follows}" + (", pre_activation_only" if self.pre_activation_only else "")


def feature_layers(net: nn.Module) -> list[str]:
    """Module names of the taps of ``net`` in forward order (index i is feature layer i + 1).

    Architectures register taps in the order the forward pass reaches them (tested for every arch).
    Pass a single member, not an :class:`~robbench.models.ensemble.Ensemble` (whose list would hold
    every member's taps).
    """
    return [name for name, m in net.named_modules() if isinstance(m, FeatureTap)]


def num_feature_layers(net: nn.Module) -> int:
    return len(feature_layers(net))


class _StopForward(Exception):
    """Raised from a tap's hook to end the forward pass early."""


def get_features(net: nn.Module, x: torch.Tensor, layer: int, before_relu: bool = True) -> torch.Tensor:
    """Output of feature layer ``layer`` (1-based) of ``net`` for input ``x``.

    Runs the forward only until that tap fires; later layers never run (and, in train mode, their
    BatchNorm statistics do not move, as in the references' partial forwards). With
    ``before_relu=False`` the activation that follows the tap is applied, unless the tap has none
    (logits) or is pre-activation only (stem).
    """
    names = feature_layers(net)
    if not 1 <= layer <= len(names):
        raise ConfigError(f"feature layer {layer} does not exist; allowed: 1..{len(names)} "
                          f"for {type(net).__name__}", field="layer")
    tap = net.get_submodule(names[layer - 1])
    assert isinstance(tap, FeatureTap)
    box: list[torch.Tensor] = []

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        box.append(output)
        raise _StopForward

    handle = tap.register_forward_hook(hook)
    try:
        net(x)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if not box:
        raise RuntimeError(f"feature tap {names[layer - 1]!r} did not run in {type(net).__name__}.forward")
    out = box[0]
    if not before_relu and tap.relu_follows and not tap.pre_activation_only:
        out = tap.activation(out)  # type: ignore[attr-defined]
    return out
