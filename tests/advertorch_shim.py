"""Import this before ``advertorch`` (tests only): advertorch 0.2.3 imports
``torch.autograd.gradcheck.zero_gradients``, which torch removed. Fetch the real submodule
(``import torch.autograd.gradcheck as m`` binds the *function*) and add the helper back.
From notes/environment-measurements.md §1a."""
from __future__ import annotations

import collections.abc
import importlib

import torch

_gc = importlib.import_module("torch.autograd.gradcheck")


def zero_gradients(x: object) -> None:
    if isinstance(x, torch.Tensor):
        if x.grad is not None:
            x.grad.detach_()
            x.grad.zero_()
    elif isinstance(x, collections.abc.Iterable):
        for e in x:
            zero_gradients(e)


if not hasattr(_gc, "zero_gradients"):
    _gc.zero_gradients = zero_gradients  # type: ignore[attr-defined]
