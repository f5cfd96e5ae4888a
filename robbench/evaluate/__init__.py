"""The evaluation engine (plan -> execute -> commit; :mod:`robbench.evaluate.engine`).

``robbench.evaluate`` is also the Python API's entry point: calling this package,
``robbench.evaluate(model, protocol="demo-whitebox", n=100, name="my_cnn")``, runs
:func:`robbench.api.evaluate`. (The package and the function share the name ``robbench.evaluate``; the
package is made callable so both spellings keep working whichever was imported first.)
"""
from __future__ import annotations

import sys
import types
from typing import Any


class _CallablePackage(types.ModuleType):
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        import importlib  # by name: robbench.api imports this package's engine

        return importlib.import_module("robbench.api").evaluate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
