"""Ensembles as first-class models: members in an ``nn.ModuleList``, one selectable output combination,
and a batched (``torch.func`` vmap) path for identical members.

Every model robbench builds is an :class:`Ensemble`, also with one member (checkpoint keys are
always ``members.0...``); one member returns its raw logits.
"""
from __future__ import annotations

import warnings
from typing import Iterable

import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from robbench.device import use_vmap

COMBINES = ("log_mean_softmax", "mean_logits", "vote")
# DVERGE models/ensemble.py clamps the mean probability at 1e-40 before the log.
LOG_CLAMP = 1e-40


def combine_logits(logits: torch.Tensor, combine: str) -> torch.Tensor:
    """Combine member outputs ``[M, B, C]`` into ``[B, C]``.

    - 'log_mean_softmax': log(mean_i softmax(z_i)) clamped at 1e-40 (DVERGE models/ensemble.py), so
      cross-entropy on it is the NLL of the averaged probabilities;
    - 'mean_logits': mean_i z_i;
    - 'vote': log of the fraction of members whose argmax is each class, clamped at 1e-40 (argmax of
      the output = the majority class; ties go to the lowest class index, torch.argmax's rule). It
      has zero gradient almost everywhere: attack it through another combination.
    """
    if combine == "log_mean_softmax":
        return torch.log(torch.clamp(torch.softmax(logits, dim=-1).mean(dim=0), min=LOG_CLAMP))
    if combine == "mean_logits":
        return logits.mean(dim=0)
    if combine == "vote":
        votes = nn.functional.one_hot(logits.argmax(dim=-1), logits.shape[-1]).to(logits.dtype)
        return torch.log(torch.clamp(votes.mean(dim=0), min=LOG_CLAMP))
    raise ValueError(f"combine must be one of {COMBINES}, got {combine!r}")


_SCALARS = (bool, int, float, str, type(None))


def _signature(m: nn.Module) -> tuple:
    """Structure plus plain Python settings (sgm_gamma, MixtureBN route, ...): the vmap path runs every
    member through member 0's module code and attributes, so these must agree."""
    def plain(v: object) -> bool:
        return isinstance(v, _SCALARS) or (isinstance(v, (list, tuple)) and all(isinstance(e, _SCALARS) for e in v))

    settings = tuple((name, type(mod), tuple(sorted((k, tuple(v) if isinstance(v, list) else v)
                                                    for k, v in vars(mod).items()
                                                    if not k.startswith("_") and plain(v))))
                     for name, mod in m.named_modules())
    return (settings,
            tuple((k, tuple(v.shape), v.dtype) for k, v in m.named_parameters()),
            tuple((k, tuple(v.shape), v.dtype) for k, v in m.named_buffers()))


class Ensemble(nn.Module):
    """``members`` combined by ``combine``; ``batched`` picks how members run:
    True = vmap when possible, False = loop, None = per device (vmap on CUDA, loop on CPU, where
    vmap measured 0.54-1.0x of the loop: environment notes §3).

    The vmap path needs identical members (same type, parameter and buffer shapes), all in eval mode
    (a vmapped BatchNorm cannot update running stats) and no forward hooks; otherwise, or if vmap
    raises, it falls back to the loop (a failure is warned about once).
    """

    def __init__(self, members: Iterable[nn.Module], combine: str = "log_mean_softmax",
                 batched: bool | None = None) -> None:
        super().__init__()
        if combine not in COMBINES:
            raise ValueError(f"combine must be one of {COMBINES}, got {combine!r}")
        self.members = members if isinstance(members, nn.ModuleList) else nn.ModuleList(members)
        if len(self.members) == 0:
            raise ValueError("an ensemble needs at least one member")
        self.combine = combine
        self.batched = batched
        self._vmap_failed = False
        # cache of stacked member tensors, never in the state dict
        object.__setattr__(self, "_stack_cache", None)

    # -- access -----------------------------------------------------------------------------------
    @property
    def num_members(self) -> int:
        return len(self.members)

    @property
    def num_forward_passes(self) -> int:
        """Forward passes one ensemble forward costs (= members)."""
        return len(self.members)

    def __len__(self) -> int:
        return len(self.members)

    def member(self, i: int) -> nn.Module:
        return self.members[i]

    # -- execution --------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.members) == 1:
            return self.members[0](x)
        return combine_logits(self.member_logits(x), self.combine)

    def member_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Each member's logits, ``[M, B, C]``."""
        if self._want_vmap(x.device) and self.can_vmap():
            try:
                return self._vmap_logits(x)
            except RuntimeError as e:  # a layer without a batching rule etc.: loop instead
                self._vmap_failed = True
                warnings.warn(f"Ensemble: batched (vmap) execution failed, using the loop: {e}", stacklevel=2)
        return torch.stack([m(x) for m in self.members])

    def _want_vmap(self, device: torch.device) -> bool:
        if len(self.members) < 2 or self._vmap_failed or self.batched is False:
            return False
        return True if self.batched else use_vmap(device)

    def can_vmap(self) -> bool:
        """Members identical in structure and settings, every module in eval mode, no hooks."""
        first = _signature(self.members[0])
        if any(_signature(m) != first for m in self.members[1:]):
            return False
        for mod in self.members.modules():
            if mod.training or mod._forward_hooks or mod._forward_pre_hooks or mod._backward_hooks:
                return False
        return True

    def _stacked_state(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Stacked member parameters/buffers. When no parameter needs a gradient (evaluation,
        attacks on frozen models) the stack is cached and rebuilt only if a tensor changed."""
        params = [p for m in self.members for p in m.parameters()]
        if any(p.requires_grad for p in params) and torch.is_grad_enabled():
            # torch.stack keeps the graph to each member's parameters (stack_module_state would
            # return new leaves, and training through the batched path would not reach the members).
            named = [dict(m.named_parameters()) for m in self.members]
            nbuf = [dict(m.named_buffers()) for m in self.members]
            return ({k: torch.stack([d[k] for d in named]) for k in named[0]},
                    {k: torch.stack([d[k] for d in nbuf]) for k in nbuf[0]})
        key = tuple((id(t), t._version, t.data_ptr()) for m in self.members
                    for t in (*m.parameters(), *m.buffers()))
        cache = self._stack_cache
        if cache is None or cache[0] != key:
            with torch.no_grad():
                ps, bs = stack_module_state(list(self.members))  # type: ignore[arg-type]
            ps = {k: v.detach() for k, v in ps.items()}
            object.__setattr__(self, "_stack_cache", (key, ps, bs))
            cache = self._stack_cache
        return cache[1], cache[2]

    def _vmap_logits(self, x: torch.Tensor) -> torch.Tensor:
        base = self.members[0]  # functional_call swaps the stacked tensors in for the call only
        params, buffers = self._stacked_state()

        def one(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor], inp: torch.Tensor) -> torch.Tensor:
            return functional_call(base, (p, b), (inp,))

        return vmap(one, in_dims=(0, 0, None))(params, buffers, x)

    def _apply(self, fn, recurse: bool = True):  # type: ignore[no-untyped-def]
        # .to()/.cuda()/.half() invalidate the stacked cache.
        object.__setattr__(self, "_stack_cache", None)
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return f"combine={self.combine!r}, batched={self.batched}"
