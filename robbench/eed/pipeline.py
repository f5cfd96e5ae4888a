"""EED end to end in one process (Alg. 1): the AT base, the 12 pruned sub-models, their PGD-20
evaluation, the robust-diversity selection from the results store, the selected team's joint training,
and both deployments of the team (DIE and the full mean) evaluated and costed.

``python -m robbench.eed.pipeline --prefix demo_eed`` runs it on digits (the entries ``demo_eed_at``,
``demo_eed_{nis,erm,ase,bnsf}_{0,1,2}{_prune,}``, ``demo_eed_team``, ``demo_eed_team_mean`` and the protocol
``demo-eed``). Every step skips finished work (complete runs, done protocol runs), so a rerun resumes.

The team entry names its members (``train.params.team``, ``model.options.size``). When the selection
chooses other members than the entry names (another machine's floating point can flip a boundary
sample), the team is trained with the selection as ``--set`` overrides, recorded in its manifest, and
the pipeline says so. Written beside the results store: ``<prefix>_selection.json`` (every team's RD,
the threshold and the choice) and ``<prefix>_summary.json`` (accuracies, costs, speed-ups); the team's
cost is also stored as run meta ``eed_cost`` of its evaluation run.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from robbench.eed.pool import selection_path
from robbench.eed.select import SCORES, pool_entries

ATTACK = "pgd20"  # the attack id of demo-eed and eed-suite that RD is computed from


def summary_path(db: str | Path, prefix: str) -> Path:
    return Path(db).parent / f"{prefix}_summary.json"


def team_overrides(team_entry: str, members: Sequence[str]) -> list[str]:
    """``--set`` overrides that make ``team_entry`` train ``members`` (none when it already names them)."""
    from robbench.config import load_entry

    e = load_entry(team_entry)
    size = int(e.model.options.get("size", 0))
    if list(e.method_params.team) == list(members) and size == len(members):
        return []
    return [f"model.options.size={len(members)}", f"train.params.team={json.dumps(list(members))}"]


def _accuracies(store: Any, protocol: str, entries: Sequence[str]) -> dict[str, dict[str, float]]:
    """{entry: {'clean': acc, 'pgd20': acc}} of each entry's latest done run of ``protocol``."""
    out: dict[str, dict[str, float]] = {}
    for name in entries:
        df = store.outcomes(entry=name, protocol=protocol, member=-1, status="done")
        if df.empty:
            continue
        df = df[df["run_id"] == df["run_id"].max()]
        out[name] = {str(a): float(g["correct"].mean()) for a, g in df.groupby("attack")}
    return out


def _say(msg: str) -> None:
    print(f"[eed] {msg}", file=sys.stderr, flush=True)


