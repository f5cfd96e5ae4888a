"""A model from the user's own code, named as data: the one place such a name is resolved.

``model.arch`` in a zoo entry may name a factory (a class or function returning an ``nn.Module``):

- ``python:my_pkg.models:SmallCNN``: an importable module (on ``sys.path`` / ``PYTHONPATH``);
- ``file:models/cnn.py:SmallCNN``: a Python file, relative to the zoo file that names it (stored
  absolute in the run's manifest);
- ``memory:NAME``: a module object handed to :func:`robbench.evaluate` in this Python process
  (copied per build; other processes cannot rebuild it).

The factory's keyword options (``model.options``) are validated against its signature, so a misspelt
option is one line naming the allowed ones. The factory's source file is hashed
(:func:`source_sha256`); an imported run records the hash and loading checks it.
Contract: the model takes inputs in [0, 1] (NCHW float32, normalisation inside the model) and returns
logits (or log-probabilities), never probabilities.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import importlib
import importlib.util
import inspect
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from torch import nn

from robbench.errors import ConfigError
from robbench.registry import ARCHITECTURES

SCHEMES = ("python", "file", "memory")
_LIVE: dict[str, nn.Module] = {}  # memory:NAME -> the module handed over in this process


@dataclass(frozen=True)
class FactoryRef:
    """A parsed factory name: ``scheme``, ``target`` (module name, absolute file path or memory name),
    ``attr`` (the factory's qualified name in the module; empty for ``memory:``)."""

    scheme: str
    target: str
    attr: str = ""

    @property
    def text(self) -> str:
        return f"memory:{self.target}" if self.scheme == "memory" else f"{self.scheme}:{self.target}:{self.attr}"


def is_factory_name(name: str) -> bool:
    return isinstance(name, str) and name.split(":", 1)[0] in SCHEMES and ":" in name


def parse_factory(name: str, *, base_dir: str | Path | None = None, file: str | None = None,
                  field: str = "model.arch") -> FactoryRef:
    """``python:mod:Attr`` / ``file:path.py:Attr`` / ``memory:NAME`` -> :class:`FactoryRef`; a relative
    file path is taken relative to ``base_dir`` (the zoo file's folder) and made absolute."""
    scheme, _, rest = name.partition(":")
    allowed = "python:<module>:<factory>, file:<path.py>:<factory> or memory:<name>"
    if scheme not in SCHEMES or not rest:
        raise ConfigError(f"got {name!r}; a model factory is named {allowed}", file=file, field=field)
    if scheme == "memory":
        return FactoryRef("memory", rest)
    target, sep, attr = rest.rpartition(":")
    if not sep or not target or not attr:
        raise ConfigError(f"got {name!r}; expected {scheme}:<{'module' if scheme == 'python' else 'path.py'}>:"
                          "<factory> (the factory after the last ':')", file=file, field=field)
    if not all(part.isidentifier() for part in attr.split(".")):
        raise ConfigError(f"{attr!r} is not a Python name", file=file, field=field)
    if scheme == "python":
        if not all(part.isidentifier() for part in target.split(".")):
            raise ConfigError(f"{target!r} is not a module name (dotted Python names)", file=file, field=field)
        return FactoryRef("python", target, attr)
    path = Path(target).expanduser()
    if not path.is_absolute():
        path = Path(base_dir or ".") / path
    return FactoryRef("file", str(path.resolve()), attr)


def source_file(ref: FactoryRef, *, file: str | None = None, field: str = "model.arch") -> Path | None:
    """The file the factory's code comes from (None for ``memory:``)."""
    if ref.scheme == "memory":
        return None
    if ref.scheme == "file":
        p = Path(ref.target)
        if not p.is_file():
            raise ConfigError(f"model source {p} not found", file=file, field=field)
        return p
    try:
        spec = importlib.util.find_spec(ref.target)
    except (ImportError, ValueError) as e:
        raise ConfigError(f"cannot find module {ref.target!r} ({e}); is its folder on PYTHONPATH?", file=file,
                          field=field) from None
    if spec is None or not spec.origin or not Path(spec.origin).is_file():
        raise ConfigError(f"no module named {ref.target!r} (searched sys.path; add its folder to PYTHONPATH)",
                          file=file, field=field)
    return Path(spec.origin)


def source_sha256(ref: FactoryRef, *, file: str | None = None) -> str | None:
    """sha256 of the factory's source file (None for ``memory:`` models: their code is not a file)."""
    p = source_file(ref, file=file)
    return None if p is None else hashlib.sha256(p.read_bytes()).hexdigest()


def _import(ref: FactoryRef, file: str | None, field: str) -> Any:
    if ref.scheme == "python":
        source_file(ref, file=file, field=field)  # one clear line when the module is not there
        try:
            return importlib.import_module(ref.target)
        except Exception as e:  # the user's code failing on import is the user's mistake to fix
            raise ConfigError(f"importing {ref.target!r} failed: {type(e).__name__}: {e}", file=file,
                              field=field) from None
    path = source_file(ref, file=file, field=field)
    assert path is not None
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    mod_name = f"robbench_user_{path.stem}_{digest}"  # a new name when the file changes
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    spec = importlib.util.spec_from_file_location(mod_name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"{path} is not a Python source file", file=file, field=field)
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[mod_name]
        raise ConfigError(f"importing {path} failed: {type(e).__name__}: {e}", file=file, field=field) from None
    return module


def load_factory(ref: FactoryRef, *, file: str | None = None, field: str = "model.arch") -> Callable[..., Any]:
    """The factory object itself (imports the module or executes the file once per content)."""
    if ref.scheme == "memory":
        if ref.target not in _LIVE:
            raise ConfigError(f"memory:{ref.target} is a model handed to robbench.evaluate in another Python "
                              "process; evaluate it from Python, or add it with a python:/file: factory "
                              "(robbench add)", file=file, field=field, reason="checkpoint-missing")
        live = _LIVE[ref.target]
        # a copy on the CPU, as every factory builds; the caller moves it to its device
        return lambda: copy.deepcopy(live).to("cpu")
    module = _import(ref, file, field)
    obj: Any = module
    for part in ref.attr.split("."):
        if not hasattr(obj, part):
            names = sorted(n for n, v in vars(module).items() if not n.startswith("_")
                           and (inspect.isclass(v) or inspect.isfunction(v)) and getattr(v, "__module__", None) == module.__name__)
            raise ConfigError(f"{ref.target} has no {ref.attr!r}; it defines: {', '.join(names) or 'nothing callable'}",
                              file=file, field=field)
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"{ref.attr!r} in {ref.target} is not callable (expected a class or function "
                          "returning an nn.Module)", file=file, field=field)
    return obj


