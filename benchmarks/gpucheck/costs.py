"""The projection sections: measure the per-step and per-image costs the papers' work needs, then total it.

``projection_costs`` builds the plan (:func:`gpucheck.projection.make_plan` over robbench's loaders), takes
the costs already measured by the throughput section, measures the missing ones (largest work first, each
entry's own model and method on synthetic data of its own geometry, batch capped for large images and
scaled), and estimates the rest. ``projection`` totals the plan at those costs.
"""
from __future__ import annotations

import functools
import re
import time
import tomllib
from typing import Any

import torch

from gpucheck import fixtures as fx
from gpucheck import projection as pj
from gpucheck import speed


class Keys:
    """The cost keys of :mod:`gpucheck.speed`, as :func:`gpucheck.projection.make_plan` calls them."""

    @staticmethod
    def train(e: Any) -> str:
        return speed.train_key(e)

    @staticmethod
    def model(e: Any, members: int | None, plain: bool) -> str:
        return speed.model_key(e, members, plain)


def _info(e: Any) -> Any:
    from robbench.data import get_info

    return get_info(e.data.dataset, e.data.options)


_RANDOMIZED: dict[str, bool] = {}


def _randomized(run: pj.Run) -> bool:
    """Whether a run's model draws randomness in its forward (EIO's random gated network), found once per
    model kind by building it on the meta device (no memory). Only a model transform makes a robbench model
    random (the architectures are deterministic), so models without one, and plain derived paths, are not
    built: building all ~30 model kinds costs more than the rest of the plan."""
    if run.plain or not run.entry.model.transform:
        return False
    key = Keys.model(run.entry, run.members, run.plain)
    if key not in _RANDOMIZED:
        from robbench.models import build_model

        e = run.entry
        _RANDOMIZED[key] = False
        try:
            with torch.device("meta"):
                model = build_model(e, _info(e))
            _RANDOMIZED[key] = any(bool(getattr(m, "randomized", False)) for m in model.modules())
        except Exception:  # a model that does not build here: its eval counts assume a deterministic one
            pass
    return _RANDOMIZED[key]


@functools.lru_cache(maxsize=1)
def load_plan() -> tuple[pj.Plan, dict[str, str]]:
    """The plan of every paper's work (built once per process)."""
    from robbench.config import list_protocols
    from robbench.errors import UserError
    from robbench.evaluate.protocol import load_protocol
    from robbench.paths import PROTOCOLS_DIR

    entries = {n: e for n, e, _ in fx.zoo_entries() if e is not None}
    errors = {n: err for n, e, err in fx.zoo_entries() if e is None}
    protocols: dict[str, Any] = {}
    for name in list_protocols():
        try:
            protocols[name] = load_protocol(name)
        except UserError as e:
            protocols[name] = str(e)
    views: dict[str, list[Any]] = {"view": [], "training_time": []}
    for f in sorted((PROTOCOLS_DIR / "reference" / "views").glob("*.toml")):
        with open(f, "rb") as fh:
            part = tomllib.load(fh)
        for key in views:
            views[key].extend(part.get(key, []))
    plan = pj.make_plan(entries, views.get("view", []), views.get("training_time", []), protocols, _info, Keys,
                        _randomized)
    return plan, errors


def _measured_train(sec: Any) -> dict[str, dict[str, Any]]:
    rows = sec.data("method_throughput").get("rows") or {}
    return {r["train_key"]: {"seconds_per_step": r["seconds_per_step"], "batch": r["batch"],
                             "source": "measured (throughput section)"}
            for r in rows.values() if r.get("status") == "ok" and r.get("train_key")}


