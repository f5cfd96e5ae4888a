"""robbench: robustness benchmark and leaderboard toolkit for image classifiers.

Python API (:mod:`robbench.api`): ``robbench.evaluate(model, protocol=..., n=..., name=...)``,
``robbench.load_model(name)``, ``robbench.attack(name, **options)``, ``robbench.leaderboard(protocol)``.
Imported on first use, so ``import robbench`` (and the command line) stays fast.
"""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["__version__", "attack", "evaluate", "leaderboard", "load_model"]


def __getattr__(name: str) -> Any:
    import importlib  # by name: the API imports the whole package, which reads __version__ from here

    if name == "evaluate":  # the callable package robbench/evaluate (calls robbench.api.evaluate)
        return importlib.import_module("robbench.evaluate")
    if name in ("attack", "leaderboard", "load_model"):
        return getattr(importlib.import_module("robbench.api"), name)
    raise AttributeError(f"module 'robbench' has no attribute {name!r}")
