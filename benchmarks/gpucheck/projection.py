"""GPU-hours of reproducing each paper: measured per-step costs x the step counts of the zoo and protocols.

What is counted (all from robbench's own loaders: ``load_entry`` for zoo/*.toml, ``load_protocol`` for
protocols/*.toml, and the paper tables' rows in protocols/reference/views/):

- training a run: ``epochs x ceil(train_size / batch_size)`` steps of its method, plus each epoch's clean
  test pass (``test_size x members`` forwards); a run's ``train.init_from`` chain is trained first;
- runs written by ``robbench derive``: ``<rgn entry>_path<k>`` is a path of a trained random gated network
  (no training of its own); ``<fine-tune entry>_path<k>`` / ``_ens<N>`` fine-tune path k / paths 0..N-1;
- evaluating a run with a protocol: per sample and eps, ``steps x restarts`` attack gradients of the whole
  model (x ``eot_samples`` for randomized models) for white-box attacks, per member for within-ensemble
  transferability, per source for black-box transfer sets (generated once per source and set, shared by
  every target), and forwards for clean accuracy and for reading transfer sets. Early stop is ignored:
  the counts are upper bounds (DVERGE white-box with early stop runs most later restarts on few samples).

A unit of work costs (measured seconds per step, or per member-image gradient / forward) x count. A cost
that was not measured is estimated from a measured one of the same method (or architecture), scaled
linearly in members, pixels and batch, and marked so; work with no usable cost is counted as unmeasured.
The papers' own training times are quoted below as data, each with its citation.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

# ---------------------------------------------------------------------------------------------- papers' times
# Training times the papers state (hours on their hardware). Quoted here so the check never reads papers.
PAPER_TIMES: list[dict[str, Any]] = [
    {"paper": "dverge", "row": r, "entry": e, "hours": h, "hardware": "one NVIDIA TITAN XP",
     "what": "ResNet-20 x3, 200 epochs",
     "citation": "DVERGE (Yang et al., NeurIPS 2020) appendix A, Table 1: 'Training time comparison on a single "
                 "TITAN XP GPU. All times are evaluated for training a ResNet-20 ensemble with 3 sub-models for "
                 "200 epochs.' Baseline 1.0, ADP 2.0, GAL 7.5, AdvT 11.5, DVERGE 10.5 h"}
    for r, e, h in (("Baseline", "baseline_resnet20_x3", 1.0), ("ADP", "adp_resnet20_x3", 2.0),
                    ("GAL", "gal_resnet20_x3", 7.5), ("AdvT", "advt_resnet20_x3", 11.5),
                    ("DVERGE", "dverge_resnet20_x3", 10.5))
] + [
    {"paper": "eio", "row": r, "entry": e, "hours": h, "hardware": "not stated", "what": w,
     "citation": "Ensemble-in-One (ICLR submission) §2.3: 'DVERGE takes 11 hours to train an ensemble with three "
                 "sub-models while needs approximately 50 hours when the sub-model count increases to eight'"}
    for r, e, h, w in (("DVERGE x3 (as cited by EIO)", "dverge_resnet20_x3", 11.0, "ResNet-20 x3"),
                       ("DVERGE x8 (as cited by EIO)", "dverge_resnet20_x8", 50.0, "ResNet-20 x8, 'approximately'"))
]
PAPER_RATIOS: list[dict[str, Any]] = [
    {"paper": "eio", "what": "EIO training time / AdvT training time", "ratio": 2.5, "numerator": "eio_resnet20",
     "denominator": "advt_resnet20_x3",
     "citation": "Ensemble-in-One (ICLR submission) appendix A.3 and Fig. 7 (right), NVIDIA GeForce RTX 2080 Ti: 'the training "
                 "time cost of an EIO network is approximately 2.5x than AdvT'"},
]
PAPER_HARDWARE: list[dict[str, str]] = [
    {"paper": "eed", "text": "no training time stated; 'Each experiment is run on an NVIDIA RTX A6000 GPU with 8 CPU "
                             "cores' (EED, CVPR 2025, §5.1 'Training')"},
    {"paper": "xie", "text": "no training time stated; 110 epochs (Xie & Yuille, ICLR 2020, §3) on 'ours uses 128 "
                             "GPUs' (appendix A, ImageNet adversarial training)"},
]

# AutoAttack gradient counts per sample (fra31/auto-attack autoattack.py set_version): APGD and FAB run
# n_iter = 100 iterations per restart; targeted versions over 9 target classes; Square 5000 queries.
AA_ITER, AA_TARGETS, AA_QUERIES = 100, 9, 5000

PAPERS = ("dverge", "eio", "eed", "xie")
_DERIVED = re.compile(r"^(?P<base>.+)_(?P<kind>path|ens)(?P<k>\d+)$")


# ---------------------------------------------------------------------------------------------- work
@dataclass
class Work:
    """One unit of work: training a run, evaluating a run with a protocol, or generating transfer sets."""

    id: str
    kind: str                  # "train" | "eval" | "generate"
    label: str
    key: str                   # the cost key: a train key (train) or a model key (eval, generate)
    recipe: tuple[str, int | None, bool]  # (entry, members override, transform removed): how to build it
    steps: int = 0             # training steps
    batch: int = 0             # training batch size
    epochs: int = 0
    test_fwd_per_epoch: int = 0  # member-image forwards of the per-epoch clean test
    model_key: str = ""        # train: the model key its test forwards cost
    grad_mi: int = 0           # member-image attack gradients
    fwd_mi: int = 0            # member-image forwards
    notes: list[str] = field(default_factory=list)


@dataclass
class Group:
    paper: str
    name: str
    title: str
    work: list[str] = field(default_factory=list)  # Work ids, in order, no duplicates
    notes: list[str] = field(default_factory=list)

    def add(self, wid: str) -> None:
        if wid not in self.work:
            self.work.append(wid)


@dataclass
class Run:
    """A run name resolved to the entry whose model/data it uses and the training it needs."""

    name: str
    entry: Any
    members: int
    plain: bool                         # the transform removed (a path derived from an RGN)
    base: str                           # the zoo entry the recipe builds
    train: list[tuple[str, Any]]        # (run name, entry) trained for it, init_from chain included


def _chain(entry: Any, entries: dict[str, Any], notes: list[str], seen: tuple[str, ...] = ()) -> list[tuple[str, Any]]:
    out = [(entry.name, entry)]
    src = entry.train.init_from
    if src and src not in seen:
        if src in entries:
            out += _chain(entries[src], entries, notes, (*seen, entry.name))
        else:
            notes.append(f"{entry.name}: init_from {src!r} is not a zoo entry (its training is not counted)")
    return out


def resolve_run(name: str, entries: dict[str, Any], notes: list[str]) -> Run | None:
    if name in entries:
        e = entries[name]
        return Run(name, e, e.model.members, False, name, _chain(e, entries, notes))
    m = _DERIVED.match(name)
    if not m or m["base"] not in entries:
        notes.append(f"{name}: neither a zoo entry nor a derived run of one (not counted)")
        return None
    base, kind, k = entries[m["base"]], m["kind"], int(m["k"])
    members = 1 if kind == "path" else k
    if base.model.transform:  # a path (or paths) of a trained random gated network: derive, no training
        return Run(name, base, members, True, base.name, _chain(base, entries, notes))
    paths = [k] if kind == "path" else list(range(k))
    train = [(f"{base.name}_path{i}", base) for i in paths]
    if base.train.init_from in entries:
        train += _chain(entries[base.train.init_from], entries, notes)
    return Run(name, base, members * base.model.members, False, base.name, train)


def train_work(run_name: str, e: Any, info: Callable[[Any], Any], keys: Any) -> Work:
    i = info(e)
    per_epoch = math.ceil(i.train_size / e.data.batch_size)
    return Work(id=f"train:{run_name}", kind="train", label=run_name, key=keys.train(e), recipe=(e.name, None, False),
                steps=e.train.epochs * per_epoch, batch=e.data.batch_size, epochs=e.train.epochs,
                test_fwd_per_epoch=i.test_size * e.model.members, model_key=keys.model(e, None, False))


def attack_grads(attack: str, p: Any, num_classes: int) -> tuple[int, int, str | None]:
    """(gradients, forwards, note) per sample and eps of one attack (no early stop)."""
    if attack == "autoattack":
        version = getattr(p, "version", "standard")
        it = getattr(p, "n_iter", None) or AA_ITER
        tc = getattr(p, "n_target_classes", None) or AA_TARGETS
        rs = getattr(p, "n_restarts", None) or 1
        q = getattr(p, "n_queries", None) or AA_QUERIES
        eot = getattr(p, "eot_iter", None) or 20
        if version == "rand":
            return 2 * it * rs * eot, 0, "AutoAttack rand: APGD-CE + APGD-DLR with EOT (upper bound)"
        if version == "plus":
            return it * (5 + 5 + 5 + 2 * tc), q, "AutoAttack plus (upper bound: AA attacks only still-robust points)"
        return it * rs * (1 + 2 * tc), q, "AutoAttack standard: APGD-CE, APGD-T, FAB-T, Square (upper bound)"
    if attack == "deepfool":
        steps = int(getattr(p, "steps", 50))
        cands = getattr(p, "candidates", None) or num_classes
        return steps * cands, steps, "DeepFool: one gradient per candidate class and step (upper bound)"
    steps = int(getattr(p, "steps", 1) or 1) if attack != "fgsm" else 1
    restarts = int(getattr(p, "restarts", 1) or 1)
    return steps * restarts, restarts, None


def eval_works(run: Run, proto: Any, info: Callable[[Any], Any], keys: Any, randomized: Callable[[Run], bool],
               resolve: Callable[[str], Run | None]) -> tuple[list[Work], list[Run], list[str]]:
    """The work of evaluating ``run`` with ``proto``: its own Work plus transfer-set generations (and the
    source runs they need)."""
    notes: list[str] = []
    e = run.entry
    i = info(e)
    ds = proto.applies_to.datasets or proto.datasets
    if ds and e.data.dataset not in ds:
        return [], [], [f"{proto.name} is for {', '.join(ds)}; {run.name} is a {e.data.dataset} model (not counted)"]
    pool = i.test_size if proto.samples.pool is None else min(proto.samples.pool, i.test_size)
    n = min(proto.samples.n, pool)
    rand = randomized(run)
    eot = proto.eot_samples if rand else 1
    m = run.members
    mk = keys.model(e, run.members, run.plain)
    me = Work(id=f"eval:{run.name}:{proto.name}", kind="eval", label=f"{run.name} / {proto.name}", key=mk,
              recipe=(run.base, run.members, run.plain))
    if proto.clean:
        me.fwd_mi += n * m
    gens: list[Work] = []
    sources: list[Run] = []
    for a in proto.attacks:
        g, f, note = attack_grads(a.attack, a.params_parsed, i.num_classes)
        if note and note not in me.notes:
            me.notes.append(note)
        ne = len(proto.attack_eps(a))
        on = proto.attack_on(a)
        if on == "target":
            me.grad_mi += n * ne * g * m * eot
            me.fwd_mi += n * ne * f * m * eot
        elif on == "members":
            runs = max(1, int(a.restarts_as_runs or 0))
            me.grad_mi += n * ne * g * runs * m           # member i attacked alone, for each i
            me.fwd_mi += n * ne * runs * m * (m + 1)      # tested on every member j and the ensemble
        else:
            for src in proto.sources:
                s = resolve(src)
                if s is None:
                    notes.append(f"{proto.name}: source {src} unknown (its sets are not counted)")
                    continue
                sources.append(s)
                spec = json.dumps([src, a.attack, _plain(a.params_parsed), proto.attack_eps(a), proto.samples.selection,
                                   n, proto.samples.seed, proto.samples.split, a.norm or proto.norm], default=str)
                s_eot = proto.eot_samples if randomized(s) else 1
                gens.append(Work(id=f"generate:{spec}", kind="generate", label=f"{src} -> {a.id} ({proto.name})",
                                 key=keys.model(s.entry, s.members, s.plain), recipe=(s.base, s.members, s.plain),
                                 grad_mi=n * ne * g * s.members * s_eot, fwd_mi=n * ne * s.members))
                me.fwd_mi += n * ne * m  # the target reads the set
    if rand:
        me.notes.append(f"randomized model: gradients through EOT of {proto.eot_samples} draws")
    return [me, *gens], sources, notes


def _plain(p: Any) -> Any:
    import dataclasses

    return dataclasses.asdict(p) if dataclasses.is_dataclass(p) else p


def view_groups(views: list[dict[str, Any]], training_times: list[dict[str, Any]]) -> list[tuple[str, str, str, dict[str, str], set[str]]]:
    """(paper, name, title, rows {label: run}, protocols) of every paper table in the views files (not the demo)."""
    out = []
    for v in views:
        paper = v.get("paper", "")
        if paper not in PAPERS:
            continue
        protos = {v["protocol"]} if v.get("protocol") else set()
        for m in (v.get("measures") or {}).values():
            if isinstance(m, dict) and m.get("kind", "robust") != "none":
                protos.add(m.get("protocol") or v.get("protocol") or "")
        protos.discard("")
        rows = dict(v.get("rows") or {})
        for label, extra in (v.get("seeds") or {}).items():  # a row's further independent runs cost too
            for i, entry in enumerate(extra):
                rows[f"{label} (run {i + 2})"] = entry
        out.append((paper, f"Table {v.get('table', '?')}", v.get("title", ""), rows, protos))
    for t in training_times:
        paper = t.get("paper", "")
        if paper not in PAPERS:
            continue
        ref = str(t.get("reference", "")).partition(":")[2] or "?"
        out.append((paper, f"Table {ref} (training time)", t.get("title", ""), dict(t.get("rows") or {}), set()))
    return out


@dataclass
class Plan:
    work: dict[str, Work]
    groups: list[Group]
    notes: list[str]


def make_plan(entries: dict[str, Any], views: list[dict[str, Any]], training_times: list[dict[str, Any]],
              protocols: dict[str, Any], info: Callable[[Any], Any], keys: Any,
              randomized: Callable[[Run], bool]) -> Plan:
    """Every paper table's work, and per paper the zoo entries no table names (with the paper's protocols
    that apply to them). ``protocols`` maps names to loaded Protocols (or to an error string)."""
    notes: list[str] = []
    work: dict[str, Work] = {}
    groups: list[Group] = []
    cache: dict[str, Run | None] = {}

    def resolve(name: str) -> Run | None:
        if name not in cache:
            cache[name] = resolve_run(name, entries, notes)
        return cache[name]

    def add_training(g: Group, run: Run) -> None:
        for rn, e in run.train:
            w = train_work(rn, e, info, keys)
            work.setdefault(w.id, w)
            g.add(w.id)

    def add_eval(g: Group, run: Run, pname: str) -> None:
        proto = protocols.get(pname)
        if proto is None or isinstance(proto, str):
            msg = f"protocol {pname}: {proto or 'not found'} (its evaluations are not counted)"
            if msg not in g.notes:
                g.notes.append(msg)
            return
        ws, sources, n2 = eval_works(run, proto, info, keys, randomized, resolve)
        for m in n2:
            if m not in g.notes:
                g.notes.append(m)
        for w in ws:
            work.setdefault(w.id, w)
            g.add(w.id)
        for s in sources:
            add_training(g, s)

    named: dict[str, set[str]] = {p: set() for p in PAPERS}
    for paper, name, title, rows, protos in view_groups(views, training_times):
        g = Group(paper, name, title)
        for label, run_name in rows.items():
            if not run_name:
                continue
            run = resolve(run_name)
            if run is None:
                continue
            named[paper].add(run.base)
            add_training(g, run)
            for p in sorted(protos):
                add_eval(g, run, p)
        empty = sum(1 for r in rows.values() if not r)
        if empty:
            g.notes.append(f"{empty} row(s) have no zoo entry (published numbers only)")
        groups.append(g)
    for paper in PAPERS:
        g = Group(paper, "other zoo entries", f"zoo entries of paper '{paper}' that no table names, with the "
                  f"paper's protocols that apply to them")
        pprotos = [p for p in protocols.values() if not isinstance(p, str) and p.paper == paper]
        for name, e in sorted(entries.items()):
            if e.paper != paper or name in named[paper] or "holdout" in (e.tags or []):
                continue
            run = resolve(name)
            if run is None:
                continue
            add_training(g, run)
            for p in pprotos:
                if p.applies(e):
                    add_eval(g, run, p.name)
        if g.work:
            groups.append(g)
    return Plan(work, groups, notes)


# ---------------------------------------------------------------------------------------------- costs
def _key(k: str) -> list[Any]:
    return json.loads(k)


def model_fields(mk: str) -> dict[str, Any]:
    arch, members, width, transform, topts, norm, act, opts, geo = _key(mk)
    return {"arch": arch, "members": members, "width": width, "transform": transform, "pixels": geo[0] * geo[0],
            "rest": json.dumps([width, transform, topts, norm, act, opts, geo[1], geo[2]], default=str)}


def train_fields(tk: str) -> dict[str, Any]:
    method, mk, ints, batch = _key(tk)
    return {"method": method, "model": model_fields(mk), "ints": ints, "batch": batch}


def estimate_train(key: str, measured: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """A train key's seconds per step scaled from a measured key of the same method: the closest in
    members with the same architecture, else any; linear in members, pixels and batch."""
    want = train_fields(key)
    best, score = None, None
    for k, c in measured.items():
        have = train_fields(k)
        if have["method"] != want["method"]:
            continue
        s = (have["model"]["arch"] != want["model"]["arch"], have["model"]["transform"] != want["model"]["transform"],
             have["ints"] != want["ints"], abs(have["model"]["members"] - want["model"]["members"]))
        if score is None or s < score:
            best, score = (k, c, have), s
    if best is None:
        return None
    k, c, have = best
    f = (want["model"]["members"] / have["model"]["members"]) * (want["model"]["pixels"] / have["model"]["pixels"]) \
        * (want["batch"] / c["batch"])
    return {"seconds_per_step": c["seconds_per_step"] * f, "batch": want["batch"],
            "source": f"estimated x{f:.3g} from the measured {have['method']} {have['model']['arch']} "
                      f"x{have['model']['members']} step (linear in members, pixels, batch)"}


def estimate_model(key: str, measured: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """A model key's per-member-image costs from a measured key of the same architecture and transform,
    scaled linearly in pixels (per member-image costs do not depend on the member count)."""
    want = model_fields(key)
    for k, c in measured.items():
        have = model_fields(k)
        if have["arch"] == want["arch"] and have["transform"] == want["transform"]:
            f = want["pixels"] / have["pixels"]
            return {"grad_s_per_member_image": c["grad_s_per_member_image"] * f,
                    "fwd_s_per_member_image": c["fwd_s_per_member_image"] * f,
                    "source": f"estimated x{f:.3g} from {have['arch']} x{have['members']} (same architecture)"}
    return None


def work_seconds(w: Work, train_costs: dict[str, Any], model_costs: dict[str, Any]) -> float | None:
    """Seconds of ``w`` at the measured costs (None when its cost is unknown)."""
    if w.kind == "train":
        c = train_costs.get(w.key)
        if c is None or not c.get("seconds_per_step"):
            return None
        s = w.steps * c["seconds_per_step"] * (w.batch / c["batch"] if c.get("batch") else 1.0)
        mc = model_costs.get(w.model_key)
        if mc is not None:
            s += w.epochs * w.test_fwd_per_epoch * mc["fwd_s_per_member_image"]
        return s
    mc = model_costs.get(w.key)
    if mc is None:
        return None
    return w.grad_mi * mc["grad_s_per_member_image"] + w.fwd_mi * mc["fwd_s_per_member_image"]


def summarize(plan: Plan, train_costs: dict[str, Any], model_costs: dict[str, Any]) -> dict[str, Any]:
    """GPU-hours per group and per paper (each unit of work counted once per paper)."""
    secs = {wid: work_seconds(w, train_costs, model_costs) for wid, w in plan.work.items()}

    def total(ids: Iterable[str]) -> dict[str, Any]:
        ids = list(dict.fromkeys(ids))
        out = {"train_h": 0.0, "eval_h": 0.0, "generate_h": 0.0, "units": len(ids), "unmeasured": 0,
               "train_steps": 0, "grad_member_images": 0}
        for wid in ids:
            w = plan.work[wid]
            out["train_steps"] += w.steps
            out["grad_member_images"] += w.grad_mi
            s = secs[wid]
            if s is None:
                out["unmeasured"] += 1
                continue
            out[f"{w.kind}_h"] += s / 3600
        out["total_h"] = out["train_h"] + out["eval_h"] + out["generate_h"]
        return out

    groups = [{"paper": g.paper, "name": g.name, "title": g.title, **total(g.work), "notes": g.notes}
              for g in plan.groups]
    papers = {p: total(wid for g in plan.groups if g.paper == p for wid in g.work) for p in PAPERS}
    return {"groups": groups, "papers": papers,
            "unmeasured_keys": sorted({plan.work[w].key for w, s in secs.items() if s is None})}


def paper_comparison(plan: Plan, train_costs: dict[str, Any], model_costs: dict[str, Any]) -> dict[str, Any]:
    """Projected training hours of the entries the papers time, beside the papers' own numbers (the
    entry alone, not its init_from chain, as the papers time one training run)."""
    def hours(entry: str) -> float | None:
        w = plan.work.get(f"train:{entry}")
        s = work_seconds(w, train_costs, model_costs) if w is not None else None
        return None if s is None else s / 3600

    rows = []
    base = {p: hours(t["entry"]) for p, t in (("dverge", PAPER_TIMES[0]),)}
    for t in PAPER_TIMES:
        h = hours(t["entry"])
        r = {**t, "projected_h": h}
        if t["paper"] == "dverge":
            r["paper_ratio"] = t["hours"] / PAPER_TIMES[0]["hours"]
            r["projected_ratio"] = None if (h is None or not base["dverge"]) else h / base["dverge"]
        rows.append(r)
    ratios = []
    for q in PAPER_RATIOS:
        a, b = hours(q["numerator"]), hours(q["denominator"])
        ratios.append({**q, "projected_ratio": None if (a is None or not b) else a / b})
    return {"times": rows, "ratios": ratios, "hardware": PAPER_HARDWARE}
