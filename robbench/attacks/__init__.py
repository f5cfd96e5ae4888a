"""Attacks: one iterative core (``core.iterative_attack``) with pluggable losses, gradient and input
transforms, SGM, init, projection, restarts and early stop; DeepFool and AutoAttack beside it behind
the same call shape ``attack(model, x, y, eps) -> AttackResult`` (``.x_adv``).

Importing this package registers 'fgsm', 'pgd', 'deepfool' and 'autoattack' in ``ATTACKS``.
"""
from robbench.attacks.autoattack import autoattack
from robbench.attacks.core import AttackResult, draw_init, iterative_attack, make_generators, momentum_update, \
    project, step_and_project
from robbench.attacks.deepfool import DeepFoolResult, deepfool
from robbench.attacks.input_transforms import DiverseInput
from robbench.attacks.losses import AttackLoss, ce, cw, dlr, feature_mse, get_loss
from robbench.attacks.registered import (AutoAttackOptions, DeepFoolOptions, FGSMOptions, PGDOptions,
                                         make_attack)
from robbench.attacks.sgm import sgm_blocks, skip_gradient

__all__ = [
    "AttackLoss", "AttackResult", "AutoAttackOptions", "DeepFoolOptions", "DeepFoolResult", "DiverseInput",
    "FGSMOptions", "PGDOptions", "autoattack", "ce", "cw", "deepfool", "dlr", "draw_init", "feature_mse",
    "get_loss", "iterative_attack", "make_attack", "make_generators", "momentum_update", "project",
    "sgm_blocks", "skip_gradient", "step_and_project",
]
