"""Skip Gradient Method (SGM, Wu et al. ICLR 2020) as an explicit residual-branch gradient scale.

robbench residual blocks compute ``grad_scale(residual, self.sgm_gamma) + shortcut``
(``robbench.models.layers.grad_scale``: identity forward, gradient x gamma backward).
:func:`skip_gradient` sets ``sgm_gamma`` on those blocks for the duration of an attack.

Relation to the reference (csdongxian/skip-connections-matter ``utils_sgm.py``): there, a legacy backward
hook on every ``nn.ReLU`` named ``*relu*`` but not ``*0.relu*`` multiplies its input gradient by gamma.
A BasicBlock reuses one ``self.relu`` after conv1 and after the addition, so the hooks give the
residual branch gamma^2 and the skip gamma: relative decay gamma. A Bottleneck reuses it three times
and the reference passes sqrt(gamma): residual gamma^(3/2), skip gamma^(1/2): relative decay gamma again.
The remaining factors (stem ReLU, the skip's gamma, the per-block division by the batch-global gradient
std of ``backward_hook_norm``) are one positive scalar for the whole batch, so the input gradient is
the reference's divided by that scalar: sign steps and normalised gradients are identical
(tests/test_attacks_sgm.py checks this on BasicBlock and Bottleneck nets).
Hence the explicit op uses gamma itself on *both* block types; ``sqrt(gamma)`` belongs to the hook
formulation only (its ReLU count), applying it to the explicit op would give decay sqrt(gamma).

Which blocks: ``blocks='all'`` (every residual block; SGM paper Eq. 8 decays every residual module) or
``blocks='reference'`` (the reference's name rule: blocks whose name ends in '0' are not scaled -- the
first block of every stage, whose shortcut is a projection, and by the substring bug also blocks 10,
20, 30 of deep stages).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Literal

from torch import nn

from robbench.errors import ConfigError

BlockRule = Literal["all", "reference"] | Callable[[str], bool]


def _selects(rule: BlockRule, name: str) -> bool:
    if rule == "all":
        return True
    if rule == "reference":
        # utils_sgm.py hooks f"{block}.relu" unless '0.relu' is a substring, i.e. unless the block's
        # name ends with '0'
        return not name.endswith("0")
    if callable(rule):
        return bool(rule(name))
    raise ConfigError(f"unknown SGM block rule {rule!r}; allowed: all, reference", field="sgm_blocks")


def sgm_blocks(model: nn.Module, rule: BlockRule = "all") -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs whose ``sgm_gamma`` SGM sets."""
    return [(n, m) for n, m in model.named_modules() if hasattr(m, "sgm_gamma") and _selects(rule, n)]


@contextlib.contextmanager
def skip_gradient(model: nn.Module, gamma: float, *, blocks: BlockRule = "all") -> Iterator[nn.Module]:
    """Scale the gradient through every selected residual branch by ``gamma`` (DVERGE: 0.2) inside
    the ``with`` block; restores each block's previous value on exit (also on error).

    Raises :class:`ConfigError` for a model without residual blocks (SGM needs skip connections).
    """
    if not 0.0 < gamma <= 1.0:
        raise ConfigError(f"sgm_gamma must be in (0, 1], got {gamma}", field="sgm_gamma")
    targets = sgm_blocks(model, blocks)
    if not targets:
        raise ConfigError(f"SGM needs residual blocks with 'sgm_gamma'; {type(model).__name__} has none",
                          field="sgm_gamma")
    saved = [(m, m.sgm_gamma) for _, m in targets]
    try:
        for _, m in targets:
            m.sgm_gamma = float(gamma)
        yield model
    finally:
        for m, g in saved:
            m.sgm_gamma = g
