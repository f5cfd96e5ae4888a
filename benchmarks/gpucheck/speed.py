"""Speed sections: images/s of each registered method's training step, loop vs vmap, memory formats, and
PGD-50x5 white-box and one transfer-set generation through the evaluation engine.

Every time is the median of repetitions after a warm-up, each followed by a device synchronisation
(:mod:`gpucheck.timing`). Variants compared with each other are timed interleaved in one process.
The measured costs are also what :mod:`gpucheck.projection` multiplies by the zoo's step counts.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from gpucheck import fixtures as fx
from gpucheck.timing import sync, timed, timed_interleaved

# DVERGE appendix A, Table 1 ("Training time comparison on a single TITAN XP GPU. All times are evaluated
# for training a ResNet-20 ensemble with 3 sub-models for 200 epochs"), as ratios to the baseline's 1.0 h.
PAPER_TABLE1_RATIO = {"baseline": 1.0, "adp": 2.0, "gal": 7.5, "advt": 11.5, "dverge": 10.5}


def _peak_mb(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def measure_step(entry: Any, device: torch.device, *, reps: int, deadline: float, memory_format: str = "auto",
                 batch: int | None = None) -> dict[str, Any]:
    """Seconds per training step of ``entry`` (already on synthetic data) at its batch size."""
    g = fx.geometry_of(entry)
    n = batch or entry.data.batch_size
    model, fmt = fx.build(entry, device, memory_format)
    ctx, method = fx.method_context(entry, model, device, fmt)
    b = fx.random_batch(g, n, method.streams, device, fmt, seed=5)
    _reset_peak(device)
    t = timed(fx.step_fn(ctx, method, b), device, reps=reps, warmup=1, deadline=deadline)
    rec = {"seconds_per_step": t["median_s"], "img_per_s": n / t["median_s"], "batch": n, "reps": t["reps"],
           "warmup_s": t["warmup_s"], "memory_format": fmt.name, "peak_mem_mb": _peak_mb(device)}
    layer = getattr(method, "layer", None)
    if isinstance(layer, int) and layer:
        rec["distill_layer"] = layer
    del model, ctx, method, b
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rec


def method_entry(method: str, g: fx.Geometry, batch: int, skip: int = 0) -> tuple[Any | None, str]:
    """(entry on synthetic data, its name) for ``method``: the ``skip``-th of its zoo entries, best first
    (:func:`gpucheck.fixtures.representative_entries`); a method no zoo entry uses is tried on the
    ResNet-20 x3 baseline entry with its default options. (None, reason) when there is nothing to try."""
    reps = fx.representative_entries(method)
    if skip < len(reps):
        return fx.synthetic_entry(reps[skip], g, batch=batch), reps[skip]
    if reps or skip > 0:
        return None, "no further zoo entry uses it"
    return (fx.synthetic_entry("baseline_resnet20_x3", g, batch=batch, extra=[f"train.method={method}", "train.params={}"]),
            f"baseline_resnet20_x3 with train.method={method} (no zoo entry uses it)")


MAX_TRIES = 3  # entries tried per method: some need a prerequisite run first (EED's team needs a selection)


def method_throughput(sec: Any) -> dict[str, Any]:
    """Images/s of one training step of every method in robbench.registry.METHODS (discovered when the
    check runs, so methods added later are measured too), each on its representative zoo entry's model
    on synthetic data of the check's geometry and batch."""
    from robbench.registry import METHODS

    o = sec.options
    names = METHODS.names()
    order = [m for m in ("baseline", "adp", "gal", "dverge", "advt", "dverge_advt", "eio") if m in names]
    order += [m for m in names if m not in order]
    rows: dict[str, Any] = {}
    for i, name in enumerate(order):
        left = sec.left()
        if left < 2:
            rows[name] = {"status": "skipped: section budget spent"}
            continue
        # each method gets an equal share of what is left, so a slow one cannot starve the rest
        share = left / (len(order) - i)
        rows[name] = _measure_method(name, o, time.monotonic() + share)
    base = rows.get("baseline", {}).get("seconds_per_step")
    for name, r in rows.items():
        if base and r.get("seconds_per_step"):
            r["ratio_to_baseline"] = r["seconds_per_step"] / base
        if name in PAPER_TABLE1_RATIO:
            r["paper_table1_ratio"] = PAPER_TABLE1_RATIO[name]
    return {"geometry": dataclasses.asdict(o.geometry), "batch": o.batch, "device": str(o.device), "rows": rows}


