"""Running one work unit of the plan (:mod:`robbench.evaluate.plan`) on one sample batch -> outcome rows.

Attacks are called through what they declare (:class:`~robbench.attacks.capabilities.Capabilities`):

- eps batching: an attack with per-sample eps gets the (eps, sample) pairs still to attack packed into
  calls of up to ``batch_size`` rows; an eps whose samples are all still active is one call on the
  whole batch, in its order, so it sees exactly the reference's batches and random start. Others are
  called once per eps;
- streams: an attack whose random start is its generators' only use gets restart r's generator
  continued past the earlier batches (DVERGE eval_wbox.py: ``torch.manual_seed(r)`` once, then every
  batch), so the result does not depend on resume or sharding;
- random targets are drawn per sample id, so they do not depend on the batching either;
- randomized models: the attack sees the EOT wrapper (mean softmax of ``eot_samples`` draws), restarts
  run one by one and each restart's example is judged on one seeded draw of the deployed model.

Early stop (all-or-nothing protocols): a sample fooled at an eps by an earlier attack of the batch is
not attacked again at that eps and is recorded as fooled for the later ones (:class:`BatchState`).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from robbench.attacks.capabilities import AttackCall
from robbench.attacks.core import make_generators
from robbench.data.base import derive_seed, get_info, seeded_generator
from robbench.errors import ConfigError, UserError
from robbench.evaluate import transfer
from robbench.evaluate.plan import PlannedAttack, Unit
from robbench.evaluate.protocol import Protocol
from robbench.evaluate.targets import Target, member_predictions
from robbench.models.eot import EOT
from robbench.outcomes import CLEAN, NO_MEMBER, OutcomeKey
from robbench.registry import ATTACKS
from robbench.store import Row


@dataclass
class Work:
    """What an evaluation spent (sample-passes through a model: an ensemble pass runs every member)."""

    grad_passes: int = 0
    eval_passes: int = 0
    attack_seconds: float = 0.0
    generated_batches: int = 0
    warnings: list[str] = field(default_factory=list)

    def record(self) -> dict[str, Any]:
        return {"grad_passes": self.grad_passes, "eval_passes": self.eval_passes,
                "attack_seconds": round(self.attack_seconds, 3)}


@dataclass
class AttackOut:
    fooled: torch.Tensor                       # [P] bool
    step_correct: dict[int, torch.Tensor]      # K -> [P] bool
    warnings: list[str] = field(default_factory=list)
    grad_passes: int = 0
    eval_passes: int = 0

    @classmethod
    def of(cls, res: Any, passes: int = 1) -> "AttackOut":
        st = getattr(res, "stats", {}) or {}
        return cls(res.fooled.to(torch.bool), dict(getattr(res, "step_correct", {}) or {}),
                   list(getattr(res, "warnings", []) or []), int(st.get("grad", 0)) * passes,
                   int(st.get("eval", 0)) * passes)


def make_attack(attack: PlannedAttack, options: Any = None) -> Any:
    """The attack function of ``attack`` built with ``options`` (default: the protocol's)."""
    factory = ATTACKS.get(attack.spec.attack)
    p = attack.options if options is None else options
    return factory(p) if p is not None else factory()


def seed_name(key: OutcomeKey) -> str:
    """The seed material naming an outcome key in derived seeds (EOT draws, judging draws). It is the
    id version-1 stores held, so randomized models give the same results as before the key columns."""
    out = key.attack
    if key.source:
        out += f"@source={key.source}"
    return out


def run_attack(attack: PlannedAttack, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor, *,
               randomized: bool, eot_samples: int, seed_parts: tuple[Any, ...],
               call: AttackCall | None = None) -> AttackOut:
    """One attack on a batch of (sample, eps) pairs."""
    caps = attack.caps
    uniq = sorted(set(eps.tolist()))
    if not caps.per_sample_eps and len(uniq) > 1:  # call once per eps value and stitch
        out = AttackOut(torch.zeros(len(x), dtype=torch.bool, device=x.device), {})
        for e in uniq:
            m = eps == e
            o = run_attack(attack, model, x[m], y[m], eps[m], randomized=randomized, eot_samples=eot_samples,
                           seed_parts=seed_parts + (e,), call=call)
            out.fooled[m] = o.fooled
            for k, v in o.step_correct.items():
                out.step_correct.setdefault(k, torch.ones(len(x), dtype=torch.bool, device=x.device))[m] = v
            out.warnings += o.warnings
            out.grad_passes += o.grad_passes
            out.eval_passes += o.eval_passes
        return out
    eps_arg: float | torch.Tensor = eps if caps.per_sample_eps else float(uniq[0])
    kw = (call or AttackCall()).kwargs(caps)
    if not randomized:
        return AttackOut.of(make_attack(attack)(model, x, y, eps_arg, **kw))
    # restarts one by one (restart r as its own run, as inside the attack) and each restart's
    # example judged on one seeded draw of the deployed model
    grad_model = EOT(model, eot_samples) if caps.eot else model
    passes = eot_samples if caps.eot else 1
    kw.pop("rng", None)  # a continued stream belongs to an attack that runs every restart itself
    out = AttackOut(torch.zeros(len(x), dtype=torch.bool, device=x.device), {})
    for r in range(caps.restarts):
        options = caps.options_for_restart(attack.options, r) if caps.restarts > 1 else attack.options
        torch.manual_seed(derive_seed(*seed_parts, "eot", r))  # the EOT draws are seeded too
        res = make_attack(attack, options)(grad_model, x, y, eps_arg, **kw)
        torch.manual_seed(derive_seed(*seed_parts, "draw", r))
        with torch.no_grad():
            out.fooled |= model(res.x_adv).argmax(-1) != y
        o = AttackOut.of(res, passes)
        for k, v in o.step_correct.items():
            out.step_correct[k] = out.step_correct.get(k, torch.ones_like(v)) & v
        out.warnings += o.warnings
        out.grad_passes += o.grad_passes
        out.eval_passes += o.eval_passes + len(x)
    return out


def random_targets(attack: PlannedAttack, y: torch.Tensor, sample_ids: Sequence[int], num_classes: int,
                   seed: int) -> torch.Tensor | None:
    """Targets of an attack declaring random targets: (y + U{1..C-1}) mod C (Xie & Yuille;
    ImageNet-Adversarial-Training adv_model.py ``_create_random_target``), drawn per *sample id*, so every
    sample gets its own draw whatever the batching, packing, sharding or resume, and attacks with the
    same target seed (pgd2000 and pgd10 in xie-pgd2000) share their targets."""
    ts = attack.caps.target_seed
    if ts is None:
        return None
    shift = [int(torch.randint(1, num_classes, (1,), generator=seeded_generator(seed, "random-target", ts, int(s))))
             for s in sample_ids]
    return (y + torch.tensor(shift, dtype=y.dtype, device=y.device)) % num_classes


def continued_generators(attack: PlannedAttack, skip_elements: int, device: torch.device) -> list[torch.Generator]:
    """Restart generators (seeded ``seed + r``, :func:`robbench.attacks.core.make_generators`) advanced
    past the init noise of the previous batches (drawing in chunks consumes the stream exactly as one
    draw: checked in the tests)."""
    gens = make_generators(attack.caps.seed, attack.caps.restarts, device)
    for g in gens:
        left = skip_elements
        while left > 0:
            k = min(left, 1 << 22)
            torch.empty(k, device=device).uniform_(-1, 1, generator=g)
            left -= k
    return gens  # type: ignore[return-value]


def pack_calls(active: list[torch.Tensor], size: int) -> list[list[tuple[int, int]]]:
    """Attack calls for one sample batch: lists of (eps index, row). An eps whose rows are all still
    active is one call on the whole batch in its order (the same call, and random init, as a separate
    run at that eps, e.g. DVERGE's eval_wbox.py batch); the remaining partial blocks are packed together
    up to ``size`` rows per call (eps batching through a per-sample eps tensor)."""
    calls: list[list[tuple[int, int]]] = []
    pack: list[tuple[int, int]] = []
    for ei, a in enumerate(active):
        rows = [(ei, int(i)) for i in a.nonzero().flatten().tolist()]
        if not rows:
            continue
        if len(rows) == len(a):
            calls.append(rows)
            continue
        for r in rows:
            if len(pack) == size:
                calls.append(pack)
                pack = []
            pack.append(r)
    if pack:
        calls.append(pack)
    return calls


def margin(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """z_y - max_{j != y} z_j of the model output (logits or log-probabilities)."""
    zy = out.gather(1, y.unsqueeze(1)).squeeze(1)
    other = out.scatter(1, y.unsqueeze(1), float("-inf")).max(1).values
    return zy - other


@dataclass
class Batch:
    """One sample batch on the device, prepared in the target's memory format."""

    index: int
    ids: list[int]
    x: torch.Tensor
    y: torch.Tensor


class BatchState:
    """Per eps, the samples of a batch not yet fooled by an earlier attack (early stop)."""

    def __init__(self, size: int, device: torch.device) -> None:
        self.size, self.device = size, device
        self.robust: dict[float, torch.Tensor] = {}

    def active(self, eps: float) -> torch.Tensor:
        if eps not in self.robust:  # clean errors are attacked too, as the reference does
            self.robust[eps] = torch.ones(self.size, dtype=torch.bool, device=self.device)
        return self.robust[eps]

    def survived(self, eps: float, correct: torch.Tensor) -> None:
        self.active(eps).logical_and_(correct)


class Executor:
    """Runs the units of one target; ``early_stop``: carry fooled samples from attack to attack.
    ``unit``: samples per sample batch of the plan (``TargetPlan.unit``; default the protocol's
    ``batch_size``): batch b starts at sample position ``b * unit``."""

    def __init__(self, proto: Protocol, target: Target, work: Work, early_stop: bool, unit: int | None = None) -> None:
        self.proto, self.t, self.work, self.early_stop = proto, target, work, early_stop
        self.unit = unit or proto.batch_size
        self.num_classes = get_info(target.dataset, target.data_options).num_classes
        self.has_member_attacks = any(proto.attack_on(a) == "members" for a in proto.attacks)

    def _predict(self, x: torch.Tensor, seed_parts: tuple[Any, ...]) -> torch.Tensor:
        if self.t.randomized:
            torch.manual_seed(derive_seed(*seed_parts))
        with torch.no_grad():
            return self.t.model(x)

    def clean(self, unit: Unit, b: Batch) -> list[Row]:
        """Clean accuracy with margins (and member rows when the protocol crafts on members: the
        transferability heatmap's sanity check)."""
        out = self._predict(b.x, (self.proto.seed, "clean", unit.batch))
        ok = out.argmax(-1) == b.y
        mg = margin(out, b.y)
        rows: list[Row] = [(CLEAN, 0.0, s, NO_MEMBER, int(c), float(m)) for s, c, m in zip(b.ids, ok.tolist(), mg.tolist())]
        if self.has_member_attacks:
            with torch.no_grad():
                preds = member_predictions(self.t.model, b.x)
            for j in range(preds.shape[0]):
                rows += [(CLEAN, 0.0, s, j, int(c), None) for s, c in zip(b.ids, (preds[j] == b.y).tolist())]
        return rows

    def restore(self, unit: Unit, b: Batch, committed: Any, state: BatchState) -> None:
        """A committed target unit's effect on early stop, read back from its rows."""
        if not self.early_stop or unit.kind != "target" or unit.attack is None:
            return
        final = unit.attack.final()
        df = committed[(committed["attack"] == final.attack) & (committed["source"] == final.source)
                       & (committed["source_member"] == final.source_member) & (committed["steps"] == final.steps)
                       & (committed["member"] == NO_MEMBER) & committed["sample"].isin(b.ids)]
        for e in unit.attack.eps:
            sub = df[(df["eps"] - e).abs() < 1e-12].set_index("sample")
            ok = torch.tensor([bool(sub.loc[s, "correct"]) for s in b.ids], device=b.x.device)
            state.survived(e, ok)

    def target(self, unit: Unit, b: Batch, state: BatchState) -> list[Row]:
        """An attack crafted on the evaluated model; ``record_steps`` rows from the same run."""
        a = unit.attack
        assert a is not None
        eps_list, n, dev = list(a.eps), len(b.ids), b.x.device
        fooled = {e: torch.ones(n, dtype=torch.bool, device=dev) for e in eps_list}  # skipped: fooled before
        steps_ok = {k: {e: torch.zeros(n, dtype=torch.bool, device=dev) for e in eps_list} for k in a.caps.record_steps}
        targets = random_targets(a, b.y, b.ids, self.num_classes, self.proto.seed)
        t0 = time.perf_counter()
        for c, calls in enumerate(pack_calls([state.active(e) for e in eps_list], self.proto.batch_size)):
            ei = torch.tensor([p[0] for p in calls], device=dev)
            ii = torch.tensor([p[1] for p in calls], device=dev)
            eps_t = torch.tensor(eps_list, dtype=b.x.dtype, device=dev)[ei]
            whole = len(calls) == n and all(e == calls[0][0] and i == j for j, (e, i) in enumerate(calls))
            rng = None
            if whole and not self.t.randomized and a.caps.stream_init and a.caps.seed is not None:
                # a whole batch at one eps: continue each restart's stream past the earlier batches
                rng = continued_generators(a, unit.batch * self.unit * b.x[0].numel(), dev)
            call = AttackCall(targets=None if targets is None else targets[ii], rng=rng)
            o = run_attack(a, self.t.model, b.x[ii], b.y[ii], eps_t, randomized=self.t.randomized,
                           eot_samples=self.proto.eot_samples, seed_parts=(self.proto.seed, a.id, unit.batch, c),
                           call=call)
            self._count(o)
            for j, (e_idx, i) in enumerate(calls):
                e = eps_list[e_idx]
                fooled[e][i] = bool(o.fooled[j])
                for k in steps_ok:
                    steps_ok[k][e][i] = bool(o.step_correct[k][j]) if k in o.step_correct else not bool(o.fooled[j])
        self.work.attack_seconds += time.perf_counter() - t0
        rows: list[Row] = []
        for e in eps_list:
            for k, key in a.stored():
                ok = (~fooled[e]) if k is None else steps_ok[k][e]
                rows += [(key, float(e), s, NO_MEMBER, int(v), None) for s, v in zip(b.ids, ok.tolist())]
            if self.early_stop:
                state.survived(e, ~fooled[e])
        return rows

    def member(self, unit: Unit, b: Batch) -> list[Row]:
        """DVERGE eval_transferability.py: examples crafted on member i (every restart separately) are
        tested on every member j and on the ensemble; fooled = fooled by any restart."""
        a = unit.attack
        assert a is not None
        eps_list = list(a.eps)
        if not a.caps.per_sample_eps and len(eps_list) > 1:
            raise ConfigError(f"attack {a.spec.attack!r} takes one eps per call; give one eps per attack table",
                              file=self.proto.source_file, field=f"attacks.{a.id}.eps")
        members = self.t.members
        n, E = len(b.ids), len(eps_list)
        xr = b.x.repeat(E, *([1] * (b.x.dim() - 1)))
        yr = b.y.repeat(E)
        eps_t = torch.tensor(eps_list, dtype=b.x.dtype, device=b.x.device).repeat_interleave(n)
        fooled = torch.zeros(len(members) + 1, E * n, dtype=torch.bool, device=b.x.device)
        t0 = time.perf_counter()
        runs = a.spec.restarts_as_runs or 1
        for r in range(runs):
            options = a.caps.options_for_restart(a.options, r) if a.spec.restarts_as_runs else a.options
            res = make_attack(a, options)(members[unit.member], xr, yr,
                                          eps_t if a.caps.per_sample_eps else float(eps_list[0]))
            self.work.grad_passes += AttackOut.of(res).grad_passes
            with torch.no_grad():
                preds = member_predictions(self.t.model, res.x_adv)
                fooled[:-1] |= preds != yr.unsqueeze(0)
                fooled[-1] |= self.t.model(res.x_adv).argmax(-1) != yr
        self.work.attack_seconds += time.perf_counter() - t0
        key = OutcomeKey(a.id, source_member=unit.member)
        rows: list[Row] = []
        for j in list(range(len(members))) + [NO_MEMBER]:
            ok = (~fooled[j]).view(E, n)
            for ei, e in enumerate(eps_list):
                rows += [(key, float(e), s, j, int(v), None) for s, v in zip(b.ids, ok[ei].tolist())]
        return rows

    def transfer(self, unit: Unit, b: Batch, sets: "TransferSets") -> list[Row]:
        """The source's transfer sets of this attack, read for this batch and tested on the target."""
        a = unit.attack
        assert a is not None
        key = OutcomeKey(a.id, unit.source)
        rows: list[Row] = []
        start = unit.batch * self.unit
        for e in a.eps:
            ts = sets.get(unit.source, a.id, e)
            sl = slice(start, start + len(b.ids))
            if ts.sample_ids[sl].tolist() != list(b.ids) or not torch.equal(ts.labels[sl], b.y.cpu()):
                raise UserError(f"transfer set {ts.key[:12]}... is not aligned with batch {unit.batch} "
                                f"(sample ids or labels)", file=str(ts.path), field="sample_ids")
            xa = self.t.fmt.prepare(ts.x_adv[sl].to(b.x.device))
            out = self._predict(xa, (self.proto.seed, seed_name(key), e, unit.batch))
            ok = out.argmax(-1) == b.y
            mg = margin(out, b.y)
            rows += [(key, float(e), s, NO_MEMBER, int(v), float(m)) for s, v, m in zip(b.ids, ok.tolist(), mg.tolist())]
        return rows

    def _count(self, o: AttackOut) -> None:
        self.work.grad_passes += o.grad_passes
        self.work.eval_passes += o.eval_passes
        self.work.warnings += o.warnings


def seconds_per_sample_pass(model: nn.Module, x: torch.Tensor, y: torch.Tensor, repeats: int = 2) -> float:
    """Measured seconds of one forward-backward pass (the input gradient of the cross-entropy) per
    sample of ``x`` through ``model``, the unit of :func:`robbench.evaluate.plan.unit_samples` (the
    fastest of ``repeats`` after one warm-up)."""
    best = math.inf
    for i in range(repeats + 1):
        xx = x.detach().clone().requires_grad_(True)
        if x.is_cuda:
            torch.cuda.synchronize(x.device)
        t0 = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(xx), y)
        torch.autograd.grad(loss, xx)
        if x.is_cuda:
            torch.cuda.synchronize(x.device)
        if i:
            best = min(best, time.perf_counter() - t0)
    return best / max(1, len(x))


class TransferSets:
    """The keys of every (source, attack, eps) transfer set, and the sets loaded (and verified) once."""

    def __init__(self, root: Any, sample_ids: list[int]) -> None:
        self.root, self.ids = root, sample_ids
        self.keys: dict[tuple[str, str, float], str] = {}
        self._loaded: dict[str, Any] = {}

    def get(self, source: str, attack: str, eps: float) -> Any:
        k = self.keys[(source, attack, eps)]
        if k not in self._loaded:
            self._loaded[k] = transfer.load_set(k, root=self.root, expect_ids=self.ids)
        return self._loaded[k]

    def release(self) -> None:
        self._loaded = {}
