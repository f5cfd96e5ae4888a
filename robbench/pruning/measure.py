"""Kept parameters, sparsity and FLOPs of a (masked) network, measured from the masks it holds.

FLOPs are counted as multiply-accumulates of the conv and linear layers (the convention of the pruning
papers EED compares with): a conv computes ``H_out * W_out * nnz(weight * mask)`` MACs per sample, a
linear ``nnz(weight * mask)``. Normalisation, activations and pooling are not counted. A dense layer
counts all its weights. The probe forward uses one zero image of the model's input shape.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from robbench.pruning.masked import MASKED_TYPES

# Training-only tensors of a masked layer: not part of the deployed (mask-baked) model.
TRAINING_ONLY = ("scores", "k_score")


@dataclass
class Footprint:
    params_total: int            # deployable parameters of the dense model (scores/rates excluded)
    params_kept: int             # the same with pruned weights removed
    prunable: int                # weights of the masked layers
    prunable_kept: int
    macs_dense: int              # per sample
    macs_kept: int

    @property
    def sparsity(self) -> float:
        """Fraction of the masked layers' weights that are pruned."""
        return 1.0 - self.prunable_kept / self.prunable if self.prunable else 0.0

    @property
    def flops_speedup(self) -> float:
        return self.macs_dense / self.macs_kept if self.macs_kept else float("inf")

    def as_record(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(sparsity=self.sparsity, flops_speedup=self.flops_speedup)
        return d


def _weight_nnz(m: nn.Module) -> tuple[int, int]:
    w = m.weight  # type: ignore[attr-defined]
    if isinstance(m, MASKED_TYPES):
        return int(w.numel()), int(m.mask.count_nonzero())  # type: ignore[attr-defined]
    return int(w.numel()), int(w.numel())


def footprint(net: nn.Module, input_shape: tuple[int, ...]) -> Footprint:
    """Measure ``net`` (one network, or any module whose forward takes ``[1, *input_shape]``)."""
    total = kept = prunable = prunable_kept = 0
    seen: set[int] = set()
    for mod in net.modules():
        for name, p in mod.named_parameters(recurse=False):
            if id(p) in seen or name in TRAINING_ONLY:
                continue
            seen.add(id(p))
            n = p.numel()
            total += n
            if name == "weight" and isinstance(mod, MASKED_TYPES):
                nnz = int(mod.mask.count_nonzero())  # type: ignore[attr-defined]
                kept += nnz
                prunable += n
                prunable_kept += nnz
            else:
                kept += n
    macs = {"dense": 0, "kept": 0}

    def hook(m: nn.Module, args: tuple, out: torch.Tensor) -> None:
        numel, nnz = _weight_nnz(m)
        positions = out.shape[-1] * out.shape[-2] if isinstance(m, nn.Conv2d) else 1
        macs["dense"] += positions * numel
        macs["kept"] += positions * nnz

    handles = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was = [(m, m.training) for m in net.modules()]
    net.eval()
    try:
        p0 = next(net.parameters())
        with torch.no_grad():
            net(torch.zeros((1, *input_shape), device=p0.device, dtype=p0.dtype))
    finally:
        for h in handles:
            h.remove()
        for m, flag in was:
            m.training = flag
    return Footprint(total, kept, prunable, prunable_kept, macs["dense"], macs["kept"])


def bake_masks(net: nn.Module) -> dict[str, torch.Tensor]:
    """The deployable state dict: masked weights multiplied by their masks, scores/rates/masks dropped;
    keys are those of the same architecture built without the 'masked' transform."""
    out: dict[str, torch.Tensor] = {}
    for name, t in net.state_dict().items():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in TRAINING_ONLY or leaf == "mask":
            continue
        out[name] = t
    for mname, m in net.named_modules():
        if isinstance(m, MASKED_TYPES):
            key = f"{mname}.weight" if mname else "weight"
            out[key] = (m.weight * m.mask).detach().clone()  # type: ignore[attr-defined]
    return out