def _measure_method(name: str, o: Any, deadline: float) -> dict[str, Any]:
    """The first of the method's entries (up to MAX_TRIES) whose step runs; the others' errors are kept."""
    from gpucheck.runner import traceback_tail

    from robbench.errors import UserError

    tried: list[str] = []
    unmet: list[str] = []  # user-level preconditions (a run or selection to do first): not a bug
    for k in range(MAX_TRIES):
        label = (fx.representative_entries(name)[k:k + 1] or [name])[0]
        try:
            entry, source = method_entry(name, o.geometry, o.batch, skip=k)
            if entry is None:
                break
            rec = measure_step(entry, o.device, reps=o.reps, deadline=deadline)
        except UserError as e:
            unmet.append(f"{label}: {str(e).splitlines()[0]}")
            continue
        except Exception as e:  # one entry's failure is its row's, not the table's
            tried.append(f"{label}: " + traceback_tail(e, 4))
            if time.monotonic() > deadline:
                break
            continue
        rec.update({"status": "ok", "entry": source, "model": fx.describe_model(entry), "train_key": train_key(entry)})
        if tried or unmet:
            rec["entries_that_failed"] = tried + unmet
        return rec
    if tried:
        return {"status": "failed: " + tried[0], "entries_that_failed": tried + unmet}
    if unmet:
        return {"status": "skipped: " + unmet[0], "entries_that_failed": unmet}
    return {"status": "skipped: no zoo entry uses it and none could be built"}


# ---------------------------------------------------------------------------------------------- keys
def _method_ints(entry: Any) -> list[Any]:
    """Method options that change the work of a step: the integer, boolean and string ones (steps, layer,
    paths, phase, flags). Floats (eps, step sizes, loss weights) change numbers, not work."""
    from robbench.config import to_dict

    p = to_dict(entry.method_params) if entry.method_params is not None else dict(entry.train.params)
    return sorted((k, v) for k, v in p.items() if isinstance(v, (bool, int, str)) and not isinstance(v, float))


def model_key(entry: Any, members: int | None = None, plain: bool = False) -> str:
    """What the cost of one forward/backward of the entry's model depends on (``plain``: the transform
    removed, as for a path derived from a random gated network)."""
    m = entry.model
    g = fx.geometry_of(entry)
    return json.dumps([m.arch, members or m.members, m.width, None if plain else (m.transform or None),
                       None if plain else m.transform_options, m.norm_layer, m.activation, m.options,
                       [g.side, g.channels, g.classes]], sort_keys=True, default=str)


def train_key(entry: Any) -> str:
    """What the cost of one training step depends on: the model, the method and its work options, the batch."""
    return json.dumps([entry.train.method, model_key(entry), _method_ints(entry), entry.data.batch_size],
                      sort_keys=True, default=str)


# ---------------------------------------------------------------------------------------------- attack steps
def _attack_step(ens: Any, x: torch.Tensor, y: torch.Tensor) -> None:
    xx = x.detach().clone().requires_grad_(True)
    torch.autograd.grad(F.nll_loss(ens(xx), y), xx)


