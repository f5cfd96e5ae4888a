"""Validation of plain data (parsed TOML) into option dataclasses: the leaf every part's options use.

``opt(default, min=, max=, registry=, help=)`` declares a field; ``parse_dataclass(cls, data, file=,
prefix=)`` checks unknown keys, types, ranges and registry names and calls the dataclass's own
``validate(file)``; every failure is a :class:`~robbench.errors.ConfigError` naming the file and field.
:mod:`robbench.config` (files, ``extends``, ``--set``) is built on this; it imports nothing of robbench
but the errors and the registry, so parts (datasets, attacks, methods) can use it without cycles.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
import math
import types
import typing
from dataclasses import field
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

from robbench.errors import ConfigError
from robbench.registry import REGISTRIES

D = TypeVar("D")


# ----------------------------------------------------------------------------------------------
# Generic validation of a dict into a dataclass
# ----------------------------------------------------------------------------------------------

def opt(default: Any = dataclasses.MISSING, *, min: float | None = None, max: float | None = None,
        registry: str | None = None, help: str = "", **kw: Any) -> Any:
    """A dataclass field with validation metadata (range, registry name) and a help string."""
    md = {"min": min, "max": max, "registry": registry, "help": help}
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda d=default: copy.deepcopy(d), metadata=md, **kw)
    return field(default=default, metadata=md, **kw)


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin is list:
        (inner,) = get_args(tp) or (Any,)
        return f"list of {_type_name(inner)}"
    if origin is dict:
        return "table"
    if dataclasses.is_dataclass(tp):
        return "table"
    if tp is type(None):
        return "nothing"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, file: str, path: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a, file, path)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(f"expected {_type_name(tp)}, got {value!r}", file=file, field=path)
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"got {value!r}; allowed: {_type_name(tp)}", file=file, field=path)
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"expected {_type_name(tp)}, got {value!r}", file=file, field=path)
        (inner,) = get_args(tp) or (Any,)
        return [_convert(v, inner, file, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"expected a table, got {value!r}", file=file, field=path)
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"expected a table, got {value!r}", file=file, field=path)
        return parse_dataclass(tp, value, file=file, prefix=path)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"expected true or false, got {value!r}", file=file, field=path)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"expected an integer, got {value!r}", file=file, field=path)
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"expected a number, got {value!r}", file=file, field=path)
        if not math.isfinite(value):  # nan passes every range check; inf is no budget, rate or size
            raise ConfigError(f"expected a finite number, got {value!r}", file=file, field=path)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"expected a string, got {value!r}", file=file, field=path)
        return value
    raise TypeError(f"unsupported config type {tp!r} at {path}")


def _internal(f: dataclasses.Field[Any]) -> bool:
    """Fields the code fills, not the user: ``_extends`` (set from ``extends``), and fields kept out of
    the resolved form (``repr=False``: parsed options, the source file, the overrides)."""
    return f.name.startswith("_") or not f.repr


@functools.lru_cache(maxsize=None)
def _type_hints(cls: type) -> dict[str, Any]:
    """A dataclass's resolved annotations (resolving them is most of the cost of validating an entry, and
    listing the zoo validates every one)."""
    return typing.get_type_hints(cls)


def parse_dataclass(cls: type[D], data: dict[str, Any], *, file: str, prefix: str = "") -> D:
    """Validate ``data`` into dataclass ``cls``: unknown keys, types, ranges and registry names."""
    hints = _type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    settable = {n: f for n, f in fields.items() if f.repr}  # internal repr=False fields are never read from data
    unknown = sorted(set(data) - set(settable))
    if unknown:
        where = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        allowed = sorted(n for n, f in settable.items() if not _internal(f))
        raise ConfigError(f"unknown key; allowed here: {', '.join(allowed)}", file=file, field=where)
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        path = f"{prefix}.{name}" if prefix else name
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"required ({_type_name(hints[name])})", file=file, field=path)
            continue
        value = _convert(data[name], hints[name], file, path)
        md = f.metadata
        nums = value if isinstance(value, list) else [value]
        for v in nums:
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                lo, hi = md.get("min"), md.get("max")
                if (lo is not None and v < lo) or (hi is not None and v > hi):
                    rng = f"[{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]"
                    raise ConfigError(f"{v!r} is out of range; allowed: {rng}", file=file, field=path)
        reg = md.get("registry")
        if reg and value is not None:
            for v in (value if isinstance(value, list) else [value]):
                REGISTRIES[reg].get(v, file=file, field=path)
        kwargs[name] = value
    obj = cls(**kwargs)
    post = getattr(obj, "validate", None)
    if callable(post):
        post(file)
    return obj


def parse_options(cls: type | None, data: dict[str, Any], *, file: str, prefix: str, what: str) -> Any:
    """A part's options table validated by its options dataclass (``cls`` None: the part takes none)."""
    if cls is None:
        if data:
            raise ConfigError(f"{what} takes no options; got {', '.join(sorted(data))}", file=file, field=prefix)
        return None
    return parse_dataclass(cls, data, file=file, prefix=prefix)


def to_dict(obj: Any) -> Any:
    """A dataclass as plain JSON-able data (paths become strings)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.repr}
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def config_hash(obj: Any) -> str:
    """sha256 of the canonical JSON form of a config (dataclass or dict)."""
    blob = json.dumps(to_dict(obj), sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()
