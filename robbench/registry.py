"""Decorator-based registries of named parts: architectures, datasets, methods, attacks, ...

A part is registered once under a unique name; looking up an unknown name is a user error that
lists what is allowed.
"""
from __future__ import annotations

from typing import Any, Callable, Generic, Iterator, TypeVar

from robbench.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        self._params: dict[str, type | None] = {}
        self._capabilities: dict[str, Callable[[Any], Any] | None] = {}
        # "<scheme>:<rest>" names resolved on first use (a user's model factory named as data,
        # "python:pkg.mod:Factory"); the resolver returns (obj, params) and raises a ConfigError itself
        self._resolvers: dict[str, Callable[[str], tuple[T, type | None]]] = {}

    def add_resolver(self, scheme: str, resolver: Callable[[str], tuple[T, type | None]]) -> None:
        """Names ``<scheme>:...`` are looked up by ``resolver(name) -> (obj, params dataclass or None)``
        (cached per name). The resolver raises a ConfigError naming what is wrong."""
        if scheme in self._resolvers:
            raise ValueError(f"duplicate {self.kind} scheme {scheme!r}")
        self._resolvers[scheme] = resolver

    def _resolve(self, name: str) -> bool:
        scheme = name.split(":", 1)[0] if ":" in name else None
        if scheme is None or scheme not in self._resolvers:
            return False
        obj, params = self._resolvers[scheme](name)
        self._items[name] = obj
        self._params[name] = params
        self._capabilities[name] = None
        return True

    def forget(self, name: str) -> None:
        """Drop a resolved ``<scheme>:`` name so the next lookup resolves it again (its code changed)."""
        if ":" in name:
            for d in (self._items, self._params, self._capabilities):
                d.pop(name, None)

    def register(self, name: str, *, params: type | None = None,
                 capabilities: Callable[[Any], Any] | None = None) -> Callable[[T], T]:
        """Register ``obj`` under ``name``; ``params`` is an optional dataclass describing its options;
        ``capabilities`` maps those options to what the part supports (attacks:
        :class:`robbench.attacks.capabilities.Capabilities`)."""

        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"duplicate {self.kind} name {name!r}")
            self._items[name] = obj
            self._params[name] = params
            self._capabilities[name] = capabilities
            return obj

        return deco

    def capabilities(self, name: str, options: Any) -> Any:
        """What part ``name`` declares it supports with ``options`` (None when it declares nothing)."""
        self.get(name)
        fn = self._capabilities[name]
        return fn(options) if fn is not None else None

    def get(self, name: str, *, file: str | None = None, field: str | None = None) -> T:
        _ensure_loaded()
        if name not in self._items and not self._resolve(name):
            schemes = "".join(f", {s}:..." for s in sorted(self._resolvers))
            raise ConfigError(
                f"unknown {self.kind} {name!r}; allowed: {', '.join(sorted(n for n in self._items if ':' not in n))}"
                f"{schemes}",
                file=file, field=field,
            )
        return self._items[name]

    def params(self, name: str) -> type | None:
        self.get(name)
        return self._params[name]

    def names(self) -> list[str]:
        _ensure_loaded()
        return sorted(n for n in self._items if ":" not in n)

    def __contains__(self, name: object) -> bool:
        _ensure_loaded()
        return name in self._items or (isinstance(name, str) and ":" in name
                                       and name.split(":", 1)[0] in self._resolvers)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


ARCHITECTURES: Registry[Callable[..., Any]] = Registry("architecture")
DATASETS: Registry[Callable[..., Any]] = Registry("dataset")
METHODS: Registry[Any] = Registry("method")
ATTACKS: Registry[Callable[..., Any]] = Registry("attack")
AGGREGATIONS: Registry[Callable[..., Any]] = Registry("aggregation")
MODEL_TRANSFORMS: Registry[Callable[..., Any]] = Registry("model transform")

REGISTRIES: dict[str, Registry[Any]] = {
    "architectures": ARCHITECTURES,
    "datasets": DATASETS,
    "methods": METHODS,
    "attacks": ATTACKS,
    "aggregations": AGGREGATIONS,
    "model_transforms": MODEL_TRANSFORMS,
}

# Modules whose import registers parts. Imported lazily so `robbench --help` stays fast.
_PART_MODULES = (
    "robbench.models",
    "robbench.data",
    "robbench.attacks",
    "robbench.train.methods",
    "robbench.evaluate.aggregations",
    "robbench.eio",
)
_loaded = False


def _ensure_loaded() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    import importlib

    for mod in _PART_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:  # a part package not written yet
            if e.name != mod and not mod.startswith(str(e.name)):
                raise
