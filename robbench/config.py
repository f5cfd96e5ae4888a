"""Typed, validated configuration: zoo entries (``zoo/*.toml``) and the generic machinery protocols use.

Files are parsed with :mod:`tomllib`, merged along ``extends`` chains (tables merge key by key, any
other value replaces), ``--set key=value`` overrides are applied, and the result is validated into
dataclasses. Every failure is a :class:`ConfigError` naming the file, the field and what is allowed.
"""
from __future__ import annotations

import copy
import difflib
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from robbench import zoo_family
from robbench.errors import ConfigError
from robbench.paths import PROJECT_ROOT, PROTOCOLS_DIR, ZOO_DIR
from robbench.registry import ARCHITECTURES, METHODS
from robbench.schema import config_hash, opt, parse_dataclass, parse_options, to_dict

# the option machinery lives in robbench.schema; these names are part of this module's interface
__all__ = ["ZOO_KIND", "ZooEntry", "apply_overrides", "blame_override", "check_conflicts", "config_hash", "deep_merge",
           "entry_exists", "list_entries", "list_protocols", "load_entry", "load_raw", "opt", "parse_dataclass",
           "parse_options", "parse_override", "resolve_entry", "resolve_path", "to_dict"]


# ----------------------------------------------------------------------------------------------
# Files, extends and overrides
# ----------------------------------------------------------------------------------------------

ZOO_KIND = "zoo entry"  # the ``kind`` under which load_raw also finds family members

def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError("file not found", file=str(path)) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"not valid TOML ({e})", file=str(path)) from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"not UTF-8 text (byte {e.start}: {e.reason}); TOML files must be UTF-8",
                          file=str(path)) from None
    except OSError as e:
        raise ConfigError(f"cannot read it ({e.strerror or type(e).__name__})", file=str(path)) from None


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Tables merge key by key; every other value (arrays included) replaces."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def resolve_path(spec: str, directory: Path, kind: str, *, file: str | None = None,
                 field: str | None = None) -> Path:
    """``zoo/eio_resnet20``, ``eio_resnet20``, ``eio_resnet20.toml`` or a path to any TOML file.
    ``file``/``field``: where the name was written (an ``extends``), named by the error instead of
    the folder searched."""
    p = Path(spec)
    for cand in (p, p.with_suffix(".toml") if p.suffix != ".toml" else p):
        if cand.is_file():
            return cand.resolve()
    name = p.name[:-5] if p.name.endswith(".toml") else p.name
    cand = directory / f"{name}.toml"
    if cand.is_file():
        return cand
    known = _known_names(directory, kind)
    close = difflib.get_close_matches(name, known, n=3)
    hint = f"did you mean {', '.join(close)}?" if close else f"known ({len(known)}): {', '.join(known[:12])}" + (
        ", ..." if len(known) > 12 else "")
    raise ConfigError(f"no {kind} named {spec!r}" + (f" in {directory}" if file else "") + f"; {hint}",
                      file=file or str(directory), field=field)


def _known_names(directory: Path, kind: str) -> list[str]:
    """The names an error lists as known: file entries, and for the zoo the derived ones too."""
    if kind != ZOO_KIND:
        return sorted(q.stem for q in directory.glob("*.toml"))
    try:
        return list_entries(directory)
    except ConfigError:  # a broken family file: its own error comes when it is used
        return sorted(q.stem for q in directory.glob("*.toml") if not zoo_family.is_family_file(q))


def _family_member(spec: str, directory: Path) -> tuple[zoo_family.Family, str] | None:
    """The family and member suffix that derive zoo entry ``spec``, or None when a file of that name
    exists (a file always wins) or no family derives it. ``dir/NAME`` looks in ``dir`` first."""
    p = Path(spec)
    if p.is_file() or p.with_suffix(".toml").is_file():
        return None
    name = p.name[:-5] if p.name.endswith(".toml") else p.name
    dirs = [p.parent] if p.parent != Path(".") and p.parent.is_dir() else []
    for d in (*dirs, directory):
        if (d / f"{name}.toml").is_file():
            return None
        hit = zoo_family.index(d).get(name)
        if hit is not None:
            return hit
    return None