def model_costs(entry: Any, device: torch.device, batch: int, reps: int, deadline: float,
                members: int | None = None, plain: bool = False) -> dict[str, Any]:
    """Seconds per member-image of an attack gradient (eval forward + input gradient, frozen weights) and
    of an eval forward, on the default execution path (vmap on CUDA, loop on CPU)."""
    from robbench.models import Ensemble

    spec = entry
    if members is not None or plain:
        ov = list(entry.overrides) + ([f"model.members={members}"] if members is not None else [])
        ov += ['model.transform=""'] if plain else []
        from robbench.config import load_entry

        spec = load_entry(entry.source, ov)
    model, fmt = fx.build(spec, device)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    ens = model if isinstance(model, Ensemble) else Ensemble([model])
    m = ens.num_members
    x, y = fx.random_images(fx.geometry_of(spec), batch, seed=6)
    x, y = fmt.prepare(x.to(device)), y.to(device)
    tg = timed(lambda: _attack_step(ens, x, y), device, reps=reps, deadline=deadline)

    def fwd() -> None:
        with torch.no_grad():
            ens(x)

    tf = timed(fwd, device, reps=reps, deadline=deadline)
    return {"grad_s_per_member_image": tg["median_s"] / (batch * m), "fwd_s_per_member_image": tf["median_s"] / (batch * m),
            "batch": batch, "members": m, "memory_format": fmt.name, "randomized": _randomized(model)}


def _randomized(model: Any) -> bool:
    return any(bool(getattr(mod, "randomized", False)) for mod in model.modules())


def loop_vs_vmap(sec: Any) -> dict[str, Any]:
    """An attack step (eval forward + input gradient, frozen weights) and an eval forward of ResNet-20
    ensembles, members looped vs batched with vmap; interleaved. > 1 means vmap is faster."""
    from robbench.models import Ensemble

    o = sec.options
    rows = []
    for k in ((3,) if o.quick else (3, 5, 8)):
        if sec.left() < 2:
            rows.append({"members": k, "status": "skipped: section budget spent"})
            continue
        entry = fx.synthetic_entry("baseline_resnet20_x3", o.geometry, batch=o.batch, extra=[f"model.members={k}"])
        model, fmt = fx.build(entry, o.device)
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        loop = Ensemble(model.members, combine=model.combine, batched=False)
        vm = Ensemble(model.members, combine=model.combine, batched=True)
        x, y = fx.random_images(o.geometry, o.batch, seed=7)
        x, y = fmt.prepare(x.to(o.device)), y.to(o.device)

        def fwd(ens: Any) -> Any:
            def run() -> None:
                with torch.no_grad():
                    ens(x)
            return run

        t = timed_interleaved({"loop_grad": lambda: _attack_step(loop, x, y), "vmap_grad": lambda: _attack_step(vm, x, y),
                               "loop_fwd": fwd(loop), "vmap_fwd": fwd(vm)}, o.device, reps=o.reps,
                              deadline=min(sec.deadline, time.monotonic() + sec.left() / 2))
        row = {"members": k, "batch": o.batch, "memory_format": fmt.name, "status": "ok",
               "vmap_fell_back": bool(getattr(vm, "_vmap_failed", False))}
        for name, rec in t.items():
            row[f"{name}_img_per_s"] = o.batch / rec["median_s"]
        row["grad_loop_over_vmap"] = t["loop_grad"]["median_s"] / t["vmap_grad"]["median_s"]
        row["fwd_loop_over_vmap"] = t["loop_fwd"]["median_s"] / t["vmap_fwd"]["median_s"]
        rows.append(row)
    from robbench.device import use_vmap

    return {"device": str(o.device), "robbench_default": "vmap" if use_vmap(o.device) else "loop", "rows": rows}


