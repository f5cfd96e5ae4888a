"""The evaluation engine: run a protocol on trained entries and write per-sample outcomes to the store.

``evaluate_protocol`` picks the targets (named entries, or every trained entry the protocol applies to),
loads each in eval mode, selects the samples, and runs three kinds of work per sample batch:

- *target attacks* (white-box, AutoAttack, DeepFool, the white-box half of convergence): crafted on the
  evaluated model itself; ``record_steps`` attacks store ``<id>@steps=K`` rows from one run;
- *source attacks* (black-box): transfer sets crafted once on each source entry, cached content-addressed
  (:mod:`robbench.evaluate.transfer`), read by every target; stored as ``<id>@source=<entry>``; each
  source's own accuracy on its sets is stored under the source entry (protocol ``<name>:source``);
- *member attacks* (within-ensemble transferability): crafted on member i, tested on every member j and
  on the whole ensemble, stored as ``<id>@source_member=i`` with ``member = j`` (-1: the ensemble).

Every (attack, sample batch) commits to the store in one transaction under the key ``<attack>|b<batch>``;
a killed evaluation resumes at the first uncommitted key and a finished run is skipped unless ``force``.
Clean accuracy is attack ``clean`` at eps 0. In all-or-nothing protocols with ``early_stop`` a sample
already fooled at an eps by an earlier attack is not attacked again at that eps and is recorded as fooled
for the skipped attacks, which keeps the all-or-nothing result exact (run meta says so); within an attack
the core skips later restarts of fooled samples. An eps whose samples are all still active is attacked as
one call on the whole batch, so the first attack sees exactly the reference's batches and random init. Randomized models (``randomized = True`` on the model or a submodule) are attacked through an EOT
wrapper (mean of ``eot_samples`` softmax draws per forward) and judged on one seeded draw per restart.
Under ``torchrun`` sample batches are dealt round-robin over ranks and rank 0 writes the store.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import click
import torch
import torch.nn.functional as F
from torch import nn

from robbench.errors import ConfigError, UserError
from robbench.evaluate.distributed import Dist, init_distributed
from robbench.evaluate.protocol import AttackSpec, Protocol, load_protocol

Row = tuple[str, float, int, int, int, "float | None"]


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------

def is_randomized(model: nn.Module) -> bool:
    """A model whose forward draws randomness (Ensemble-in-One random-path inference)."""
    return any(bool(getattr(m, "randomized", False)) for m in model.modules())


class EOT(nn.Module):
    """Expectation over transformation: log of the mean softmax over ``k`` forward draws (Athalye et al.
    2018); the gradient of a loss on it is the gradient of the expected prediction."""

    def __init__(self, model: nn.Module, k: int) -> None:
        super().__init__()
        self.model, self.k = model, int(k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = torch.stack([F.softmax(self.model(x), dim=-1) for _ in range(self.k)]).mean(0)
        return p.clamp_min(1e-40).log()


def _derive_seed(*parts: Any) -> int:
    from robbench.data.base import derive_seed

    return derive_seed(*parts)


@dataclass
class Target:
    name: str
    model: nn.Module
    manifest: dict[str, Any]
    entry: Any
    checkpoint_sha256: str
    randomized: bool = False

    @property
    def dataset(self) -> str:
        return self.entry.data.dataset

    @property
    def data_options(self) -> dict[str, Any]:
        return dict(self.entry.data.options or {})


def _load(name: str, runs_dir: str | Path | None, device: torch.device, member: int | None = None) -> Target:
    from robbench.checkpoint import RunDir, checkpoint_sha256, entry_from_manifest, load_trained
    from robbench.device import memory_format

    model, manifest = load_trained(name, runs_dir, device)
    run = RunDir(runs_dir, name)
    entry = entry_from_manifest(manifest, str(run.manifest_path))
    if member is not None:
        members = getattr(model, "members", None)
        if members is None or member >= len(members):
            n = len(members) if members is not None else 1
            raise ConfigError(f"{name} has {n} member(s); allowed: 0..{n - 1}", field="member")
        model = members[member]
    model = model.to(memory_format=memory_format(device)).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return Target(name, model, manifest, entry, checkpoint_sha256(run), is_randomized(model))


# ----------------------------------------------------------------------------------------------
# Targets and samples
# ----------------------------------------------------------------------------------------------

def trained_entries(runs_dir: str | Path | None) -> list[tuple[str, Any]]:
    """(name, ZooEntry from the manifest) of every complete run under ``runs_dir``."""
    from robbench.checkpoint import RunDir, entry_from_manifest
    from robbench.errors import CheckpointError
    from robbench.paths import runs_dir as default_runs_dir

    root = Path(runs_dir) if runs_dir is not None else default_runs_dir()
    out = []
    for mf in sorted(root.glob("*/manifest.json")):
        if ".stale-" in mf.parent.name:  # moved aside by `train --fresh`: kept, not evaluated
            continue
        run = RunDir(root, mf.parent.name)
        try:
            m = run.read_manifest()
            if m["status"] != "complete":
                continue
            out.append((run.name, entry_from_manifest(m, str(mf))))
        except (CheckpointError, ConfigError):
            continue
    return out


def resolve_targets(proto: Protocol, entries: Sequence[str], runs_dir: str | Path | None) -> list[str]:
    """Named entries (checked against the protocol's datasets), or every trained entry it applies to."""
    from robbench.checkpoint import entry_name

    if entries:
        return [entry_name(e) for e in entries]
    names = [n for n, e in trained_entries(runs_dir) if proto.applies(e)]
    if names:
        return names
    from robbench.config import list_entries, load_entry

    todo = []
    for n in list_entries():
        try:
            e = load_entry(n)
        except UserError:
            continue
        if proto.applies(e):
            todo.append(n)
    hint = ("; train one first: " + ", ".join(f"robbench train zoo/{n}" for n in todo[:6])
            + (f" (+{len(todo) - 6} more)" if len(todo) > 6 else "")) if todo else "; no zoo entry matches its applies_to"
    raise UserError(f"protocol {proto.name!r}: no trained entry it applies to under "
                    f"{runs_dir or 'runs'}{hint}", file=proto.source_file, field="applies_to")


def select_samples(proto: Protocol, data: Any, dataset: str, model: nn.Module | None = None,
                   device: torch.device | None = None) -> list[int]:
    """Sample ids per ``proto.samples`` (data subsets helpers; 'all_correct' needs the model)."""
    from robbench.data.subsets import dverge_subset, make_subset
    from robbench.errors import DataError

    s = proto.samples
    size = len(data) if s.pool is None else min(int(s.pool), len(data))
    try:
        if s.selection != "all_correct":
            n = None if s.selection == "all" else s.n
            return list(make_subset(s.selection, dataset, s.split, n, s.seed, size=size).indices)
        assert model is not None and device is not None
        correct: list[int] = []
        with torch.no_grad():
            for start in range(0, size, proto.batch_size):
                ids = list(range(start, min(size, start + proto.batch_size)))
                x, y = data.get(ids)
                x, y = x.to(device), y.to(device)
                ok = _member_predictions(model, x).eq(y.unsqueeze(0)).all(0)
                correct.extend(i for i, o in zip(ids, ok.tolist()) if o)
        return dverge_subset(s.n, correct, s.seed)
    except DataError as e:
        raise ConfigError(str(e), file=proto.source_file, field="samples.n") from None


def _members(model: nn.Module) -> list[nn.Module]:
    members = getattr(model, "members", None)
    return list(members) if members is not None else [model]


def _member_predictions(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """[M, B] predicted classes of every member."""
    if hasattr(model, "member_logits"):
        return model.member_logits(x).argmax(-1)
    return model(x).argmax(-1).unsqueeze(0)


# ----------------------------------------------------------------------------------------------
# Attack calls
# ----------------------------------------------------------------------------------------------

PER_SAMPLE_EPS = {"pgd", "fgsm"}  # attacks on the iterative core accept a [B] eps tensor


def _make_attack(spec: AttackSpec, params: Any = None) -> Callable[..., Any]:
    from robbench.registry import ATTACKS

    factory = ATTACKS.get(spec.attack)
    p = spec.params_parsed if params is None else params
    return factory(p) if p is not None else factory()


def _with(params: Any, **kw: Any) -> Any:
    """The attack options with some fields replaced (only the fields it has)."""
    if params is None:
        return None
    names = {f.name for f in dataclasses.fields(params)}
    return dataclasses.replace(params, **{k: v for k, v in kw.items() if k in names})


def _param(params: Any, name: str, default: Any = None) -> Any:
    return getattr(params, name, default) if params is not None else default


def record_steps(spec: AttackSpec) -> list[int]:
    return sorted(int(s) for s in (_param(spec.params_parsed, "record_steps", ()) or ()))


def stored_ids(spec: AttackSpec, base: str | None = None) -> tuple[list[tuple[int | None, str]], str]:
    """[(K or None, attack id)] rows an attack writes, and the id holding its final result."""
    base = base or spec.id
    rec = record_steps(spec)
    steps = _param(spec.params_parsed, "steps")
    ids: list[tuple[int | None, str]] = [(k, f"{base}@steps={k}") for k in rec]
    if steps is None or steps not in rec:
        ids.append((None, base))
    final = base if (steps is None or steps not in rec) else f"{base}@steps={steps}"
    return ids, final


@dataclass
class AttackOut:
    fooled: torch.Tensor                       # [P] bool
    step_correct: dict[int, torch.Tensor]      # K -> [P] bool
    warnings: list[str] = field(default_factory=list)
    grad_passes: int = 0
    eval_passes: int = 0


def run_attack(spec: AttackSpec, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor, *,
               randomized: bool, eot_samples: int, seed_parts: tuple[Any, ...], params: Any = None,
               core_kw: dict[str, Any] | None = None) -> AttackOut:
    """One attack call on a batch of (sample, eps) pairs; randomized models: EOT gradient, and each
    restart's example judged on one seeded draw (a sample is fooled if any restart fools it)."""
    params = spec.params_parsed if params is None else params
    tensor_eps = spec.attack in PER_SAMPLE_EPS
    uniq = sorted(set(eps.tolist()))
    if not tensor_eps and len(uniq) > 1:  # call once per eps value and stitch
        fooled = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        outs: dict[int, torch.Tensor] = {}
        warns: list[str] = []
        grads = evals = 0
        for e in uniq:
            m = eps == e
            o = run_attack(spec, model, x[m], y[m], eps[m], randomized=randomized, eot_samples=eot_samples,
                           seed_parts=seed_parts + (e,), params=params)
            fooled[m] = o.fooled
            for k, v in o.step_correct.items():
                outs.setdefault(k, torch.ones(len(x), dtype=torch.bool, device=x.device))[m] = v
            warns += o.warnings
            grads += o.grad_passes
            evals += o.eval_passes
        return AttackOut(fooled, outs, warns, grads, evals)
    eps_arg: float | torch.Tensor = eps if tensor_eps else float(uniq[0])
    if not randomized:
        res = _make_attack(spec, params)(model, x, y, eps_arg, **(core_kw or {}))
        st = getattr(res, "stats", {}) or {}
        return AttackOut(res.fooled.to(torch.bool), dict(getattr(res, "step_correct", {}) or {}),
                         list(getattr(res, "warnings", []) or []), int(st.get("grad", 0)), int(st.get("eval", 0)))
    # randomized: run restarts one by one (restart r = seed + r, as inside the core) and judge each
    # restart's example on one seeded random draw of the deployed model
    restarts = int(_param(params, "restarts", 1) or 1)
    seed = _param(params, "seed", 0)
    eot = EOT(model, eot_samples)
    fooled = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    step_correct: dict[int, torch.Tensor] = {}
    warns: list[str] = []
    grads = evals = 0
    for r in range(restarts):
        p_r = _with(params, restarts=1, seed=None if seed is None else int(seed) + r)
        torch.manual_seed(_derive_seed(*seed_parts, "eot", r))  # EOT draws seeded too (engineer E, EIO)
        res = _make_attack(spec, p_r)(eot, x, y, eps_arg,
                                      **{k: v for k, v in (core_kw or {}).items() if k == "targeted"})
        torch.manual_seed(_derive_seed(*seed_parts, "draw", r))
        with torch.no_grad():
            fooled |= model(res.x_adv).argmax(-1) != y
        for k, v in (getattr(res, "step_correct", {}) or {}).items():
            step_correct[k] = step_correct.get(k, torch.ones_like(v)) & v
        warns += list(getattr(res, "warnings", []) or [])
        grads += int((getattr(res, "stats", {}) or {}).get("grad", 0)) * eot_samples
        evals += int((getattr(res, "stats", {}) or {}).get("eval", 0)) * eot_samples + len(x)
    return AttackOut(fooled, step_correct, warns, grads, evals)


# ----------------------------------------------------------------------------------------------
# Committing batches (rank 0 writes; other ranks send their rows)
# ----------------------------------------------------------------------------------------------

class Committer:
    def __init__(self, store: Any, run_id: int, dist: Dist) -> None:
        self.store, self.run_id, self.dist = store, run_id, dist
        self.buffer: list[tuple[str, list[Row]]] = []

    def commit(self, key: str, rows: list[Row]) -> None:
        if self.dist.enabled:
            self.buffer.append((key, rows))
        else:
            self.store.write_batch(self.run_id, key, rows)

    def flush(self) -> None:
        if not self.dist.enabled:
            return
        gathered = self.dist.gather(self.buffer)
        self.buffer = []
        if self.dist.is_main:
            for part in gathered:
                for key, rows in part:
                    self.store.write_batch(self.run_id, key, rows)


# ----------------------------------------------------------------------------------------------
# The engine
# ----------------------------------------------------------------------------------------------

@dataclass
class Context:
    proto: Protocol
    dist: Dist
    device: torch.device
    store: Any
    data_root: str | Path | None
    runs_dir: str | Path | None
    cache_root: Path | None
    force: bool
    quiet: bool
    early_stop: bool
    stats: dict[str, Any] = field(default_factory=lambda: {"grad_passes": 0, "eval_passes": 0, "attack_seconds": 0.0,
                                                           "generated_batches": 0, "computed_keys": []})
    ids: list[int] = field(default_factory=list)                           # the current target's samples
    set_keys: dict[tuple[str, str, float], str] = field(default_factory=dict)  # (source, attack, eps) -> key
    set_cache: dict[str, Any] = field(default_factory=dict)


def _echo(ctx: Context, msg: str) -> None:
    if ctx.dist.is_main and not ctx.quiet:
        click.echo(msg)


def _batches(ids: Sequence[int], size: int) -> list[list[int]]:
    return [list(ids[i:i + size]) for i in range(0, len(ids), size)]


def _progress(ctx: Context, total: int, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="sample", disable=ctx.quiet or not ctx.dist.is_main,
                dynamic_ncols=True, leave=False)


def and_groups(proto: Protocol, sources: Sequence[str] = ()) -> dict[str, str]:
    """Stored attack id -> and-group name (``{source}`` in a group name is the source entry)."""
    out: dict[str, str] = {}
    for spec in proto.attacks:
        on = proto.attack_on(spec)
        if on == "sources":
            for src in sources:
                ids, _ = stored_ids(spec, f"{spec.id}@source={src}")
                for _, sid in ids:
                    out[sid] = (spec.and_group or sid).replace("{source}", src)
        elif spec.and_group:
            for _, sid in stored_ids(spec)[0]:
                out[sid] = spec.and_group
    return out


def evaluate_protocol(protocol: str | Protocol, entries: Sequence[str] | None = None, *, n: int | None = None,
                      eps: str | Sequence[float] | None = None, batch_size: int | None = None,
                      overrides: Sequence[str] | None = None, force: bool = False, device: str | None = None,
                      runs_dir: str | Path | None = None, db: str | Path | None = None,
                      data_root: str | Path | None = None, cache_root: str | Path | None = None,
                      quiet: bool = False) -> dict[str, int]:
    """Run ``protocol`` on ``entries`` (default: every trained entry it applies to). Returns
    {entry: run_id} (run ids are known on rank 0; other ranks get the same dict)."""
    from robbench.device import pick_device
    from robbench.store import Store

    if isinstance(protocol, Protocol):
        proto = protocol
        if n is not None or eps is not None or batch_size is not None or overrides:
            raise UserError("pass the protocol's name to apply overrides")
    else:
        proto = load_protocol(protocol, list(overrides or []), n=n, eps=eps, batch_size=batch_size)
    dist, device = init_distributed(device)
    dev = pick_device(device)
    store = Store(db) if dist.is_main else None
    early = proto.early_stop and proto.aggregation == "all_or_nothing"
    ctx = Context(proto, dist, dev, store, data_root, runs_dir,
                  Path(cache_root) if cache_root is not None else None, force, quiet, early)
    names = resolve_targets(proto, list(entries or []), runs_dir)
    results: dict[str, int] = {}
    for name in names:
        results[name] = _evaluate_one(ctx, name)
    if store is not None:
        store.close()
    return results


def _evaluate_one(ctx: Context, name: str) -> int:
    from robbench.data import load_split
    from robbench.data.subsets import indices_sha256

    proto, dist = ctx.proto, ctx.dist
    t = _load(name, ctx.runs_dir, ctx.device, proto.member)
    datasets = proto.applies_to.datasets or proto.datasets
    if datasets and t.dataset not in datasets:
        raise UserError(f"protocol {proto.name!r} applies to {', '.join(datasets)}; {name} is a "
                        f"{t.dataset} model", file=proto.source_file, field="datasets")
    data = load_split(t.dataset, proto.samples.split, ctx.data_root, t.data_options)
    ids = select_samples(proto, data, t.dataset, t.model, ctx.device)
    ctx.ids, ctx.set_cache = ids, {}
    ctx.stats.update(grad_passes=0, eval_passes=0, attack_seconds=0.0, computed_keys=[])
    ctx.stats.pop("warnings", None)
    sources = list(proto.sources) if any(proto.attack_on(a) == "sources" for a in proto.attacks) else []
    groups = and_groups(proto, sources)
    meta = {
        "protocol": proto.resolved(), "protocol_file": proto.source_file,
        "samples": {"selection": proto.samples.selection, "n": len(ids), "split": proto.samples.split,
                    "seed": proto.samples.seed, "sha256": indices_sha256(ids), "dataset": t.dataset},
        "and_groups": groups, "member": proto.member, "world_size": dist.world, "device": str(ctx.device),
        "early_stop": ("all-or-nothing early stop: a sample fooled by an earlier attack at an eps is not "
                       "attacked again at that eps and is stored as fooled (correct=0, margin NULL) for the "
                       "skipped attacks; the all-or-nothing result is unchanged")
        if ctx.early_stop else "off: every attack runs on every sample",
        "seeding": "restart r draws from a generator seeded seed + r; for L-inf uniform-start PGD on a whole "
                   "batch the generator continues over the batches (per eps), as eval_wbox.py's "
                   "torch.manual_seed(r) before each restart over the test set; other calls reseed per call. "
                   "Either way results do not depend on resume or sharding",
        "eot": ({"randomized": True, "samples": proto.eot_samples, "gradient": "log mean softmax over the draws",
                 "judged": "one seeded draw per restart"} if t.randomized else {"randomized": False}),
    }
    run_id = None
    status = None
    if dist.is_main:
        run_id = ctx.store.start_run(name, t.checkpoint_sha256, proto.name, proto.sha256(), proto.overrides,
                                     proto.seed, meta, force=ctx.force)
        status = ctx.store.run(run_id)["status"]
    run_id, status = dist.broadcast((run_id, status))
    if status == "done":
        _echo(ctx, f"{name}: {proto.name} already done (run {run_id}); --force to redo")
        if dist.is_main and not ctx.quiet:
            _summary(ctx, name, run_id, groups)
        return int(run_id)
    done, committed = set(), None
    if dist.is_main:
        done = ctx.store.done_batches(run_id)
        committed = ctx.store.outcomes(run_id) if done else None
    done, committed = dist.broadcast((done, committed))
    committer = Committer(ctx.store, run_id, dist)
    try:
        if sources:
            _source_sets(ctx, t, data, ids)
        _batches_loop(ctx, t, data, ids, done, committed, committer, sources)
        if dist.is_main:
            warns = ctx.stats.pop("warnings", None)
            if warns:
                ctx.store.put_meta(run_id, "attack_warnings", sorted(set(warns)))
            # sample-passes through the model (an ensemble pass runs every member)
            ctx.store.put_meta(run_id, "work", {"grad_passes": ctx.stats["grad_passes"],
                                                "eval_passes": ctx.stats["eval_passes"],
                                                "attack_seconds": round(ctx.stats["attack_seconds"], 3)})
            ctx.store.finish_run(run_id)
    except BaseException as e:
        if dist.is_main:
            ctx.store.fail_run(run_id, f"{type(e).__name__}: {e}"[:500])
        raise
    if dist.is_main and not ctx.quiet:
        _summary(ctx, name, run_id, groups)
    return int(run_id)


# -- per-batch work ----------------------------------------------------------------------------

def _committed_rows(committed: Any, keys_attacks: Iterable[str], sample_ids: Sequence[int]) -> Any:
    if committed is None or len(committed) == 0:
        return None
    return committed[committed["attack"].isin(list(keys_attacks)) & committed["sample"].isin(list(sample_ids))]


def _batches_loop(ctx: Context, t: Target, data: Any, ids: list[int], done: set[str], committed: Any,
                  committer: Committer, sources: list[str]) -> None:
    """Phase 1 per sample batch: clean, target attacks, member attacks. Phase 2 per transfer set group
    (attack x source, all eps): its sets are loaded once and read batch by batch."""
    from robbench.device import memory_format

    proto, dist = ctx.proto, ctx.dist
    batches = _batches(ids, proto.batch_size)

    def rounds(desc: str, work: Callable[[int, list[int], torch.Tensor, torch.Tensor], None]) -> None:
        bar = _progress(ctx, len(ids), desc)
        for rnd in range(dist.rounds(len(batches))):
            b = dist.item(rnd)
            if b < len(batches):
                x, y = data.get(batches[b])
                x = x.to(ctx.device).contiguous(memory_format=memory_format(ctx.device))
                work(b, batches[b], x, y.to(ctx.device))
            committer.flush()
            bar.update(sum(len(batches[i]) for i in range(rnd * dist.world, min(len(batches), (rnd + 1) * dist.world))))
        bar.close()

    rounds(f"{t.name} {proto.name}",
           lambda b, bid, x, y: _one_batch(ctx, t, b, bid, x, y, done, committed, committer))
    for spec in proto.attacks:
        if proto.attack_on(spec) != "sources":
            continue
        for src in sources:
            aid = f"{spec.id}@source={src}"
            if all(f"{aid}|b{b}" in done for b in range(len(batches))):
                continue
            ctx.set_cache = {}
            rounds(f"{t.name} <- {aid}",
                   lambda b, bid, x, y, spec=spec, src=src: _transfer_eval(ctx, t, spec, src, b, bid, x, y, done,
                                                                           committer))
    ctx.set_cache = {}


def _margin(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """z_y - max_{j != y} z_j of the model output (logits or log-probabilities)."""
    zy = out.gather(1, y.unsqueeze(1)).squeeze(1)
    other = out.scatter(1, y.unsqueeze(1), float("-inf")).max(1).values
    return zy - other


def _predict(ctx: Context, t: Target, x: torch.Tensor, seed_parts: tuple[Any, ...]) -> torch.Tensor:
    if t.randomized:
        torch.manual_seed(_derive_seed(*seed_parts))
    with torch.no_grad():
        return t.model(x)


def _one_batch(ctx: Context, t: Target, b: int, bid: list[int], x: torch.Tensor, y: torch.Tensor,
               done: set[str], committed: Any, committer: Committer) -> None:
    proto = ctx.proto
    member_attacks = [a for a in proto.attacks if proto.attack_on(a) == "members"]
    # clean (member rows too when the protocol crafts on members: the heatmap's sanity check)
    key = f"clean|b{b}"
    if key in done:
        rows_df = _committed_rows(committed, ["clean"], bid)
        rows_df = rows_df[rows_df["member"] == -1].set_index("sample")
        clean_ok = torch.tensor([bool(rows_df.loc[s, "correct"]) for s in bid], device=x.device)
    else:
        out = _predict(ctx, t, x, (proto.seed, "clean", b))
        clean_ok = out.argmax(-1) == y
        if proto.clean:
            mg = _margin(out, y)
            rows: list[Row] = [("clean", 0.0, s, -1, int(ok), float(m))
                               for s, ok, m in zip(bid, clean_ok.tolist(), mg.tolist())]
            if member_attacks:
                with torch.no_grad():
                    preds = _member_predictions(t.model, x)
                for j in range(preds.shape[0]):
                    rows += [("clean", 0.0, s, j, int(ok), None) for s, ok in zip(bid, (preds[j] == y).tolist())]
            committer.commit(key, rows)
    robust: dict[float, torch.Tensor] = {}

    def state(e: float) -> torch.Tensor:
        if e not in robust:
            robust[e] = torch.ones_like(clean_ok)  # clean errors are attacked too, as the reference does
        return robust[e]

    for spec in proto.attacks:
        on = proto.attack_on(spec)
        if on == "target":
            _target_attack(ctx, t, spec, b, bid, x, y, done, committed, committer, state)
        elif on == "members":
            _member_attack(ctx, t, spec, b, bid, x, y, done, committer)
        # transfer sets: a second pass (_batches_loop), one set group at a time


def _target_attack(ctx: Context, t: Target, spec: AttackSpec, b: int, bid: list[int], x: torch.Tensor,
                   y: torch.Tensor, done: set[str], committed: Any, committer: Committer,
                   state: Callable[[float], torch.Tensor]) -> None:
    proto = ctx.proto
    eps_list = proto.attack_eps(spec)
    ids, final = stored_ids(spec)
    key = f"{spec.id}|b{b}"
    if key in done:
        if ctx.early_stop:
            df = _committed_rows(committed, [final], bid)
            df = df[df["member"] == -1]
            for e in eps_list:
                sub = df[(df["eps"] - e).abs() < 1e-12].set_index("sample")
                ok = torch.tensor([bool(sub.loc[s, "correct"]) for s in bid], device=x.device)
                state(e).logical_and_(ok)
        return
    B = len(bid)
    fooled = {e: torch.ones(B, dtype=torch.bool, device=x.device) for e in eps_list}  # skipped: fooled before
    steps_ok = {k: {e: torch.zeros(B, dtype=torch.bool, device=x.device) for e in eps_list}
                for k in record_steps(spec)}
    targets = random_targets(spec, y, bid, t.dataset, proto.seed, t.data_options)
    t0 = time.perf_counter()
    for c, calls in enumerate(_pack_calls([state(e) for e in eps_list], proto.batch_size)):
        ei = torch.tensor([p[0] for p in calls], device=x.device)
        ii = torch.tensor([p[1] for p in calls], device=x.device)
        eps_t = torch.tensor(eps_list, dtype=x.dtype, device=x.device)[ei]
        core_kw: dict[str, Any] = {}
        if targets is not None:
            core_kw["targeted"] = targets[ii]
        whole = len(calls) == B and all(e == calls[0][0] and i == j for j, (e, i) in enumerate(calls))
        if whole and not t.randomized and continuous_streams(spec):
            # a whole batch at one eps: continue each restart's stream past the earlier batches
            core_kw["rng"] = restart_generators(spec, b * proto.batch_size * x[0].numel(), x.device)
        o = run_attack(spec, t.model, x[ii], y[ii], eps_t, randomized=t.randomized,
                       eot_samples=proto.eot_samples, seed_parts=(proto.seed, spec.id, b, c), core_kw=core_kw)
        ctx.stats["grad_passes"] += o.grad_passes
        ctx.stats["eval_passes"] += o.eval_passes
        if o.warnings:
            ctx.stats.setdefault("warnings", []).extend(o.warnings)
        for j, (e_idx, i) in enumerate(calls):
            e = eps_list[e_idx]
            fooled[e][i] = bool(o.fooled[j])
            for k in steps_ok:
                steps_ok[k][e][i] = bool(o.step_correct[k][j]) if k in o.step_correct else not bool(o.fooled[j])
    ctx.stats["attack_seconds"] += time.perf_counter() - t0
    rows: list[Row] = []
    for e in eps_list:
        for k, sid in ids:
            ok = (~fooled[e]) if k is None else steps_ok[k][e]
            rows += [(sid, float(e), s, -1, int(v), None) for s, v in zip(bid, ok.tolist())]
        if ctx.early_stop:
            state(e).logical_and_(~fooled[e])
    committer.commit(key, rows)
    ctx.stats["computed_keys"].append(key)


def random_targets(spec: AttackSpec, y: torch.Tensor, sample_ids: Sequence[int], dataset: str,
                   seed: int, data_options: dict[str, Any] | None = None) -> torch.Tensor | None:
    """Targets of ``targeted = 'random'`` PGD: (y + U{1..C-1}) mod C (Xie & Yuille; ImageNet-Adversarial-
    Training adv_model.py ``_create_random_target``), drawn per *sample id*, so every sample gets its own
    draw (not the same offsets in every batch) whatever the batching, packing, sharding or resume, and
    attacks with the same ``seed`` option (pgd2000 and pgd10 in xie-pgd2000) share their targets."""
    from robbench.data.base import get_info, seeded_generator

    p = spec.params_parsed
    if spec.attack != "pgd" or p is None or p.targeted != "random":
        return None
    c = get_info(dataset, data_options).num_classes
    shift = [int(torch.randint(1, c, (1,), generator=seeded_generator(seed, "random-target", p.seed, int(s))))
             for s in sample_ids]
    return (y + torch.tensor(shift, dtype=y.dtype, device=y.device)) % c


def continuous_streams(spec: AttackSpec) -> bool:
    """Whether restart r's random start can continue one generator over the sample batches, as DVERGE's
    eval_wbox.py does (``torch.manual_seed(r)`` once per eps and restart, then every batch): true when
    the init (L-inf uniform, one value per input element) is the generators' only use."""
    p = spec.params_parsed
    return (spec.attack == "pgd" and p is not None and p.init == "uniform" and p.norm == "linf"
            and p.di_prob == 0.0 and p.seed is not None)


def restart_generators(spec: AttackSpec, skip_elements: int, device: torch.device) -> list[torch.Generator]:
    """Generators seeded ``seed + r`` advanced past the init noise of the previous batches (drawing
    in chunks consumes the stream exactly as one draw: checked in the tests)."""
    p = spec.params_parsed
    gens = []
    for r in range(p.restarts):
        g = torch.Generator(device=device)
        g.manual_seed(int(p.seed) + r)
        left = skip_elements
        while left > 0:
            k = min(left, 1 << 22)
            torch.empty(k, device=device).uniform_(-1, 1, generator=g)
            left -= k
        gens.append(g)
    return gens


def _pack_calls(active: list[torch.Tensor], size: int) -> list[list[tuple[int, int]]]:
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


def _member_attack(ctx: Context, t: Target, spec: AttackSpec, b: int, bid: list[int], x: torch.Tensor,
                   y: torch.Tensor, done: set[str], committer: Committer) -> None:
    """DVERGE eval_transferability.py: examples crafted on member i (every restart separately) are
    tested on every member j and on the ensemble; fooled = fooled by any restart."""
    proto = ctx.proto
    members = _members(t.model)
    eps_list = proto.attack_eps(spec)
    if spec.attack not in PER_SAMPLE_EPS and len(eps_list) > 1:
        raise ConfigError(f"attack {spec.attack!r} takes one eps per call; give one eps per attack table",
                          file=proto.source_file, field=f"attacks.{spec.id}.eps")
    runs = spec.restarts_as_runs or 1
    seed0 = _param(spec.params_parsed, "seed", 0) or 0
    for i, mi in enumerate(members):
        aid = f"{spec.id}@source_member={i}"
        key = f"{aid}|b{b}"
        if key in done:
            continue
        B, E = len(bid), len(eps_list)
        xr = x.repeat(E, *([1] * (x.dim() - 1)))
        yr = y.repeat(E)
        eps_t = torch.tensor(eps_list, dtype=x.dtype, device=x.device).repeat_interleave(B)
        fooled = torch.zeros(len(members) + 1, E * B, dtype=torch.bool, device=x.device)
        t0 = time.perf_counter()
        for r in range(runs):
            params = _with(spec.params_parsed, seed=int(seed0) + r, restarts=1) if spec.restarts_as_runs else None
            params = params if params is not None else spec.params_parsed
            res = _make_attack(spec, params)(mi, xr, yr, eps_t if spec.attack in PER_SAMPLE_EPS else float(eps_list[0]))
            ctx.stats["grad_passes"] += int((getattr(res, "stats", {}) or {}).get("grad", 0))
            with torch.no_grad():
                preds = _member_predictions(t.model, res.x_adv)
                fooled[:-1] |= preds != yr.unsqueeze(0)
                fooled[-1] |= t.model(res.x_adv).argmax(-1) != yr
        ctx.stats["attack_seconds"] += time.perf_counter() - t0
        rows: list[Row] = []
        for j in list(range(len(members))) + [-1]:
            ok = (~fooled[j]).view(E, B)
            for ei, e in enumerate(eps_list):
                rows += [(aid, float(e), s, j, int(v), None) for s, v in zip(bid, ok[ei].tolist())]
        committer.commit(key, rows)
        ctx.stats["computed_keys"].append(key)


# -- transfer sets -----------------------------------------------------------------------------

def _set_fields(ctx: Context, spec: AttackSpec, src: str, src_sha: str, eps: float, t: Target,
                ids: list[int]) -> dict[str, Any]:
    from robbench.config import to_dict
    from robbench.evaluate.transfer import set_fields

    return set_fields(source=src, source_sha256=src_sha, attack=spec.attack, params=to_dict(spec.params_parsed),
                      norm=spec.norm or ctx.proto.norm, eps=eps, dataset=t.dataset, split=ctx.proto.samples.split,
                      sample_ids=ids, seed=ctx.proto.seed)


def _source_sets(ctx: Context, t: Target, data: Any, ids: list[int]) -> None:
    """Generate (or find in the cache) every transfer set, and store each source's own accuracy."""
    from robbench.evaluate import transfer

    proto, dist = ctx.proto, ctx.dist
    for src in proto.sources:
        specs = [a for a in proto.attacks if proto.attack_on(a) == "sources"]
        s = _load(src, ctx.runs_dir, ctx.device)
        if s.dataset != t.dataset:
            raise UserError(f"source {src} is a {s.dataset} model, target {t.name} a {t.dataset} model",
                            file=proto.source_file, field="sources")
        for spec in specs:
            fields = {e: _set_fields(ctx, spec, src, s.checkpoint_sha256, e, t, ids) for e in proto.attack_eps(spec)}
            keys = {e: transfer.set_key(f) for e, f in fields.items()}
            root = ctx.cache_root
            if not all(transfer.exists(k, root) for k in keys.values()):
                model = EOT(s.model, proto.eot_samples) if s.randomized else s.model
                fn = _make_attack(spec)

                def craft(xb: torch.Tensor, yb: torch.Tensor, eb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                    if spec.attack in PER_SAMPLE_EPS:
                        # ensure_sets stacks one copy of the batch per missing eps: tiles = that count, so
                        # each eps block draws the random start of a separate run at that eps and a set's
                        # content depends only on its key, not on the eps generated beside it
                        res = fn(model, xb, yb, eb, tiles=int(torch.unique(eb).numel()))
                    else:
                        res = fn(model, xb, yb, float(eb[0]))
                    ctx.stats["grad_passes"] += int((getattr(res, "stats", {}) or {}).get("grad", 0))
                    return res.x_adv, ~res.fooled

                def get_batch(bid: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
                    xb, yb = data.get(list(bid))
                    return xb.to(ctx.device), yb.to(ctx.device)

                _echo(ctx, f"generating transfer sets {spec.id} from {src} (eps {', '.join(map(str, keys))})")
                bar = _progress(ctx, len(ids) // dist.world, f"{src} {spec.id}")
                transfer.ensure_sets(fields, sample_ids=ids, get_batch=get_batch, craft=craft,
                                     batch_size=proto.batch_size, root=root, progress=bar.update,
                                     stats=ctx.stats, shard=(dist.rank, dist.world), assemble=not dist.enabled)
                bar.close()
                dist.barrier()
                if dist.enabled and dist.is_main:
                    transfer.ensure_sets(fields, sample_ids=ids, get_batch=get_batch, craft=craft,
                                         batch_size=proto.batch_size, root=root)
                dist.barrier()
            for e, k in keys.items():
                ctx.set_keys[(src, spec.id, e)] = k
        if dist.is_main:
            _store_source_accuracy(ctx, s, specs, ids)
        del s


def _store_source_accuracy(ctx: Context, s: Target, specs: list[AttackSpec], ids: list[int]) -> None:
    """Each source's accuracy on its own sets, under the source entry (protocol '<name>:source')."""
    from robbench.evaluate import transfer

    proto = ctx.proto
    run_id = ctx.store.start_run(s.name, s.checkpoint_sha256, f"{proto.name}:source", proto.sha256(),
                                 proto.overrides, proto.seed, {"role": "transfer source", "protocol": proto.name},
                                 force=False)
    if ctx.store.run(run_id)["status"] == "done":
        return
    done = ctx.store.done_batches(run_id)
    for spec in specs:
        for e in proto.attack_eps(spec):
            key = f"{spec.id}|eps={e}"
            if key in done:
                continue
            ts = transfer.load_set(ctx.set_keys[(s.name, spec.id, e)], root=ctx.cache_root, expect_ids=ids)
            ok = ts.source_correct.tolist()
            _, final = stored_ids(spec)
            ctx.store.write_batch(run_id, key, [(final, float(e), sid, -1, int(v), None) for sid, v in zip(ids, ok)])
    ctx.store.finish_run(run_id)


def _transfer_eval(ctx: Context, t: Target, spec: AttackSpec, src: str, b: int, bid: list[int], x: torch.Tensor,
                   y: torch.Tensor, done: set[str], committer: Committer) -> None:
    from robbench.evaluate import transfer

    proto = ctx.proto
    aid = f"{spec.id}@source={src}"
    key = f"{aid}|b{b}"
    if key in done:
        return
    eps_list = proto.attack_eps(spec)
    rows: list[Row] = []
    start = b * proto.batch_size
    cache = ctx.set_cache  # this set group's sets, loaded (and verified) once per target
    for e in eps_list:
        k = ctx.set_keys[(src, spec.id, e)]
        if k not in cache:
            cache[k] = transfer.load_set(k, root=ctx.cache_root, expect_ids=ctx.ids)
        ts = cache[k]
        sl = slice(start, start + len(bid))
        if ts.sample_ids[sl].tolist() != list(bid) or not torch.equal(ts.labels[sl], y.cpu()):
            raise UserError(f"transfer set {k[:12]}... is not aligned with batch {b} (sample ids or labels)",
                            file=str(ts.path), field="sample_ids")
        xa = ts.x_adv[sl].to(ctx.device)
        out = _predict(ctx, t, xa, (proto.seed, aid, e, b))
        ok = out.argmax(-1) == y
        mg = _margin(out, y)
        rows += [(aid, float(e), s, -1, int(v), float(m)) for s, v, m in zip(bid, ok.tolist(), mg.tolist())]
    committer.commit(key, rows)
    ctx.stats["computed_keys"].append(key)


# -- summary -----------------------------------------------------------------------------------

def _summary(ctx: Context, name: str, run_id: int, groups: dict[str, str]) -> None:
    from robbench.evaluate.aggregations import aggregate

    df = ctx.store.outcomes(run_id)
    if df.empty:
        return
    table = aggregate(ctx.proto.aggregation, df, groups)
    eps_cols = sorted(table["eps"].unique())
    click.echo(f"\n{name} - {ctx.proto.name} ({ctx.proto.aggregation}, n={int(table['n'].max())}, run {run_id})")
    head = f"{'attack':34s} {'member':>6s} " + " ".join(f"{e:>7.4g}" for e in eps_cols)
    click.echo(head)
    for (attack, member), g in table.groupby(["attack", "member"], sort=False):
        vals = {float(e): a for e, a in zip(g["eps"], g["accuracy"])}
        cells = " ".join(f"{100 * vals[e]:6.1f}%" if e in vals else f"{'':>7s}" for e in eps_cols)
        click.echo(f"{str(attack)[:34]:34s} {int(member):>6d} {cells}")