def _derived_raw(fam: zoo_family.Family, suffix: str, kind: str,
                 _chain: tuple[str, ...]) -> tuple[dict[str, Any], Path]:
    """A family member: its source entry (a copy's: the one it copies) merged as any file entry, the
    references between members renamed into the derived chain (a copy's own group's into the copy's),
    then the family's overrides (the ``--set`` code), in that order."""
    source = f"{fam.source}_{fam.source_suffix(suffix)}"
    base, _ = load_raw(source, fam.file.parent, kind, _chain)
    data = zoo_family.rename_refs(base, fam.rename(suffix))
    name = f"{fam.target}_{suffix}"
    data["name"] = name
    data["description"] = fam.describe(str(data.get("description", "")), suffix)
    if fam.tags or fam.tags_drop:
        tags = data.get("tags", [])
        data["tags"] = fam.retag(tags if isinstance(tags, list) else [tags])
    for key, value in fam.overrides_of(suffix):
        _set_key(data, key.split("."), value, file=str(fam.file), text=key)
    try:
        shown = str(fam.file.resolve().relative_to(PROJECT_ROOT))
    except ValueError:
        shown = str(fam.file.resolve())
    data["_family"] = {"file": shown, "sha256": fam.sha256, "from_entry": source}
    return data, fam.file


def load_raw(spec: str, directory: Path, kind: str, _chain: tuple[str, ...] = ()) -> tuple[dict[str, Any], Path]:
    """Read a TOML file and merge its ``extends`` chain (the parent is named like any entry). A zoo
    entry no file holds may be a family member (``zoo/*.family.toml``, :mod:`robbench.zoo_family`)."""
    if kind == ZOO_KIND:
        hit = _family_member(spec, directory)
        if hit is not None:
            return _derived_raw(*hit, kind, _chain)
    path = resolve_path(spec, directory, kind)
    if kind == ZOO_KIND and zoo_family.is_family_file(path):
        members = sorted(n for n, (f, _) in zoo_family.index(path.parent).items() if f.file == path)
        raise ConfigError(f"a family file derives entries, it is not one; name one of: {', '.join(members)}",
                          file=str(path))
    key = str(path)
    if key in _chain:
        cycle = " -> ".join(Path(c).stem for c in (*_chain, key))
        raise ConfigError(f"extends cycle: {cycle}", file=str(path), field="extends")
    data = _read_toml(path)
    parent = data.pop("extends", None)
    if parent is not None:
        if not isinstance(parent, str):
            raise ConfigError("expected the name of another file", file=str(path), field="extends")
        where = path.parent if (path.parent / f"{parent}.toml").exists() else directory
        if kind != ZOO_KIND or _family_member(parent, where) is None:
            resolve_path(parent, where, kind, file=str(path), field="extends")  # a missing parent names this file
        base, _ = load_raw(parent, where, kind, (*_chain, key))
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


def _select(items: list[Any], k: str, keys: list[str], file: str = "--set") -> Any:
    """The table of an array of tables that ``k`` names: by its ``id`` (``attacks.pgd-ce``) or index."""
    for item in items:
        if isinstance(item, dict) and item.get("id") == k:
            return item
    if k.isdigit() and int(k) < len(items) and isinstance(items[int(k)], dict):
        return items[int(k)]
    ids = [str(i.get("id")) for i in items if isinstance(i, dict) and "id" in i]
    allowed = f"ids {', '.join(ids)}" if ids else f"indices 0..{len(items) - 1}"
    raise ConfigError(f"no table {k!r} here; allowed: {allowed}", file=file, field=".".join(keys))


