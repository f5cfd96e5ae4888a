"""Build networks and ensembles from validated zoo entries."""
from __future__ import annotations

from typing import Any

from torch import nn

from robbench.config import parse_dataclass
from robbench.data.info import DatasetInfo
from robbench.models.ensemble import Ensemble
from robbench.registry import ARCHITECTURES, MODEL_TRANSFORMS


def build_network(spec: Any, info: DatasetInfo, arch_params: Any = None) -> nn.Module:
    """One member (normalization included) for ``spec`` (a ModelSpec) on dataset ``info``.

    ``arch_params`` is the architecture's validated options dataclass (``entry.arch_params``); None
    means the architecture's defaults.
    """
    factory = ARCHITECTURES.get(spec.arch, field="model.arch")
    if arch_params is None:
        params_cls = ARCHITECTURES.params(spec.arch)
        if params_cls is not None:
            arch_params = parse_dataclass(params_cls, dict(spec.options), file="model spec", prefix="model.options")
    return factory(spec, info, arch_params)


def _transform(entry: Any) -> tuple[Any, Any] | tuple[None, None]:
    spec = entry.model
    if not spec.transform:
        return None, None
    file = getattr(entry, "source", "") or entry.name
    fn = MODEL_TRANSFORMS.get(spec.transform, file=file, field="model.transform")
    params_cls = MODEL_TRANSFORMS.params(spec.transform)
    if params_cls is not None:
        options = parse_dataclass(params_cls, dict(spec.transform_options), file=file,
                                  prefix="model.transform_options")
    else:
        options = dict(spec.transform_options)
    return fn, options


def _transform_context(fn: Any, entry: Any, info: DatasetInfo) -> dict[str, Any]:
    """Optional keywords for a transform that declares them (EIO's 'rgn' does):
    ``info`` and ``rebuild`` (a factory of a fresh plain member, so extra layers get the architecture's
    own init). Transforms taking only ``(net, options)`` are called as before."""
    import inspect

    ps = inspect.signature(fn).parameters
    offered = {"info": info, "rebuild": lambda: build_network(entry.model, info, entry.arch_params)}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in ps.values()):
        return offered
    return {k: v for k, v in offered.items() if k in ps}


def build_model(entry: Any, info: DatasetInfo) -> Ensemble:
    """The entry's model as an :class:`Ensemble` (also for one member).

    Members are built one after another under the caller's RNG state, so the seed set before this
    call fixes every member's initialization (DVERGE builds its members in a loop after
    ``torch.manual_seed(seed)`` the same way). ``model.transform`` (e.g. EIO's 'rgn') is applied to
    each member before wrapping.
    """
    fn, options = _transform(entry)
    members = []
    for _ in range(entry.model.members):
        net = build_network(entry.model, info, entry.arch_params)
        if fn is not None:
            net = fn(net, options, **_transform_context(fn, entry, info))
        members.append(net)
    return Ensemble(nn.ModuleList(members), combine=entry.model.combine)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of distinct parameter elements (shared tensors counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
