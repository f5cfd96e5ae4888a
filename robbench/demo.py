"""The embedded default: a complete mini benchmark on scikit-learn's digits (``make demo``).

Trains every demo zoo entry (``paper = "demo"``: baseline, ADP, GAL, DVERGE, AdvT, Ensemble-in-One and
the hold-out surrogates) in dependency order, derives and fine-tunes the Ensemble-in-One path, runs the
scaled demo protocols (black-box, white-box, transferability; every scaled value is declared in
``protocols/demo-*.toml``), runs the EED pipeline (AT base, 12 pruned sub-models, robust-diversity
selection, team, dynamic inference: :mod:`robbench.eed.pipeline`), trains and attacks the Xie & Yuille
digits entries (:data:`XIE_ENTRIES`, protocol demo-xie) and writes the report. Each step skips finished work (complete runs, done
protocol runs, committed batches), so an interrupted demo resumes where it stopped.

``smallest=True`` is the end-to-end test size: two epochs per entry, two inner attack/distillation steps
and a few samples per protocol, in a
separate work folder so it never mixes with full-size results. Trained entries are checked against
their resolved config, so a smallest run never reuses full-size weights or the other way round.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from robbench.config import ZOO_KIND, list_entries, list_protocols, load_raw
from robbench.errors import ConfigError
from robbench.paths import PROTOCOLS_DIR, ZOO_DIR, results_db, runs_dir as default_runs_dir

DEMO_PAPER = "demo"
# The protocols the demo runs on its DVERGE and Ensemble-in-One entries, black-box first (its transfer
# sets are cached for all). Named, not discovered: every demo protocol costs minutes of the 15-minute
# budget, and the EED part runs its own (demo-eed, inside robbench.eed.pipeline). demo-autoattack is for
# your own models (README, "Bring your own model"); AutoAttack on every demo entry would double the demo.
DEMO_PROTOCOLS = ("demo-blackbox", "demo-whitebox", "demo-transferability", "demo-distillation")
EIO_DERIVED_TAG = "eio-finetuned"   # entries fine-tuned from paths derived from an RGN (robbench derive)
EIO_PATHS = 1                       # one derived model: the EIO tables' '/1' rows (preprint Tables 3-4)
# Not attacked by the demo: the random gated networks themselves (their white-box evaluation needs EOT,
# 20 draws per gradient: minutes per 8 samples on a CPU) and the raw derived path before fine-tuning.
# The papers report the derived, fine-tuned model ('EIO/1'), which the demo evaluates.
SKIP_TAGS = {"rgn", "eio-derived"}
# Not in the demo's own training loop: the EED entries (trained, evaluated and selected by the EED
# pipeline below, in its order: AT base, pool, robust-diversity selection, team) and the Xie & Yuille
# entries (their own part below, :data:`XIE_ENTRIES`). Neither is attacked by DEMO_PROTOCOLS.
NOT_IN_DEMO_TAGS = {"eed", "xie"}
# The Xie & Yuille part: clean-ratio sweep, ALP, mixture BN (both deployments) and clean training, attacked
# with demo-xie (targeted PGD-200, every iteration count recorded). The GroupNorm and 0% clean* entries
# are left to robbench train (GroupNorm alone takes about a minute on 2 cores).
XIE_ENTRIES = ("demo_xie_r0", "demo_xie_r50", "demo_xie_r100", "demo_xie_r100_alp", "demo_xie_mbn_r100",
               "demo_xie_mbn_r100_clean", "demo_xie_clean")
XIE_PROTOCOL = "demo-xie"
EED_PREFIX = "demo_eed"
# the smallest size's EED pool: two importance scores on one data subset (the full demo: 4 x 3)
SMALLEST_EED = {"scores": ("nis", "ase"), "subsets": (0,)}
SMALLEST_EPOCHS = 2
SMALLEST_N = 8
# inner attack/distillation steps at the smallest size, applied where the entry's method has the option
SMALLEST_PARAMS = {"steps": 2, "adv_steps": 2, "distill_steps": 2}


def demo_entries() -> list[dict[str, Any]]:
    """Demo zoo entries as raw data (name, tags, init_from), in training order: an entry after the one
    it starts from (``train.init_from``)."""
    raw = {}
    for name in list_entries(ZOO_DIR):
        data, _ = load_raw(name, ZOO_DIR, ZOO_KIND)
        if data.get("paper") == DEMO_PAPER and not NOT_IN_DEMO_TAGS & set(data.get("tags", [])):
            train = data.get("train") or {}
            raw[name] = {"name": name, "tags": list(data.get("tags", [])), "init_from": train.get("init_from")}
    order: list[str] = []

    def visit(n: str, stack: tuple[str, ...] = ()) -> None:
        if n in order or n not in raw:
            return
        if n in stack:
            raise ConfigError(f"init_from cycle: {' -> '.join((*stack, n))}", file=str(ZOO_DIR / f"{n}.toml"),
                              field="train.init_from")
        dep = raw[n]["init_from"]
        if dep:
            visit(dep, (*stack, n))
        order.append(n)

    for n in sorted(raw):
        visit(n)
    return [raw[n] for n in order]


def demo_protocols() -> list[str]:
    """:data:`DEMO_PROTOCOLS`, each checked to exist and to be a demo protocol."""
    known = set(list_protocols(PROTOCOLS_DIR))
    for name in DEMO_PROTOCOLS:
        if name not in known:
            raise ConfigError("protocol file missing", file=str(PROTOCOLS_DIR / f"{name}.toml"))
        data, _ = load_raw(name, PROTOCOLS_DIR, "protocol")
        if data.get("paper") != DEMO_PAPER:
            raise ConfigError(f"the demo runs only paper = {DEMO_PAPER!r} protocols", file=str(PROTOCOLS_DIR / f"{name}.toml"),
                              field="paper")
    return list(DEMO_PROTOCOLS)


def smallest_overrides(name: str) -> list[str]:
    """``--set`` overrides of zoo entry ``name`` at the end-to-end test size: fewer epochs and inner steps
    (only the options its method has). An entry with ``train.epochs = 0`` deploys another entry's weights
    (e.g. Xie's MBN_clean) and stays untrained."""
    import dataclasses

    from robbench.registry import METHODS

    train = load_raw(name, ZOO_DIR, ZOO_KIND)[0].get("train") or {}
    params = METHODS.params(train.get("method", "baseline"))
    names = {f.name for f in dataclasses.fields(params)} if params is not None else set()
    epochs = [] if train.get("epochs") == 0 else [f"train.epochs={SMALLEST_EPOCHS}"]
    return epochs + [f"train.params.{k}={v}" for k, v in sorted(SMALLEST_PARAMS.items()) if k in names]


def _say(msg: str) -> None:
    print(f"[demo] {msg}", file=sys.stderr, flush=True)


def run_demo(out: str | Path = "reports/demo", smallest: bool = False, device: str | None = None,
             runs_dir: str | Path | None = None, db: str | Path | None = None,
             data_root: str | Path | None = None, memory_format: str = "auto") -> Path:
    """Train, evaluate and report the digits demo into ``out``; returns the report's index path.

    Full size uses the usual ``runs/`` and ``results/robbench.db`` (so ``robbench report`` sees the demo
    too); ``smallest`` works under ``<out>/.work/`` unless ``runs_dir``/``db`` are given."""
    from robbench.eio.derive import derive_paths
    from robbench.evaluate.engine import evaluate_protocol
    from robbench.report import write_report
    from robbench.train.run import train_entry

    out = Path(out)
    if smallest:
        work = out / ".work"
        runs = Path(runs_dir) if runs_dir is not None else work / "runs"
        store = Path(db) if db is not None else work / "robbench.db"
    else:
        runs = Path(runs_dir) if runs_dir is not None else default_runs_dir()
        store = Path(db) if db is not None else results_db()
    t0 = time.perf_counter()

    def train(name: str) -> None:
        _say(f"train {name}")
        # fresh: a demo run left by an older demo config is moved aside (kept) and retrained
        train_entry(name, overrides=smallest_overrides(name) if smallest else [], device=device, runs_dir=runs,
                    data_root=data_root, progress=False, fresh=True, memory_format=memory_format)

    entries = demo_entries()
    if not entries:
        raise ConfigError(f"no zoo entry with paper = {DEMO_PAPER!r}", file=str(ZOO_DIR), field="paper")
    for e in entries:
        if EIO_DERIVED_TAG not in e["tags"]:  # a derived path is trained by derive_paths below, once its RGN exists
            train(e["name"])
    for e in entries:
        if EIO_DERIVED_TAG in e["tags"]:
            # deriving is cheap and gives the same bytes for the same RGN, so a finished fine-tune is
            # reused, and one built on an older RGN is moved aside and redone
            _say(f"derive and fine-tune {e['name']} ({EIO_PATHS} path)")
            derive_paths(e["name"], count=EIO_PATHS, seed=0, device=device, runs_dir=runs, data_root=data_root,
                         fresh=True, memory_format=memory_format)
    _say(f"training done in {time.perf_counter() - t0:.0f}s")

    for proto in demo_protocols():
        n = SMALLEST_N if smallest else None
        targets = demo_targets(proto, runs, n)
        _say(f"evaluate {proto} on {len(targets)} entries")
        evaluate_protocol(proto, targets, n=n, device=device, runs_dir=runs, db=store, data_root=data_root,
                          quiet=True, memory_format=memory_format)
    _say(f"evaluation done at {time.perf_counter() - t0:.0f}s")

    from robbench.eed.pipeline import run_pipeline

    _say("EED: AT base, pruned pool, robust-diversity selection, team and dynamic inference (robbench.eed.pipeline)")
    run_pipeline(EED_PREFIX, runs_dir=runs, db=store, device=device, data_root=data_root,
                 memory_format=memory_format, fresh=True, say=_say,
                 **({"overrides": smallest_overrides, "n": SMALLEST_N, **SMALLEST_EED} if smallest else {}))
    _say(f"EED done at {time.perf_counter() - t0:.0f}s")

    _say(f"Xie & Yuille: train {len(XIE_ENTRIES)} entries, evaluate {XIE_PROTOCOL}")
    for name in XIE_ENTRIES:
        train(name)
    evaluate_protocol(XIE_PROTOCOL, list(XIE_ENTRIES), n=SMALLEST_N if smallest else None, device=device,
                      runs_dir=runs, db=store, data_root=data_root, quiet=True, memory_format=memory_format)
    _say(f"Xie & Yuille done at {time.perf_counter() - t0:.0f}s")
    index = write_report(paper=DEMO_PAPER, out=out, db=store, runs_dir=runs, fmt="md")
    _say(f"report written to {index} ({time.perf_counter() - t0:.0f}s in all)")
    return index


def demo_targets(protocol: str, runs: Path, n: int | None) -> list[str]:
    """Trained entries the protocol applies to, minus :data:`SKIP_TAGS` and the EED and Xie entries
    (their parts evaluate them with their own protocols)."""
    from robbench.evaluate.engine import trained_entries
    from robbench.evaluate.protocol import load_protocol

    proto = load_protocol(protocol, n=n)
    return [name for name, e in trained_entries(runs) if proto.applies(e)
            and not set(e.tags) & (SKIP_TAGS | NOT_IN_DEMO_TAGS)]