def projection_costs(sec: Any) -> dict[str, Any]:
    o = sec.options
    t = time.monotonic()
    plan, entry_errors = load_plan()
    plan_s = time.monotonic() - t
    measured_train = _measured_train(sec)
    train_need: dict[str, tuple[str, float]] = {}   # key -> (entry, weight = steps)
    model_need: dict[str, tuple[tuple[str, int | None, bool], float]] = {}
    for w in plan.work.values():
        if w.kind == "train":
            name, weight = train_need.get(w.key, (w.recipe[0], 0.0))
            train_need[w.key] = (name, weight + w.steps)
            r, wt = model_need.get(w.model_key, ((w.recipe[0], None, False), 0.0))
            model_need[w.model_key] = (r, wt + w.epochs * w.test_fwd_per_epoch / 3)
        else:
            r, wt = model_need.get(w.key, (w.recipe, 0.0))
            model_need[w.key] = (r, wt + w.grad_mi + w.fwd_mi / 3)
    train_costs: dict[str, Any] = {k: v for k, v in measured_train.items() if k in train_need}
    model_costs: dict[str, Any] = {}
    failures: list[str] = []
    limit = 2 if o.quick else 10_000

    # model costs first (cheap: a few attack steps each, at most 40% of what is left), then the training
    # steps; both largest work first
    model_until = time.monotonic() + 0.4 * sec.left()
    for key, ((base, members, plain), _) in sorted(model_need.items(), key=lambda kv: _priority(kv, o))[:limit]:
        if time.monotonic() > model_until or sec.left() < 4:
            break
        try:
            e = _entry_for(base, o)
            model_costs[key] = {**speed.model_costs(e, o.device, o.cost_batch, max(2, o.reps // 2),
                                                    time.monotonic() + 5, members, plain),
                                "source": "measured" + _scaled_note(e, base, o)}
            _scale_quick(model_costs[key], e, base, o, ("grad_s_per_member_image", "fwd_s_per_member_image"))
        except Exception as ex:
            failures.append(f"model {base} x{members} plain={plain}: {type(ex).__name__}: {str(ex)[:200]}")
    todo = [(k, v) for k, v in sorted(train_need.items(), key=lambda kv: _priority(kv, o)) if k not in train_costs]
    for key, (base, _) in todo[:limit]:
        if sec.left() < 4:
            break
        try:
            e = _entry_for(base, o, train=True)
            rec = speed.measure_step(e, o.device, reps=max(2, o.reps // 2), deadline=time.monotonic() + 8)
            rec["source"] = "measured" + _scaled_note(e, base, o)
            _scale_quick(rec, e, base, o, ("seconds_per_step",))
            train_costs[key] = rec
        except Exception as ex:
            failures.append(f"train {base}: {type(ex).__name__}: {str(ex)[:200]}")
    estimated = {"train": 0, "model": 0}
    measured_steps = {**measured_train, **train_costs}  # estimates scale measured costs only
    for key in train_need:
        if key not in train_costs and (est := pj.estimate_train(key, measured_steps)):
            train_costs[key] = est
            estimated["train"] += 1
    measured_models = dict(model_costs)
    for key in model_need:
        if key not in model_costs and (est := pj.estimate_model(key, measured_models)):
            model_costs[key] = est
            estimated["model"] += 1
    return {"plan_seconds": round(plan_s, 2), "work_units": len(plan.work), "train_keys": len(train_need),
            "model_keys": len(model_need), "train_measured": sum(1 for c in train_costs.values() if c["source"].startswith("measured")),
            "model_measured": len(measured_models), "estimated": estimated,
            "unpriced": {"train": sorted(set(train_need) - set(train_costs)), "model": sorted(set(model_need) - set(model_costs))},
            "failures": failures, "zoo_entries_not_loaded": entry_errors, "plan_notes": plan.notes,
            "train_costs": train_costs, "model_costs": model_costs}


def _priority(item: tuple[str, tuple[Any, float]], o: Any) -> tuple[bool, float]:
    """Largest work first; in quick mode small models first (a quick run prices a few of them only)."""
    key, (_, weight) = item
    return (o.quick and re.search(r"resnet20\b", key) is None, -weight)


def _entry_for(base: str, o: Any, train: bool = False) -> Any:
    """``base`` on synthetic data of its own geometry (quick: the check's geometry), batch capped."""
    from robbench.config import load_entry

    real = load_entry(base)
    g = o.geometry if o.quick else fx.geometry_of(real)
    batch = real.data.batch_size if train else o.cost_batch
    if train:
        cap = o.batch if o.quick else (512 if g.side <= 32 else 64)
        batch = min(batch, cap)
    return fx.synthetic_entry(base, g, batch=batch, n_test=max(256, o.cost_batch))


def _scaled_note(e: Any, base: str, o: Any) -> str:
    from robbench.config import load_entry

    real, g = load_entry(base), fx.geometry_of(e)
    notes = []
    if fx.geometry_of(real).side != g.side:
        notes.append(f"at {g.side}x{g.side}, scaled by pixels to {fx.geometry_of(real).side}x{fx.geometry_of(real).side}")
    if e.data.batch_size != real.data.batch_size:
        notes.append(f"at batch {e.data.batch_size} (entry: {real.data.batch_size}), scaled linearly")
    return f" ({'; '.join(notes)})" if notes else ""


def _scale_quick(rec: dict[str, Any], e: Any, base: str, o: Any, fields: tuple[str, ...]) -> None:
    from robbench.config import load_entry

    real_side, side = fx.geometry_of(load_entry(base)).side, fx.geometry_of(e).side
    if real_side != side:
        for f in fields:
            rec[f] = rec[f] * (real_side / side) ** 2


def projection(sec: Any) -> dict[str, Any]:
    costs = sec.data("projection_costs")
    plan, _ = load_plan()
    tc, mc = costs.get("train_costs") or {}, costs.get("model_costs") or {}
    out = pj.summarize(plan, tc, mc)
    out["comparison"] = pj.paper_comparison(plan, tc, mc)
    out["device"] = str(sec.options.device)
    out["representative"] = not sec.options.quick
    return out
