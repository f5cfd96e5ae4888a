"""Learning-rate schedules as pure functions of (spec, epoch): a leaf module, so a method can ask for an
epoch's learning rate without importing the training loop."""
from __future__ import annotations

import math

from robbench.config import ScheduleSpec


def lr_factor(spec: ScheduleSpec, epoch: int, epochs: int) -> float:
    """Learning-rate multiplier for 0-based ``epoch`` (the schedule is stepped once per epoch, as the
    references' ``scheduler.step()`` after each training epoch).

    multistep: gamma ** (number of milestones <= epoch) (MultiStepLR); cosine: CosineAnnealingLR's closed
    form with T_max = epochs - warmup; exponential: gamma ** floor(epoch / every) (staircase decay, e.g.
    ALP's 0.94 every two epochs); constant: 1. A linear warm-up over ``warmup_epochs`` multiplies it.
    """
    w = spec.warmup_epochs
    warm = (epoch + 1) / w if epoch < w else 1.0
    if spec.name == "multistep":
        f = spec.gamma ** sum(1 for m in spec.milestones if m <= epoch)
    elif spec.name == "exponential":
        f = spec.gamma ** (max(0, epoch - w) // spec.every)
    elif spec.name == "cosine":
        t_max = max(1, epochs - w)
        f = 0.5 * (1 + math.cos(math.pi * max(0, epoch - w) / t_max))
    else:
        f = 1.0
    return warm * f


def lr_at(spec: ScheduleSpec, base_lr: float, epoch: int, epochs: int) -> float:
    """The learning rate of an epoch. For multistep it multiplies step by step like torch's MultiStepLR
    (lr * gamma at each milestone), so the floats equal the reference's."""
    if spec.name == "multistep" and spec.warmup_epochs == 0:
        lr = base_lr
        for m in sorted(spec.milestones):
            if m <= epoch:
                lr = lr * spec.gamma
        return lr
    return base_lr * lr_factor(spec, epoch, epochs)