def options_class(factory: Callable[..., Any], ref: FactoryRef) -> type | None:
    """A dataclass of the factory's keyword options (from its signature; defaults kept), so
    ``model.options`` is validated like any architecture's. None when it takes no options."""
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):
        return None
    fields = []
    for p in sig.parameters.values():
        if p.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD,
                      inspect.Parameter.POSITIONAL_ONLY):
            continue
        default = dataclasses.field() if p.default is inspect.Parameter.empty else dataclasses.field(
            default_factory=lambda d=p.default: copy.deepcopy(d))
        fields.append((p.name, Any, default))
    if not fields:
        return None
    # required fields first, as dataclasses demand
    fields.sort(key=lambda f: f[2].default_factory is not dataclasses.MISSING)
    safe = "".join(c if c.isalnum() else "_" for c in ref.attr)
    return dataclasses.make_dataclass(f"{safe}Options", fields)


def build_user_model(factory: Callable[..., Any], options: dict[str, Any], *, name: str,
                     file: str | None = None) -> nn.Module:
    """Call the factory with its options; the result must be an ``nn.Module``."""
    try:
        model = factory(**options)
    except TypeError as e:
        raise ConfigError(f"calling {name} failed: {e}", file=file, field="model.options") from None
    except Exception as e:
        raise ConfigError(f"calling {name} failed: {type(e).__name__}: {e}", file=file, field="model.arch") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{name} returned {type(model).__name__}, not a torch.nn.Module", file=file,
                          field="model.arch")
    return model


def register_live(name: str, model: nn.Module) -> FactoryRef:
    """Hand a module object over as ``memory:NAME`` for this process (see :func:`robbench.evaluate`)."""
    _LIVE[name] = model
    ref = FactoryRef("memory", name)
    ARCHITECTURES.forget(ref.text)
    return ref


def _resolve(name: str) -> tuple[Callable[..., nn.Module], type | None]:
    """The architecture registry's resolver for factory names: (build fn, options dataclass)."""
    ref = parse_factory(name)
    factory = load_factory(ref)
    params = options_class(factory, ref)

    def build(spec: Any, info: Any, arch_params: Any) -> nn.Module:
        options = dataclasses.asdict(arch_params) if arch_params is not None else {}
        return build_user_model(factory, options, name=name)

    return build, params


for _scheme in SCHEMES:
    ARCHITECTURES.add_resolver(_scheme, _resolve)
