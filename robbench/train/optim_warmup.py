"""Step-based linear learning-rate warm-up ("ImageNet in 1 Hour", Goyal et al. 2017, §2.2), as
ImageNet-Adversarial-Training ``main.py`` sets it up for Xie & Yuille's runs:

    BASE_LR = 0.1 * (total_batch // 256)
    if BASE_LR > 0.1:
        ScheduledHyperParamSetter('learning_rate', [(0, 0.1), (5 * steps_per_epoch, BASE_LR)],
                                  interp='linear', step_based=True)

i.e. the learning rate of global step s (0-based) is ``start + (base - start) * s / warmup_steps`` for
s < warmup_steps, then the epoch schedule's value (tensorpack sets the value for step s before running
it: 0.1 at step 0). There is no warm-up when ``base <= start``. The loop's own ``schedule.warmup_epochs``
factor is epoch-wise, ``(epoch + 1) / w`` from 0; methods that want the reference's form call
:func:`warmup_lr` every step instead.

The loop steps the epoch schedule (``lr_at``) at epoch starts; this module is a pure function of the
global step, so a resumed run gets the same learning rate at every step.
"""
from __future__ import annotations

import math


def warmup_lr(base_lr: float, start_lr: float, step: int, warmup_steps: int) -> float | None:
    """The warm-up learning rate of 0-based global ``step``, or None once warm-up is over (or when there
    is none: ``warmup_steps == 0`` or ``base_lr <= start_lr``, main.py's ``if BASE_LR > 0.1``)."""
    if warmup_steps <= 0 or base_lr <= start_lr or step >= warmup_steps:
        return None
    return start_lr + (base_lr - start_lr) * step / warmup_steps


def steps_per_epoch(num_samples: int, batch_size: int) -> int:
    """Batches per epoch of robbench's loader (the last batch may be partial: ceil). The reference
    uses ``round(1281167 / total_batch)`` (main.py); they differ by at most one step per epoch."""
    return max(1, math.ceil(num_samples / batch_size))


def linear_scaled_lr(batch_size: int, per_256: float = 0.1) -> float:
    """main.py ``BASE_LR = 0.1 * (total_batch // 256)`` (Goyal et al. linear scaling rule; integer
    division as in the reference, so batches below 256 get 0 -- set lr explicitly there)."""
    return per_256 * (batch_size // 256)
