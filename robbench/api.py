"""The Python API (a notebook's route): rank your own model against the zoo in a few lines.

```python
import robbench
res = robbench.evaluate(model, protocol="demo-whitebox", n=100, name="my_cnn")   # pandas, rows in the store
robbench.leaderboard("demo-whitebox")                                           # ranked DataFrame
net = robbench.load_model("dverge_resnet20_x3")                                 # a trained nn.Module
x_adv = robbench.attack("pgd", steps=10, loss="ce")(net, x, y, 0.03).x_adv       # any registered attack
```

The same code paths as the command line: ``evaluate`` imports the model as ``robbench add`` does
(:mod:`robbench.imported.add`), evaluates it with :func:`robbench.evaluate.engine.evaluate_protocol`, and
reads the same summary ``robbench evaluate`` prints (:func:`summary`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import pandas as pd
from torch import nn

from robbench.errors import ConfigError, UserError

__all__ = ["attack", "evaluate", "leaderboard", "load_model", "summary"]


def summary(store: Any, run_id: int) -> pd.DataFrame:
    """One run's aggregated accuracy per (attack, member, eps): the table ``robbench evaluate`` prints.
    Columns: entry, protocol, run_id, aggregation, attack, member, eps, accuracy, n (+ the aggregation's)."""
    from robbench.evaluate.aggregations import aggregate, groups_from_record

    df = store.outcomes(run_id)
    run = store.run(run_id)
    if df.empty:
        return pd.DataFrame(columns=["entry", "protocol", "run_id", "aggregation", "attack", "member", "eps",
                                     "accuracy", "n"])
    aggregation = run["meta"].get("protocol", {}).get("aggregation", "all_or_nothing")
    table = aggregate(aggregation, df, groups_from_record(run["meta"].get("and_groups"))).copy()
    table.insert(0, "aggregation", aggregation)
    table.insert(0, "run_id", int(run_id))
    table.insert(0, "protocol", run["protocol"])
    table.insert(0, "entry", run["entry"])
    return table.reset_index(drop=True)


def _protocol_dataset(protocol: str) -> str:
    from robbench.evaluate.protocol import load_protocol

    proto = load_protocol(protocol, [])
    datasets = list(proto.applies_to.datasets or proto.datasets or [])
    if len(datasets) != 1:
        raise ConfigError(f"protocol {protocol!r} applies to {', '.join(datasets) or 'any dataset'}; pass "
                          "dataset='...' (the dataset the model was trained on)", field="dataset")
    return datasets[0]


def _ensure_run(model: nn.Module | str | Path, name: str | None, dataset: str | None, protocol: str,
                runs_dir: str | Path | None, factory: str | None, options: dict[str, Any] | None,
                force: bool) -> str:
    """The run name to evaluate: an existing run, a zoo-style file added, or a module imported."""
    from robbench.checkpoint import RunDir, entry_name
    from robbench.imported.add import add_entry, add_module, module_weights_sha256
    from robbench.models.user_code import register_live

    if isinstance(model, nn.Module):
        if not name:
            raise ConfigError("a model object needs name='...' (the name it is ranked under)", field="name")
        run = RunDir(runs_dir, name)
        if run.exists() and not force:
            m = run.read_manifest()
            imp = m.get("imported") or {}
            if m.get("origin") != "imported" or imp.get("kind") != "python object":
                raise UserError(f"a run named {name!r} exists already and was not made by robbench.evaluate; "
                                "pick another name or pass force=True (the old run is moved aside)", file=str(run.path))
            same_factory = imp.get("factory") == (factory or f"memory:{name}")
            if same_factory and imp.get("weights_sha256") == module_weights_sha256(model):
                if factory is None:
                    register_live(name, model)  # this process holds the module again
                return name  # the same weights: the run (and its finished evaluations) is reused
        add_module(model, name, dataset or _protocol_dataset(protocol), runs_dir=runs_dir, factory=factory,
                   options=options, force=run.exists())
        return name
    spec = str(model)
    if spec.endswith(".toml"):
        res = add_entry(spec, runs_dir=runs_dir, name=name, force=force or RunDir(runs_dir, name or entry_name(spec)).exists())
        return res.name
    return entry_name(spec)


def evaluate(model: nn.Module | str | Path, protocol: str = "demo-whitebox", *, n: int | None = None,
             name: str | None = None, dataset: str | None = None, eps: str | Sequence[float] | None = None,
             overrides: Sequence[str] = (), factory: str | None = None, options: dict[str, Any] | None = None,
             force: bool = False, device: str | None = None, runs_dir: str | Path | None = None,
             db: str | Path | None = None, data_root: str | Path | None = None, quiet: bool = False,
             memory_format: str = "auto") -> pd.DataFrame:
    """Evaluate ``model`` with ``protocol`` and return its results (:func:`summary`); rows go to the
    results store, so ``robbench report`` and :func:`leaderboard` rank it beside the zoo.

    ``model``: an ``nn.Module`` (taking inputs in [0, 1], returning logits; ``name`` required; imported as
    ``memory:<name>`` for this process, or rebuildable anywhere when ``factory='python:pkg.mod:Cls'`` /
    ``'file:path.py:Cls'`` and its ``options`` are given), a zoo-style ``.toml`` file (as ``robbench add``),
    or the name of a run (trained or imported). ``dataset`` defaults to the protocol's only dataset.
    Re-evaluating a changed module under the same name replaces its imported run (results of the old
    weights stay in the store under their own checkpoint hash)."""
    from robbench.evaluate.engine import evaluate_protocol
    from robbench.store import Store

    run_name = _ensure_run(model, name, dataset, protocol, runs_dir, factory, options, force)
    runs = evaluate_protocol(protocol, [run_name], n=n, eps=eps, overrides=list(overrides), force=force,
                             device=device, runs_dir=runs_dir, db=db, data_root=data_root, quiet=quiet,
                             memory_format=memory_format)
    with Store(db) as store:
        frames = [summary(store, rid) for rid in runs.values()]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def load_model(name: str, *, runs_dir: str | Path | None = None, device: str | None = None) -> nn.Module:
    """A run's model (trained or imported), in eval mode: every recorded sha256 checked, and for an
    imported run its model source too. An ensemble is an :class:`~robbench.models.Ensemble`
    (``.members``); inputs in [0, 1]."""
    from robbench.checkpoint import RunDir, load_trained
    from robbench.imported import verify_imported_source

    run = RunDir(runs_dir, name)
    verify_imported_source(run.read_manifest(), str(run.manifest_path))
    model, _ = load_trained(name, runs_dir, device)
    return model


def attack(name: str, **options: Any) -> Callable[..., Any]:
    """A registered attack (``fgsm``, ``pgd``, ``deepfool``, ``autoattack``) with its options validated
    as in a protocol: ``robbench.attack("pgd", steps=10, restarts=2)(model, x, y, eps)`` returns an
    ``AttackResult`` (``.x_adv``, ``.fooled``). Works on any ``nn.Module`` taking inputs in [0, 1]."""
    from robbench.attacks.registered import make_attack

    return make_attack(name, **options)


def leaderboard(protocol: str | None = None, *, db: str | Path | None = None,
                runs_dir: str | Path | None = None) -> pd.DataFrame:
    """The ranked leaderboard (what ``leaderboard.md`` shows) of ``protocol`` (every protocol when None)."""
    from robbench.paths import results_db
    from robbench.paths import runs_dir as default_runs
    from robbench.report import leaderboard as lb
    from robbench.report.flags import compute_flags
    from robbench.report.results import Results
    from robbench.report.write import resolve_pages

    path = Path(db) if db is not None else results_db()
    if not path.is_file():
        raise UserError("no results store here yet; evaluate something first", file=str(path))
    results = Results(path, runs_dir or default_runs())
    spec, _, _ = resolve_pages("all", None, results)
    return lb.leaderboard(results, spec.headline_eps, spec.leaderboard_exclude, compute_flags(results),
                          {protocol} if protocol else None)