def run_pipeline(prefix: str = "demo_eed", protocol: str = "demo-eed", *, runs_dir: str | Path | None = None,
                 db: str | Path | None = None, device: str | None = None, data_root: str | Path | None = None,
                 memory_format: str = "auto", overrides: Sequence[str] | Callable[[str], list[str]] = (),
                 n: int | None = None, scores: Sequence[str] = SCORES, subsets: Sequence[int] = (0, 1, 2),
                 baselines: Sequence[str] = (), fresh: bool = False,
                 say: Callable[[str], None] = _say) -> dict[str, Any]:
    """Run every step (see the module docstring); returns the summary record.

    ``overrides`` are ``--set`` values for every trained entry, or a function of the entry name giving
    them (e.g. a smaller test size); the full-mean deployment (0 epochs, the team's weights) gets all of
    them but ``train.epochs``. ``scores`` and ``subsets`` pick part of the pool (EED: all 4 x 3).
    ``baselines`` names single-model baselines at the pool's sparsity (e.g. 'hydra': ``<prefix>_hydra_prune``
    then ``<prefix>_hydra``), trained, evaluated and costed beside the pool."""
    from robbench.checkpoint import load_trained
    from robbench.data import get_info, load_split
    from robbench.eed.cost import die_sweep, network_cost, speedup, team_cost
    from robbench.eed.pool import select_from_store, write_selection
    from robbench.evaluate.engine import evaluate_protocol
    from robbench.paths import results_db, runs_dir as default_runs_dir
    from robbench.store import Store
    from robbench.train.run import train_entry

    runs = Path(runs_dir) if runs_dir is not None else default_runs_dir()
    store_path = Path(db) if db is not None else results_db()
    def over(name: str) -> list[str]:
        return list(overrides(name)) if callable(overrides) else list(overrides)

    kw: dict[str, Any] = dict(device=device, runs_dir=runs, data_root=data_root, progress=False, fresh=fresh,
                              memory_format=memory_format)
    ev: dict[str, Any] = dict(n=n, device=device, runs_dir=runs, db=store_path, data_root=data_root, quiet=True,
                              memory_format=memory_format)
    t0 = time.perf_counter()
    times: dict[str, float] = {}

    def mark(step: str) -> None:
        times[step] = round(time.perf_counter() - t0, 1)
        say(f"{step} done at {times[step]:.0f}s")

    base, pool = f"{prefix}_at", pool_entries(prefix, scores, subsets)
    team_name, mean_name = f"{prefix}_team", f"{prefix}_team_mean"
    train_entry(base, over(base), **kw)
    singles = [f"{prefix}_{b}" for b in baselines]
    for name in [*pool, *singles]:
        train_entry(f"{name}_prune", over(f"{name}_prune"), **kw)
        train_entry(name, over(name), **kw)
    mark("train base and pool")

    pool_eval_ids = evaluate_protocol(protocol, [base, *pool, *singles], **ev)
    mark(f"evaluate pool ({protocol})")
    store = Store(store_path)
    try:
        sel = select_from_store(store, pool, attack=ATTACK, protocol=protocol)
        sel_file = write_selection(selection_path(store_path, prefix), sel,
                                   {"pool": pool, "attack": ATTACK, "protocol": protocol})
        say(f"RD selection: {sel.members} (RD {sel.rd:.3f}, threshold {sel.threshold} "
            f"{'met' if sel.threshold_met else 'NOT met'}) -> {sel_file}")
        extra = team_overrides(team_name, sel.members)
        if extra:
            say(f"{team_name} names other members than the selection: trained with {' '.join(extra)}")
        train_entry(team_name, over(team_name) + extra, **kw)
        no_epochs = [o for o in over(mean_name) if not o.startswith("train.epochs=")]
        train_entry(mean_name, no_epochs + extra[:1], **kw)
        mark("train team")
        eval_ids = evaluate_protocol(protocol, [team_name, mean_name], **ev)
        mark(f"evaluate team ({protocol})")

        acc = _accuracies(store, protocol, [base, *pool, *singles, team_name, mean_name])
        base_model, base_manifest = load_trained(base, runs, "cpu")
        cfg = base_manifest["config"]["data"]
        info = get_info(cfg["dataset"], cfg.get("options") or {})
        shape = (info.in_channels, info.image_size, info.image_size)
        test = load_split(cfg["dataset"], "test", cfg.get("root") or data_root, cfg.get("options") or {})
        x_test, y_test = test.get(list(range(len(test))))
        dense = network_cost(base_model.members[0], shape)
        costs: dict[str, Any] = {base: {**dense, "flops_speedup": 1.0}}
        for name in [*pool, *singles]:
            c = network_cost(load_trained(name, runs, "cpu")[0].members[0], shape)
            costs[name] = {**c, "flops_speedup": speedup(dense["macs_per_sample"], c["macs_per_sample"])}
        for name in [base, *pool, *singles]:  # the report's Speed up / Params cells read them from the run
            if name in pool_eval_ids:
                store.put_meta(pool_eval_ids[name], "eed_cost", costs[name])
        for name in (team_name, mean_name):
            c = team_cost(load_trained(name, runs, "cpu")[0], x_test, shape)
            c["flops_speedup"] = speedup(dense["macs_per_sample"], c["macs_per_sample"])
            costs[name] = c
            if c["inference"] == "die":
                c["die_sweep"] = die_sweep(load_trained(name, runs, "cpu")[0], x_test, y_test)
            if name in eval_ids:
                store.put_meta(eval_ids[name], "eed_cost", {k: v for k, v in c.items() if k != "member_costs"})
                c["eval_run_id"] = eval_ids[name]
    finally:
        store.close()
    mark("measure costs")
    summary = {"prefix": prefix, "protocol": protocol, "selection": sel.members, "selection_rd": sel.rd,
               "threshold_met": sel.threshold_met, "team_overrides": extra, "accuracy": acc, "cost": costs,
               "seconds": times}
    from robbench.checkpoint import atomic_write_json

    atomic_write_json(summary_path(store_path, prefix), summary)
    say(f"summary -> {summary_path(store_path, prefix)} ({times['measure costs']:.0f}s in all)")
    return summary


def _subsets(text: str) -> tuple[int, ...]:
    """``--subsets 0,1,2`` -> (0, 1, 2): distinct indices >= 0 (argparse turns the error into exit 2)."""
    try:
        out = tuple(int(t) for t in text.split(","))
    except ValueError:
        out = ()
    if not out or min(out) < 0 or len(set(out)) != len(out):
        raise argparse.ArgumentTypeError(f"expected distinct sub-model indices >= 0 separated by commas "
                                         f"(e.g. 0,1,2), got {text!r}")
    return out


def main(argv: list[str] | None = None) -> int:
    from robbench.errors import UserError

    ap = argparse.ArgumentParser(prog="python -m robbench.eed.pipeline", description=__doc__.split("\n\n")[0])
    ap.add_argument("--prefix", default="demo_eed", help="entry prefix (default demo_eed: the digits demo)")
    ap.add_argument("--protocol", default="demo-eed", help="PGD-20 protocol for the pool and the team")
    ap.add_argument("--runs-dir", default=None)
    ap.add_argument("--db", default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--memory-format", default="auto", choices=("auto", "channels_last", "contiguous"))
    ap.add_argument("--n", type=int, default=None, help="samples per evaluation (default: the protocol's)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override applied to every trained entry (repeatable)")
    ap.add_argument("--baseline", dest="baselines", action="append", default=[], metavar="NAME",
                    help="also train <prefix>_NAME_prune and <prefix>_NAME (e.g. hydra) beside the pool")
    ap.add_argument("--fresh", action="store_true", help="move stale runs aside and retrain them")
    ap.add_argument("--subsets", type=_subsets, default=(0, 1, 2), metavar="0,1,2",
                    help="sub-model indices per score in the pool (default 0,1,2: EED's d = 4; supp. Table 8's "
                         "d families: 0 for d = 1, 0,1 for d = 3, 0,...,d-2)")
    a = ap.parse_args(argv)
    try:
        run_pipeline(a.prefix, a.protocol, runs_dir=a.runs_dir, db=a.db, device=a.device,
                     memory_format=a.memory_format, overrides=a.overrides, n=a.n, subsets=a.subsets,
                     baselines=a.baselines, fresh=a.fresh)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
