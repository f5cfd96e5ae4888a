"""The ``distillation`` protocol kind as data: what is measured, and which (x, x_s) pairs and layers.

A measurement, not an attack (DVERGE appendix B, Table 2): for a target ensemble of >= 2 members and
each protocol eps, per pair (x, x_s) and member i, x'_i is distilled from x_s towards x's layer-l
features of member i within the eps ball (DVERGE Eq. (1), :func:`robbench.train.distill.distill`), then
- ``distance``: the distance between f_i^l(x'_i) and f_i^l(x) that the distillation reached, and
- ``diversity-loss``: for every other member j, CE(f_j(x'_i), label), the loss DVERGE trains on
  (train_dverge.py ``loss_i = sum_{j != i} CE(f_i(x'_j), y_s)``; the paper's Eq. (5) per Table 2's caption).

Stored as outcome rows (``robbench.outcomes``): attack ``distance`` (member = source_member = i) and
``diversity-loss`` (source_member = i, member = j), the value in the ``margin`` column, ``correct`` =
whether that model's prediction on x'_i equals the label of the loss; ``sample`` is x's index. The
pairs and layers drawn are recorded in the run's meta (``distillation``).

Choices where Table 2 is silent follow the reference's diversity evaluation, eval/eval_diversity.py
(notes: dverge-reference-code.md §4 "Diversity"), each an option:
- layer: one random layer per group of 10 pairs, ``random.seed(0)`` then ``random.randint(1, depth)`` per
  group (its batches of 10, "a very small batch size so that we can sample different layers multiple
  times"); ``layers = [l, ...]`` measures every pair at each listed layer and averages the values;
- pairing: two independent shuffles of the sample set give the sources and the targets
  (``DistillationLoader(subset_loader, subset_loader)``), drawn here with Python's ``random`` seeded
  ``pairing_seed`` (torch 1.4's DataLoader order is not reproduced); ``next`` pairs sample k with k + 1;
- norm: the MSE between the two feature maps (``gradient_wrt_feature``'s ``nn.MSELoss()``, the objective
  the distillation descends; Table 2's values, about 1, are that size, not a sum over 16k elements);
- step ``eps / steps`` and 10 steps (eval_diversity.py ``Linf_distillation(m, si, ti, eps, eps/steps,
  steps, ...)``; Table 2's second column reads 10), momentum mu = 1, no random start, models in eval mode.
Paper and code disagree on the label: Table 2 measures "the resulting diversity loss ... with Equation
(5)", DVERGE's training loss, which takes the SOURCE label y_s (``label = "source"``, default: the
paper's table; a larger eps then gives a larger loss, Table 2's trend); eval_diversity.py scores
CE(f_j(x'_i), y_t) with the TARGET label (``label = "target"``).

Nothing here imports torch: the protocol loader and the plan use it without.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

from robbench.schema import opt

DISTANCE = "distance"          # outcome attack id: distance reached by member i's distillation
DIVERSITY_LOSS = "diversity-loss"  # outcome attack id: CE of member j on member i's distilled input
UNIT_ATTACK = "distillation"   # BatchKey attack of one (sample batch, eps) unit


@dataclass
class DistillationSpec:
    """The ``[distillation]`` table of a ``kind = "distillation"`` protocol."""

    steps: int = opt(10, min=1, max=10000, help="distillation steps (eval_diversity.py steps = 10; DVERGE "
                                                 "Table 2 column 2 reads 10)")
    rel_step: float = opt(0.1, min=0.0, max=1.0, help="step size as a fraction of eps (eval_diversity.py "
                                                       "alpha = eps/steps; training: 0.007 at eps 0.07)")
    momentum: float = opt(1.0, min=0.0, help="mu of the L1-normalised momentum (Linf_distillation mu=1, "
                                             "momentum=True); 0 = plain sign steps")
    layers: list[int] = opt([], min=1, help="empty: one random layer per group of `layer_group` pairs "
                                            "(eval_diversity.py); else every pair at each listed layer "
                                            "(1-based feature taps), values averaged over them")
    layer_group: int = opt(10, min=1, help="pairs per random layer draw (eval_diversity.py batch size 10)")
    layer_seed: int = opt(0, min=0, help="random.seed of the layer draws (eval_diversity.py random.seed(0))")
    pairing: Literal["shuffle", "next"] = opt(
        "shuffle", help="shuffle: sources and targets from two independent seeded shuffles of the samples "
                        "(eval_diversity.py DistillationLoader); next: x = sample k, x_s = sample k+1 of the "
                        "selection (never x itself)")
    pairing_seed: int = opt(0, min=0, help="seed of the two shuffles (eval_diversity.py torch.manual_seed(0))")
    label: Literal["source", "target"] = opt(
        "source", help="label of the diversity loss: source = y_s, DVERGE's training loss (Table 2: Eq. (5)); "
                       "target = y of x (eval_diversity.py)")
    distance: Literal["mse", "l2", "l2_squared"] = opt(
        "mse", help="mse: mean squared difference of the feature maps (the distillation objective, "
                    "distillation.py nn.MSELoss); l2: Euclidean norm; l2_squared: Eq. (1)'s squared norm")
    members: list[int] = opt([], min=0, help="members measured (empty: all); every ordered pair i != j of them")
    before_relu: bool = opt(True, help="features before the ReLU (DVERGE hard-codes before_relu=True)")
    iterate: Literal["x", "delta"] = opt("x", help="'x': Linf_distillation's in-place update to the bit "
                                                   "(robbench.train.distill); 'delta': the advertorch form")


def pairs(ids: list[int], spec: DistillationSpec) -> list[tuple[int, int]]:
    """(x, x_s) sample ids in measurement order: every sample is an x exactly once."""
    if spec.pairing == "next":
        return [(ids[k], ids[(k + 1) % len(ids)]) for k in range(len(ids))]
    rng = random.Random(spec.pairing_seed)
    sources = rng.sample(ids, len(ids))   # DistillationLoader(seed=..., target=...): the source batch first
    targets = rng.sample(ids, len(ids))
    return list(zip(targets, sources))


def pair_layers(n_pairs: int, spec: DistillationSpec, num_layers: int) -> list[tuple[int, ...]]:
    """The layer(s) each pair is measured at (its values are averaged over them)."""
    if spec.layers:
        return [tuple(spec.layers)] * n_pairs
    rng = random.Random(spec.layer_seed)
    groups = [rng.randint(1, num_layers) for _ in range((n_pairs + spec.layer_group - 1) // spec.layer_group)]
    return [(groups[k // spec.layer_group],) for k in range(n_pairs)]


def ordered_pairs(members: list[int]) -> list[tuple[int, int]]:
    """(i, j): x' distilled on member i, loss measured on member j != i."""
    return [(i, j) for i in members for j in members if j != i]
