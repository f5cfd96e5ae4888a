"""Run a ``kind = "distillation"`` protocol on one target: the measurement of
:mod:`robbench.evaluate.distillation` per (sample batch, eps) unit, committed and resumed like attack units.

Each unit distils x'_i for every measured member i with :func:`robbench.train.distill.distill` (one call
per layer present in the batch: pairs of one random-layer group share a layer) and scores
:func:`robbench.train.distill.feature_distance` (or the L2 forms) and the per-sample cross-entropy of
every other member. No randomness: the pairs and layers are fixed before any unit runs, so a unit's
rows do not depend on resume, sharding or which units ran before.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from robbench.data import load_split
from robbench.errors import ConfigError, UserError
from robbench.evaluate.commit import Committer, RunRecord
from robbench.evaluate.distillation import (DISTANCE, DIVERSITY_LOSS, UNIT_ATTACK, DistillationSpec, ordered_pairs,
                                            pair_layers, pairs)
from robbench.evaluate.protocol import Protocol
from robbench.evaluate.targets import Target, identity_meta, run_identity, select_samples
from robbench.models import feature_layers, get_features
from robbench.outcomes import CLEAN, NO_MEMBER, BatchKey, OutcomeKey
from robbench.store import Row
from robbench.train.distill import distill, feature_distance


def measured_members(proto: Protocol, t: Target) -> list[int]:
    """The members the protocol measures on ``t``; one line (exit 2) when ``t`` has fewer than 2."""
    n = len(t.members)
    if n < 2:
        raise UserError(f"{t.name} has {n} member; a distillation protocol distils on member i and scores "
                        f"member j; allowed: an ensemble of >= 2 members", file=proto.source_file,
                        field="applies_to.members")
    chosen = list(proto.distillation.members) or list(range(n))
    bad = [m for m in chosen if m >= n]
    if bad:
        raise ConfigError(f"member {bad[0]} is not in {t.name} ({n} members); allowed: 0..{n - 1}",
                          file=proto.source_file, field="distillation.members")
    return chosen


def distances(member: nn.Module, x_adv: torch.Tensor, x: torch.Tensor, layer: int, spec: DistillationSpec) -> torch.Tensor:
    """Per-sample distance between f^l(x') and f^l(x) in the protocol's norm."""
    if spec.distance == "mse":
        return feature_distance(member, x_adv, x, layer, spec.before_relu)
    with torch.no_grad():
        d = (get_features(member, x_adv, layer, spec.before_relu) - get_features(member, x, layer, spec.before_relu))
        sq = d.pow(2).flatten(1).sum(1)
    return sq.sqrt() if spec.distance == "l2" else sq


def measure(members: list[nn.Module], x_t: torch.Tensor, x_s: torch.Tensor, label: torch.Tensor, layer: int,
            eps: float, spec: DistillationSpec) -> dict[str, Any]:
    """One layer on one batch: ``distance[i]`` [B], ``loss[(i, j)]`` [B], and whether the prediction of
    member i on x'_i (``ok_self[i]``) and of member j on x'_i (``ok[(i, j)]``) is ``label``."""
    xs = distill(members, x_s, x_t, layer, eps=eps, step_size=spec.rel_step * eps, steps=spec.steps,
                 momentum=spec.momentum or None, rand_start=False, before_relu=spec.before_relu,
                 iterate=spec.iterate)
    out: dict[str, Any] = {"distance": {}, "ok_self": {}, "loss": {}, "ok": {}}
    with torch.no_grad():
        logits = {(i, j): m_j(xs[i]) for i in range(len(members)) for j, m_j in enumerate(members)}
    for i, m_i in enumerate(members):
        out["distance"][i] = distances(m_i, xs[i], x_t, layer, spec)
        out["ok_self"][i] = logits[(i, i)].argmax(-1) == label
    for i, j in ordered_pairs(list(range(len(members)))):
        out["loss"][(i, j)] = F.cross_entropy(logits[(i, j)], label, reduction="none")
        out["ok"][(i, j)] = logits[(i, j)].argmax(-1) == label
    return out


class DistillationUnits:
    """The measurement of one target: its pairs, layers and members, and one unit's rows."""

    def __init__(self, proto: Protocol, t: Target, data: Any, ids: list[int], device: torch.device) -> None:
        self.proto, self.t, self.data, self.device = proto, t, data, device
        self.spec = proto.distillation
        self.members = measured_members(proto, t)
        self.num_layers = len(feature_layers(t.members[self.members[0]]))
        if self.num_layers == 0:
            raise ConfigError(f"{t.name}'s architecture has no feature taps to distil at", file=proto.source_file,
                              field="kind")
        bad = [layer for layer in self.spec.layers if layer > self.num_layers]
        if bad:
            raise ConfigError(f"layer {bad[0]} is not a feature tap of {t.name}; allowed: 1..{self.num_layers}",
                              file=proto.source_file, field="distillation.layers")
        self.pairs = pairs(ids, self.spec)
        self.layers = pair_layers(len(self.pairs), self.spec, self.num_layers)
        bs = proto.batch_size
        self.batches = [list(range(k, min(k + bs, len(self.pairs)))) for k in range(0, len(self.pairs), bs)]

    def record(self) -> dict[str, Any]:
        """What the run meta keeps: pairs, layers and the choices, so a value can be traced to its inputs."""
        return {"members": self.members, "ordered_pairs": ordered_pairs(self.members),
                "pairs": [list(p) for p in self.pairs], "layers": [list(layer) for layer in self.layers],
                "num_layers": self.num_layers, "value_column": "margin",
                "correct": f"prediction on the distilled input equals the {self.spec.label} label"}

    def _get(self, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.data.get(ids)
        return self.t.fmt.prepare(x.to(self.device)), y.to(self.device)

    def clean(self, b: int) -> list[Row]:
        """Clean accuracy of the whole model and every member on the batch's x (attack ``clean``, eps 0)."""
        ids = [self.pairs[k][0] for k in self.batches[b]]
        x, y = self._get(ids)
        rows: list[Row] = []
        with torch.no_grad():
            rows += [(CLEAN, 0.0, s, NO_MEMBER, int(c), None) for s, c in zip(ids, (self.t.model(x).argmax(-1) == y).tolist())]
            for j, m in enumerate(self.t.members):
                rows += [(CLEAN, 0.0, s, j, int(c), None) for s, c in zip(ids, (m(x).argmax(-1) == y).tolist())]
        return rows

    def unit(self, b: int, eps: float) -> list[Row]:
        """Rows of batch ``b`` at ``eps``: per pair, its values averaged over its layers."""
        ks = self.batches[b]
        by_layer: dict[int, list[int]] = {}
        for k in ks:
            for layer in self.layers[k]:
                by_layer.setdefault(layer, []).append(k)
        members = [self.t.members[m] for m in self.members]
        sums: dict[tuple[str, int, int, int], list[float]] = {}   # (what, i, j, pair) -> [value sum, all ok]
        for layer, sel in sorted(by_layer.items()):
            x_t, y_t = self._get([self.pairs[k][0] for k in sel])
            x_s, y_s = self._get([self.pairs[k][1] for k in sel])
            res = measure(members, x_t, x_s, y_s if self.spec.label == "source" else y_t, layer, eps, self.spec)
            for i in range(len(members)):
                self._add(sums, (DISTANCE, i, i), sel, res["distance"][i], res["ok_self"][i])
            for (i, j), v in res["loss"].items():
                self._add(sums, (DIVERSITY_LOSS, i, j), sel, v, res["ok"][(i, j)])
        rows: list[Row] = []
        for (what, i, j, k), (total, ok) in sorted(sums.items()):
            n = len(self.layers[k])
            key = OutcomeKey(what, source_member=self.members[i])
            rows.append((key, float(eps), self.pairs[k][0], self.members[j], int(ok), total / n))
        return rows

    @staticmethod
    def _add(sums: dict[Any, list[float]], what: tuple[str, int, int], sel: list[int], values: torch.Tensor,
             ok: torch.Tensor) -> None:
        for k, v, c in zip(sel, values.tolist(), ok.tolist()):
            cur = sums.setdefault((*what, k), [0.0, 1.0])
            cur[0] += float(v)
            cur[1] = min(cur[1], float(c))  # correct at every layer


def _meta(proto: Protocol, t: Target, ids: list[int], settings: Any, units: DistillationUnits) -> dict[str, Any]:
    return {**identity_meta(proto, t, ids, settings), "and_groups": [], "member": None,
            "unit_samples": proto.batch_size, "distillation": units.record()}


def evaluate_distillation(proto: Protocol, t: Target, settings: Any) -> int:
    """Measure ``proto`` (kind distillation) on the loaded target ``t`` (the engine has checked its
    dataset); returns its run id. ``settings``: the engine's :class:`~robbench.evaluate.engine.Settings`."""
    name = t.name
    measured_members(proto, t)  # the one line for a single model comes before any data is read
    data = load_split(t.dataset, proto.samples.split, settings.data_root, t.data_options)
    ids = select_samples(proto, data, t.dataset, t, settings.device)
    units = DistillationUnits(proto, t, data, ids, settings.device)
    record = RunRecord(settings.store, settings.dist)
    record.start(run_identity(proto, t), _meta(proto, t, ids, settings, units), settings.force)
    if record.status == "done":
        settings.say(f"{name}: {proto.name} already done (run {record.run_id}); --force to redo")
        return record.run_id
    done, _ = record.committed()
    committer = Committer(settings.store, record.run_id, settings.dist)
    dist_env = settings.dist
    n_batches = len(units.batches)
    bar = settings.progress(len(ids) * len(proto.eps), f"{name} {proto.name}")
    try:
        for rnd in range(dist_env.rounds(n_batches)):
            b = dist_env.item(rnd)
            if b < n_batches:
                clean_key = BatchKey("clean", batch=b)
                if proto.clean and clean_key not in done:
                    committer.commit(clean_key, units.clean(b))
                for e in proto.eps:
                    key = BatchKey(UNIT_ATTACK, batch=b, eps=float(e))
                    if key not in done:
                        committer.commit(key, units.unit(b, float(e)))
                    bar.update(len(units.batches[b]))
            committer.flush()
        bar.close()
        record.finish({})
    except BaseException as e:
        record.fail(e)
        raise
    return record.run_id