def memory_formats(sec: Any) -> dict[str, Any]:
    """A baseline training step and an attack step of ResNet-20 x3 in channels_last vs contiguous
    (forced), interleaved; channels_last is timed only where robbench's check found it correct."""
    from robbench.memformat import choose_memory_format

    o = sec.options
    entry = fx.synthetic_entry("baseline_resnet20_x3", o.geometry, batch=o.batch)
    probe, _ = fx.build(entry, o.device, "contiguous")
    auto = choose_memory_format(probe, o.geometry.shape, o.device, "auto", what=entry.name)
    data: dict[str, Any] = {"auto_choice": auto.as_record(), "batch": o.batch}
    if auto.name != "channels_last":
        data["status"] = f"channels_last not timed: robbench's check rejects it here ({auto.reason})"
        return data
    fns: dict[str, Any] = {}
    for name in ("channels_last", "contiguous"):
        model, fmt = fx.build(entry, o.device, name)
        ctx, method = fx.method_context(entry, model, o.device, fmt)
        b = fx.random_batch(o.geometry, o.batch, method.streams, o.device, fmt, seed=8)
        fns[f"train_{name}"] = fx.step_fn(ctx, method, b)
        ev, fmt2 = fx.build(entry, o.device, name)
        ev.eval()
        for p in ev.parameters():
            p.requires_grad_(False)
        x, y = fx.random_images(o.geometry, o.batch, seed=9)
        xx, yy = fmt2.prepare(x.to(o.device)), y.to(o.device)
        fns[f"attack_{name}"] = (lambda e=ev, a=xx, c=yy: _attack_step(e, a, c))
    t = timed_interleaved(fns, o.device, reps=o.reps, deadline=sec.deadline)
    for k, rec in t.items():
        data[f"{k}_img_per_s"] = o.batch / rec["median_s"]
    data["train_channels_last_speedup"] = t["train_contiguous"]["median_s"] / t["train_channels_last"]["median_s"]
    data["attack_channels_last_speedup"] = t["attack_contiguous"]["median_s"] / t["attack_channels_last"]["median_s"]
    return data


# ---------------------------------------------------------------------------------------------- engine
def _fake_runs(root: Path, names: list[str], g: fx.Geometry, n_test: int) -> dict[str, Any]:
    """Complete runs with seeded random weights (no training: the engine's cost does not depend on the
    weights' values) on synthetic data of geometry ``g``; returns {name: entry}."""
    from robbench.checkpoint import RunDir
    from robbench.data import get_info
    from robbench.models import build_model

    out = {}
    for i, name in enumerate(names):
        e = fx.synthetic_entry(name, g, n_test=n_test)
        torch.manual_seed(100 + i)
        RunDir(root, e.name).save_final(build_model(e, get_info(e.data.dataset, e.data.options)), e)
        out[name] = e
    return out


def _engine_protocol(name: str, o: Any, n: int, eps: list[float], batch: int, extra: list[str] = ()) -> Any:
    """The protocol as shipped, retargeted to synthetic data with ``n`` samples ('first'), no early stop
    (every restart of every sample runs: the full cost), and in quick mode fewer steps."""
    from robbench.evaluate.protocol import load_protocol

    ov = ['datasets=["synthetic"]', "applies_to.papers=[]", "applies_to.datasets=[]", "applies_to.tags=[]",
          "applies_to.exclude_tags=[]", 'samples.selection="first"', "early_stop=false", *extra]
    proto = load_protocol(name, ov, n=n, eps=eps, batch_size=batch)
    for a in proto.attacks:
        p = a.params_parsed
        if p is None:
            continue
        changes: dict[str, Any] = {}
        names = {f.name for f in dataclasses.fields(p)}
        if "early_stop" in names:
            changes["early_stop"] = False
        if o.quick and "steps" in names:
            changes["steps"] = min(p.steps, 3)
            if "record_steps" in names:
                changes["record_steps"] = [s for s in p.record_steps if s <= 3]
        if o.quick and "restarts" in names:
            changes["restarts"] = min(p.restarts, 2)
        a.params_parsed = dataclasses.replace(p, **changes)
    return proto


def _grad_steps(proto: Any) -> int:
    """Gradient steps per sample and eps summed over the protocol's attacks (no early stop)."""
    total = 0
    for a in proto.attacks:
        p = a.params_parsed
        total += int(getattr(p, "steps", 1)) * int(getattr(p, "restarts", 1))
    return total


