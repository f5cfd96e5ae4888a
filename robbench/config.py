"""Typed, validated configuration: zoo entries (``zoo/*.toml``) and the generic machinery protocols use.

Files are parsed with :mod:`tomllib`, merged along ``extends`` chains (tables merge key by key, any
other value replaces), ``--set key=value`` overrides are applied, and the result is validated into
dataclasses. Every failure is a :class:`ConfigError` naming the file, the field and what is allowed.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

from robbench.errors import ConfigError
from robbench.paths import PROTOCOLS_DIR, ZOO_DIR

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
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"expected a string, got {value!r}", file=file, field=path)
        return value
    raise TypeError(f"unsupported config type {tp!r} at {path}")


def parse_dataclass(cls: type[D], data: dict[str, Any], *, file: str, prefix: str = "") -> D:
    """Validate ``data`` into dataclass ``cls``: unknown keys, types, ranges and registry names."""
    from robbench.registry import REGISTRIES

    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(f"unknown key; allowed here: {', '.join(sorted(fields))}", file=file, field=where)
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


# ----------------------------------------------------------------------------------------------
# Files, extends and overrides
# ----------------------------------------------------------------------------------------------

def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError("file not found", file=str(path)) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"not valid TOML ({e})", file=str(path)) from None


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Tables merge key by key; every other value (arrays included) replaces."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def resolve_path(spec: str, directory: Path, kind: str) -> Path:
    """``zoo/eio_resnet20``, ``eio_resnet20``, ``eio_resnet20.toml`` or a path to any TOML file."""
    p = Path(spec)
    for cand in (p, p.with_suffix(".toml") if p.suffix != ".toml" else p):
        if cand.is_file():
            return cand.resolve()
    name = p.name[:-5] if p.name.endswith(".toml") else p.name
    cand = directory / f"{name}.toml"
    if cand.is_file():
        return cand
    known = ", ".join(sorted(q.stem for q in directory.glob("*.toml")))
    raise ConfigError(f"no {kind} named {spec!r}; known: {known}", file=str(directory))


def load_raw(spec: str, directory: Path, kind: str, _chain: tuple[str, ...] = ()) -> tuple[dict[str, Any], Path]:
    """Read a TOML file and merge its ``extends`` chain (the parent is named like any entry)."""
    path = resolve_path(spec, directory, kind)
    key = str(path)
    if key in _chain:
        cycle = " -> ".join(Path(c).stem for c in (*_chain, key))
        raise ConfigError(f"extends cycle: {cycle}", file=str(path), field="extends")
    data = _read_toml(path)
    parent = data.pop("extends", None)
    if parent is not None:
        if not isinstance(parent, str):
            raise ConfigError("expected the name of another file", file=str(path), field="extends")
        base, _ = load_raw(parent, path.parent if (path.parent / f"{parent}.toml").exists() else directory,
                           kind, (*_chain, key))
        base.pop("name", None)
        base.pop("description", None)
        data = deep_merge(base, data)
        data.setdefault("_extends", parent)
    return data, path


def parse_override(text: str, file: str = "--set") -> tuple[list[str], Any]:
    """``train.epochs=3`` -> (['train', 'epochs'], 3). Values are TOML; bare words are strings."""
    if "=" not in text:
        raise ConfigError(f"expected key=value, got {text!r}", file=file)
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"bad key in {text!r}", file=file)
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    out = copy.deepcopy(data)
    for text in overrides:
        keys, value = parse_override(text)
        node = out
        for k in keys[:-1]:
            nxt = node.setdefault(k, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"{k} is not a table", file="--set", field=".".join(keys))
            node = nxt
        node[keys[-1]] = value
    return out


# ----------------------------------------------------------------------------------------------
# Zoo entries
# ----------------------------------------------------------------------------------------------

@dataclass
class ModelSpec:
    arch: str = opt(registry="architectures", help="architecture name")
    members: int = opt(1, min=1, max=64, help="ensemble size; 1 = a single model")
    combine: Literal["log_mean_softmax", "mean_logits", "vote"] = opt(
        "log_mean_softmax", help="ensemble output (DVERGE models/ensemble.py: log of mean softmax)")
    norm_layer: Literal["bn", "gn", "mbn"] = opt("bn", help="BatchNorm, GroupNorm(32) or mixture BN")
    activation: Literal["relu", "leaky_relu"] = opt("relu")
    leaky_slope: float = opt(0.1, min=0.0, max=1.0, help="GAL uses LeakyReLU(0.1)")
    normalization: str = opt("dataset", help="'dataset' (per-dataset mean/std), 'dverge', or 'none'")
    width: float = opt(1.0, min=0.01, max=16.0, help="channel multiplier (tiny demo models)")
    options: dict[str, Any] = opt({}, help="architecture-specific options")
    transform: str | None = opt(None, help="model transform, e.g. 'rgn' (Ensemble-in-One)")
    transform_options: dict[str, Any] = opt({})


@dataclass
class DataSpec:
    dataset: str = opt(registry="datasets")
    augment: Literal["default", "none", "crop_flip", "crop", "flip"] = opt(
        "default", help="'default' = the dataset's paper augmentation")
    batch_size: int = opt(128, min=1, max=65536)
    test_batch_size: int = opt(100, min=1, max=65536, help="DVERGE test loader: 100")
    root: str | None = opt(None, help="data directory (default: --data-root or ./data)")
    options: dict[str, Any] = opt({}, help="dataset-specific options")


@dataclass
class OptimizerSpec:
    name: Literal["sgd", "adam"] = "sgd"
    lr: float = opt(0.1, min=0.0)
    momentum: float = opt(0.9, min=0.0, max=1.0)
    weight_decay: float = opt(1e-4, min=0.0)
    nesterov: bool = False
    eps: float = opt(1e-8, min=0.0, help="Adam epsilon (ADP/GAL reference: 1e-7)")
    per_member: bool = opt(True, help="one optimizer per member (DVERGE baseline/dverge/advt) or one joint")


@dataclass
class ScheduleSpec:
    name: Literal["multistep", "cosine", "constant"] = "multistep"
    milestones: list[int] = opt([100, 150])
    gamma: float = opt(0.1, min=0.0, max=1.0)
    warmup_epochs: int = opt(0, min=0)


@dataclass
class TrainSpec:
    method: str = opt("baseline", registry="methods")
    epochs: int = opt(200, min=0, max=100000)
    seed: int = opt(0, min=0)
    init_from: str | None = opt(None, help="start from this entry's trained checkpoint")
    save_every_steps: int = opt(0, min=0, help="also checkpoint every K steps (0 = per epoch only)")
    optimizer: OptimizerSpec = field(default_factory=OptimizerSpec)
    schedule: ScheduleSpec = field(default_factory=ScheduleSpec)
    params: dict[str, Any] = opt({}, help="method options, validated by the method")


@dataclass
class ZooEntry:
    name: str
    model: ModelSpec
    data: DataSpec
    train: TrainSpec = field(default_factory=TrainSpec)
    description: str = ""
    paper: str = opt("", help="dverge | eio | eed | xie | demo")
    citation: str = opt("", help="where the values come from (paper section / reference code file)")
    tags: list[str] = opt([])
    _extends: str | None = field(default=None, repr=True)
    method_params: Any = field(default=None, repr=False, compare=False)
    arch_params: Any = field(default=None, repr=False, compare=False)
    source: str = field(default="", repr=False, compare=False)
    overrides: list[str] = field(default_factory=list, repr=False, compare=False)

    def resolved(self) -> dict[str, Any]:
        """The entry as resolved data (what the manifest records and the hash covers)."""
        d = to_dict(self)
        if self.method_params is not None:
            d["train"]["params"] = to_dict(self.method_params)
        return d

    def sha256(self) -> str:
        return config_hash(self.resolved())


def _validate_sub(params_cls: type | None, data: dict[str, Any], file: str, prefix: str, what: str) -> Any:
    if params_cls is None:
        if data:
            raise ConfigError(f"{what} takes no options; got {', '.join(sorted(data))}", file=file, field=prefix)
        return None
    return parse_dataclass(params_cls, data, file=file, prefix=prefix)


def _blame_override(err: ConfigError, overrides: list[str]) -> ConfigError:
    """Say which --set caused an error, so the user does not hunt for it in the file."""
    for text in overrides:
        key = text.split("=", 1)[0].strip()
        if err.field and (err.field == key or err.field.startswith(key + ".")):
            msg = str(err).split(f"{err.field}: ", 1)[-1]
            return ConfigError(msg, file=f"{err.file} (--set {text})", field=err.field)
    return err


def load_entry(spec: str, overrides: list[str] | None = None) -> ZooEntry:
    """Load, merge, override and validate a zoo entry (``zoo/NAME``, ``NAME`` or a path)."""
    from robbench.registry import ARCHITECTURES, METHODS

    raw, path = load_raw(spec, ZOO_DIR, "zoo entry")
    overrides = list(overrides or [])
    raw = apply_overrides(raw, overrides)
    file = str(path)
    raw.setdefault("name", path.stem)
    for table in ("model", "data"):
        if table not in raw:
            raise ConfigError("required table is missing", file=file, field=table)
    try:
        entry = parse_dataclass(ZooEntry, raw, file=file)
    except ConfigError as e:
        raise _blame_override(e, overrides) from None
    entry.source = file
    entry.overrides = overrides
    try:
        entry.method_params = _validate_sub(METHODS.params(entry.train.method), entry.train.params, file,
                                            "train.params", f"method {entry.train.method!r}")
        entry.arch_params = _validate_sub(ARCHITECTURES.params(entry.model.arch), entry.model.options, file,
                                          "model.options", f"architecture {entry.model.arch!r}")
        from robbench.data import validate_options

        validate_options(entry.data.dataset, entry.data.options, file=file)
    except ConfigError as e:
        raise _blame_override(e, overrides) from None
    return entry


def list_entries(directory: Path = ZOO_DIR) -> list[str]:
    return sorted(p.stem for p in directory.glob("*.toml"))


def list_protocols(directory: Path = PROTOCOLS_DIR) -> list[str]:
    return sorted(p.stem for p in directory.glob("*.toml"))