def _set_key(out: dict[str, Any], keys: list[str], value: Any, *, file: str, text: str) -> None:
    """Set one dotted key in place (an override's one step); errors name ``file`` and the key."""
    if not keys or any(not k for k in keys):
        raise ConfigError(f"bad key in {text!r}", file=file)
    node: Any = out
    for i, k in enumerate(keys[:-1]):
        if isinstance(node, list):
            node = _select(node, k, keys, file)
            continue
        nxt = node.setdefault(k, {})
        if not isinstance(nxt, (dict, list)) or (isinstance(nxt, list) and not nxt):
            raise ConfigError(f"{'.'.join(keys[:i + 1])} is not a table", file=file, field=".".join(keys))
        node = nxt
    if isinstance(node, list):
        raise ConfigError("is an array of tables; name one of them and a field (e.g. "
                          f"{'.'.join(keys)}.<id>.<field>)", file=file, field=".".join(keys))
    node[keys[-1]] = copy.deepcopy(value)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``--set key=value`` overrides. A key may go into an array of tables by the table's ``id``
    or its index: ``attacks.pgd-ce.params.steps=20`` (or ``attacks.0.params.steps=20``)."""
    out = copy.deepcopy(data)
    for text in overrides:
        keys, value = parse_override(text)
        _set_key(out, keys, value, file="--set", text=text)
    return out


def check_conflicts(overrides: list[str], labels: dict[str, str] | None = None) -> None:
    """Refuse a flag (``--n 30``) and another override that set one field (or a field and the table
    holding it) to different values: which one wins would be an accident of order. ``labels`` maps an
    override to the flag it came from (``samples.n=30`` -> ``--n 30``); plain overrides may be layered
    (later ones win, as a list built in code expects)."""
    labels = labels or {}
    seen: list[tuple[list[str], Any, str]] = []
    for text in overrides:
        keys, value = parse_override(text)
        for other_keys, other_value, other in seen:
            n = min(len(keys), len(other_keys))
            flagged = any(x in labels and not labels[x].startswith("--set ") for x in (text, other))
            if flagged and keys[:n] == other_keys[:n] and (len(keys) != len(other_keys) or value != other_value):
                a, b = labels.get(other, f"--set {other}"), labels.get(text, f"--set {text}")
                raise ConfigError(f"conflicting overrides: '{a}' and '{b}' both set {'.'.join(keys[:n])}; "
                                  "give one of them", reason="conflict")
        seen.append((keys, value, text))


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
    name: Literal["sgd", "adam", "rmsprop"] = "sgd"
    lr: float = opt(0.1, min=0.0)
    momentum: float = opt(0.9, min=0.0, max=1.0)
    weight_decay: float = opt(1e-4, min=0.0)
    nesterov: bool = False
    eps: float = opt(1e-8, min=0.0, help="Adam / RMSProp epsilon (ADP/GAL reference: 1e-7)")
    alpha: float = opt(0.99, min=0.0, max=1.0, help="RMSProp: decay of the squared-gradient average")
    per_member: bool = opt(True, help="one optimizer per member (DVERGE baseline/dverge/advt) or one joint")


@dataclass
class ScheduleSpec:
    name: Literal["multistep", "cosine", "constant", "exponential"] = "multistep"
    milestones: list[int] = opt([100, 150])
    gamma: float = opt(0.1, min=0.0, max=1.0)
    every: int = opt(1, min=1, help="exponential: multiply by gamma every this many epochs (staircase)")
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
    # set for a family member: {file, sha256 of the family file, from_entry}; absent from file entries'
    # resolved form, so their hashes (and the runs made from them) are unchanged by its existence
    _family: dict[str, str] | None = field(default=None, repr=True)
    method_params: Any = field(default=None, repr=False, compare=False)
    arch_params: Any = field(default=None, repr=False, compare=False)
    source: str = field(default="", repr=False, compare=False)
    overrides: list[str] = field(default_factory=list, repr=False, compare=False)

    def resolved(self) -> dict[str, Any]:
        """The entry as resolved data (what the manifest records and the hash covers)."""
        d = to_dict(self)
        if d.get("_family") is None:
            d.pop("_family", None)
        if self.method_params is not None:
            d["train"]["params"] = to_dict(self.method_params)
        return d

    def sha256(self) -> str:
        return config_hash(self.resolved())


def blame_override(err: ConfigError, overrides: list[str], labels: dict[str, str] | None = None) -> ConfigError:
    """Say which --set caused an error, so the user does not hunt for it in the file. ``labels``: the
    flag an override came from (``{"samples.n=0": "--n 0"}``): such an error names the flag alone."""
    labels = labels or {}
    for text in reversed(overrides):  # the last override of a field is the one in effect
        key = text.split("=", 1)[0].strip()
        if err.field and (err.field == key or err.field.startswith(key + ".") or err.field.startswith(key + "[")):
            if text in labels:
                return ConfigError(err.detail, file=labels[text], field=err.field, reason=err.reason)
            where = f"--set {text}" if err.file in (None, "--set") else f"{err.file} (--set {text})"
            return ConfigError(err.detail, file=where, field=err.field, reason=err.reason)
    return err


def resolve_entry(raw: dict[str, Any], file: str, overrides: list[str] | None = None, prefix: str = "",
                  labels: dict[str, str] | None = None) -> ZooEntry:
    """Merged zoo-entry data -> the fully typed :class:`ZooEntry`: the entry, its method's and its
    architecture's options, its dataset's options. The one resolver of zoo entries, from ``zoo/`` files
    (:func:`load_entry`) and from run manifests (``robbench.checkpoint.entry_from_manifest``, ``prefix``
    = where the entry sits in that file); errors an override caused name the ``--set``."""
    from robbench.data import validate_options  # here: the datasets bring torch; `zoo list` needs none

    overrides = list(overrides or [])
    at = (lambda f: f"{prefix}.{f}") if prefix else (lambda f: f)
    try:
        for table in ("model", "data"):
            if table not in raw:
                raise ConfigError("required table is missing", file=file, field=at(table))
        entry = parse_dataclass(ZooEntry, raw, file=file, prefix=prefix)
        entry.source = file
        entry.overrides = overrides
        entry.method_params = parse_options(METHODS.params(entry.train.method), entry.train.params, file=file,
                                            prefix=at("train.params"), what=f"method {entry.train.method!r}")
        entry.arch_params = parse_options(ARCHITECTURES.params(entry.model.arch), entry.model.options, file=file,
                                          prefix=at("model.options"), what=f"architecture {entry.model.arch!r}")
        validate_options(entry.data.dataset, entry.data.options, file=file)
    except ConfigError as e:
        raise blame_override(e, overrides, labels) from None
    return entry


def load_entry(spec: str, overrides: list[str] | None = None, labels: dict[str, str] | None = None) -> ZooEntry:
    """Load, merge, override and validate a zoo entry (``zoo/NAME``, ``NAME`` or a path). ``labels``:
    overrides that came from a flag (``{"train.epochs=3": "--epochs 3"}``), named by errors."""
    raw, path = load_raw(spec, ZOO_DIR, ZOO_KIND)
    overrides = list(overrides or [])
    check_conflicts(overrides, labels)
    raw = apply_overrides(raw, overrides)
    raw.setdefault("name", path.stem)
    return resolve_entry(raw, str(path), overrides, labels=labels)


def list_entries(directory: Path = ZOO_DIR) -> list[str]:
    """Every zoo entry: the file entries and the members the family files derive."""
    files = [p.stem for p in directory.glob("*.toml") if not zoo_family.is_family_file(p)]
    return sorted([*files, *zoo_family.index(directory)])


def entry_exists(name: str, directory: Path = ZOO_DIR) -> bool:
    """A zoo entry of this name, in a file or derived by a family."""
    return (directory / f"{name}.toml").is_file() or _family_member(name, directory) is not None


def list_protocols(directory: Path = PROTOCOLS_DIR) -> list[str]:
    return sorted(p.stem for p in directory.glob("*.toml"))