def pgd_whitebox(sec: Any) -> dict[str, Any]:
    """DVERGE's white-box attack (protocols/dverge-whitebox.toml: PGD-50, step eps/5, 5 random starts) on a
    ResNet-20 x3 through robbench.evaluate.evaluate_protocol, every restart on every sample."""
    from robbench.evaluate.engine import evaluate_protocol

    o = sec.options
    tmp = o.tmp / "pgd"
    n, batch = o.pgd_n, o.pgd_batch
    runs = _fake_runs(tmp / "runs", ["dverge_resnet20_x3"], o.geometry, n_test=max(n, 16))
    proto = _engine_protocol("dverge-whitebox", o, n, [0.03], batch)
    steps = _grad_steps(proto)
    members = runs["dverge_resnet20_x3"].model.members
    est = _estimate(sec, n * steps * members)
    if est is not None and est > 0.8 * sec.left() and n > batch:  # keep within the budget: one batch
        n = batch
        proto = _engine_protocol("dverge-whitebox", o, n, [0.03], batch)
    t = time.monotonic()
    ids = evaluate_protocol(proto, ["dverge_resnet20_x3"], device=str(o.device), runs_dir=tmp / "runs",
                            db=tmp / "results.db", cache_root=tmp / "cache", data_root=tmp / "data", quiet=True)
    sync(o.device)
    seconds = time.monotonic() - t
    passes = n * steps * members
    p = proto.attacks[0].params_parsed
    return {"attack": f"pgd steps={p.steps} restarts={p.restarts} rel_step={p.rel_step}", "n": n, "eps": [0.03],
            "batch": batch, "members": members, "seconds": seconds, "run_ids": ids,
            "sample_steps_per_s": n * steps / seconds, "grad_member_images": passes,
            "grad_s_per_member_image": seconds / passes, "estimate_before_s": est,
            "note": "includes the engine's clean pass, sample selection and store writes; seeded random weights"}


def _estimate(sec: Any, member_image_grads: int) -> float | None:
    """Seconds a workload of attack gradients should take, from the loop-vs-vmap section (None if absent)."""
    rows = sec.data("loop_vs_vmap").get("rows") or []
    r = next((r for r in rows if r.get("members") == 3 and r.get("status") == "ok"), None)
    if r is None:
        return None
    best = max(r.get("loop_grad_img_per_s", 0.0), r.get("vmap_grad_img_per_s", 0.0))
    return None if best <= 0 else member_image_grads / (best * 3) * 1.5


def transfer_set(sec: Any) -> dict[str, Any]:
    """One transfer set of protocols/dverge-blackbox.toml (its first attack, M-PGD-100 CE, every eps) from a
    hold-out baseline x3 to a DVERGE x3 through the engine: the first target generates and caches the
    sets, a second target only reads them, so generation = first - second."""
    from robbench.evaluate.engine import evaluate_protocol

    o = sec.options
    tmp = o.tmp / "transfer"
    n, batch = o.transfer_n, o.pgd_batch
    src = "baseline_resnet20_x3_holdout"
    targets = ["dverge_resnet20_x3", "adp_resnet20_x3"]
    runs = _fake_runs(tmp / "runs", [src, *targets], o.geometry, n_test=max(n, 16))
    eps = [0.01, 0.03] if o.quick else None
    proto = _engine_protocol("dverge-blackbox", o, n, eps, batch, extra=[f'sources=["{src}"]'])
    proto.attacks = proto.attacks[:1]
    e_list = proto.attack_eps(proto.attacks[0])
    times = []
    for tgt in targets:
        t = time.monotonic()
        evaluate_protocol(proto, [tgt], device=str(o.device), runs_dir=tmp / "runs", db=tmp / "results.db",
                          cache_root=tmp / "cache", data_root=tmp / "data", quiet=True)
        sync(o.device)
        times.append(time.monotonic() - t)
    steps = _grad_steps(proto)
    members = runs[src].model.members
    passes = n * len(e_list) * steps * members
    # first target = generation + evaluation, second = evaluation only (the sets come from the cache)
    gen = times[0] - times[1] if times[0] > times[1] else None
    p = proto.attacks[0].params_parsed
    return {"attack": f"{proto.attacks[0].id}: pgd steps={p.steps} momentum={p.momentum} loss={p.loss}",
            "source": src, "n": n, "eps": e_list, "batch": batch, "first_target_s": times[0],
            "second_target_s": times[1], "generation_s": gen, "grad_member_images": passes,
            "grad_s_per_member_image": None if gen is None else gen / passes,
            "note": None if gen is not None else "generation not separable: the engine's fixed costs dominate",
            "sets_on_disk": len(list((tmp / "cache").glob("*/adv.safetensors")))}
