"""Sanity flags: numbers that look like gradient masking or a broken run.

- ``whitebox>blackbox``: white-box accuracy above black-box transfer accuracy at the same eps (an
  attack that knows the model should never do worse than one that does not; the DVERGE appendix C.3
  reads ADP/8's 4.9% > 0.4% at eps 0.02 as obfuscated gradients).
- ``rises-with-eps``: accuracy that grows with eps (a larger ball contains the smaller one).
- ``no-fall``: white-box accuracy at the largest eps still above half the clean accuracy (strong
  white-box attacks at large eps drive accuracy toward 0; AdvT ResNet-20 is at 9.5% of 77.2% at 0.07).
- ``attack-check``: warnings the attacks raised (AutoAttack's own gradient-masking checks among them; run_meta ``attack_warnings``).
- ``randomized-no-eot``: a randomized model (random gated inference) evaluated without EOT.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import pandas as pd

from robbench.config import load_raw
from robbench.errors import ConfigError
from robbench.outcomes import CLEAN_ATTACK
from robbench.paths import PROTOCOLS_DIR
from robbench.report.measures import clean_counts, eps_values
from robbench.report.results import Results, RunInfo

# Differences below one percentage point are within restart noise for n = 1000 (Table 8's
# convergence check moves by up to 0.6 pp black-box and 1.2 pp white-box).
TOLERANCE = 0.01
NO_FALL_FRACTION = 0.5
BLACKBOX_KINDS = ("transfer",)
WHITEBOX_KINDS = ("whitebox", "autoattack")


@dataclass(frozen=True, order=True)
class Flag:
    entry: str
    protocol: str
    eps: float | None
    code: str
    message: str


@lru_cache(maxsize=None)
def _protocol_raw(name: str) -> dict[str, Any]:
    """The protocol file merged along its extends chain, unvalidated: the report needs only kind, paper,
    member and datasets, and must not import the attack registry (torch) for that."""
    try:
        raw, _ = load_raw(name, PROTOCOLS_DIR, "protocol")
    except ConfigError:  # protocol file gone or renamed: the stored meta still tells
        return {}
    return raw


def protocol_info(name: str, run: RunInfo | None = None) -> dict[str, Any]:
    """kind, paper, member and datasets of a protocol: what the run recorded (the resolved protocol,
    overrides applied), else its file. A source's own-accuracy run has kind ``<kind>:source``."""
    raw = _protocol_raw(name)
    info: dict[str, Any] = {"kind": raw.get("kind", "whitebox" if raw else ""), "paper": raw.get("paper", ""),
                            "member": raw.get("member"), "datasets": list(raw.get("datasets", [])),
                            "eps": [float(e) for e in raw.get("eps", []) if isinstance(e, (int, float))]}
    if run is not None:
        resolved = run.meta.get("protocol") if isinstance(run.meta.get("protocol"), dict) else {}
        for k in ("kind", "paper", "member", "datasets"):
            if k in resolved:
                info[k] = resolved[k]
            elif k in run.meta and not info.get(k):
                info[k] = run.meta[k]
        if run.role != "target":
            info["kind"] = f"{info['kind']}:{run.role}"
    return info


def eps_curve(results: Results, run: RunInfo) -> dict[float, float]:
    """All-or-nothing accuracy over every stored attack, per eps (whole model)."""
    df = results.outcomes(run)
    attacks = sorted(set(df["attack"]) - {CLEAN_ATTACK})
    out = {}
    for e in eps_values(df):
        kn = results.aon_counts(run, attacks, e)
        if kn is not None and kn[1]:
            out[e] = kn[0] / kn[1]
    return out


def curve_flags(entry: str, protocol: str, kind: str, curve: dict[float, float], clean: float | None) -> list[Flag]:
    flags = []
    eps = sorted(curve)
    for a, b in zip(eps, eps[1:]):
        if curve[b] > curve[a] + TOLERANCE:
            flags.append(Flag(entry, protocol, b, "rises-with-eps",
                              f"accuracy rises with eps: {100 * curve[a]:.1f}% at {a:g} -> "
                              f"{100 * curve[b]:.1f}% at {b:g}"))
    if kind in WHITEBOX_KINDS and len(eps) >= 2 and clean is not None and clean > 0:
        top = eps[-1]
        if curve[top] > NO_FALL_FRACTION * clean:
            flags.append(Flag(entry, protocol, top, "no-fall",
                              f"white-box accuracy does not fall toward 0: {100 * curve[top]:.1f}% at eps "
                              f"{top:g} vs {100 * clean:.1f}% clean"))
    return flags


def pair_flags(entry: str, wb_protocol: str, wb: dict[float, float], bb_protocol: str,
               bb: dict[float, float]) -> list[Flag]:
    flags = []
    for e in sorted(set(wb) & set(bb)):
        if wb[e] > bb[e] + TOLERANCE:
            flags.append(Flag(entry, wb_protocol, e, "whitebox>blackbox",
                              f"white-box accuracy above black-box at eps {e:g}: {100 * wb[e]:.1f}% "
                              f"({wb_protocol}) > {100 * bb[e]:.1f}% ({bb_protocol}); gradient masking?"))
    return flags


def meta_flags(run: RunInfo, entry_cfg: dict[str, Any]) -> list[Flag]:
    flags = []
    # the engine stores attack warnings (AutoAttack's own checks among them) as run_meta 'attack_warnings'
    warnings = run.meta.get("attack_warnings") or run.meta.get("autoattack_warnings") or []
    if isinstance(warnings, dict):
        warnings = [f"{k}: {v}" for k, v in sorted(warnings.items()) if v]
    if isinstance(warnings, str):
        warnings = [warnings]
    for w in warnings:
        flags.append(Flag(run.entry, run.label, None, "attack-check", f"attack check: {w}"))
    model = entry_cfg.get("model", {}) if isinstance(entry_cfg, dict) else {}
    eot = run.meta.get("eot")
    if isinstance(eot, dict):  # the engine's record: {"randomized": bool, "samples": k}
        randomized, draws = bool(eot.get("randomized")), int(eot.get("samples", 0) or 0)
    else:
        randomized = bool(run.meta.get("randomized", model.get("transform") == "rgn"))
        draws = int(eot or run.meta.get("eot_samples", 0) or 0)
    if randomized and draws < 2:
        flags.append(Flag(run.entry, run.label, None, "randomized-no-eot",
                          "randomized model evaluated without EOT: white-box numbers overstate robustness"))
    return flags


def compute_flags(results: Results, entries: list[str] | None = None) -> list[Flag]:
    """Every flag over the latest runs (of ``entries`` when given), sorted."""
    flags: list[Flag] = []
    by_entry: dict[str, list[RunInfo]] = {}
    for (e, _p, _role), run in results.runs.items():
        if entries is None or e in entries:
            by_entry.setdefault(e, []).append(run)
    for entry, runs in sorted(by_entry.items()):
        cfg = results.resolved_entry(entry)
        curves: dict[str, tuple[dict[str, Any], dict[float, float]]] = {}
        for run in runs:
            info = protocol_info(run.protocol, run)
            flags.extend(meta_flags(run, cfg))
            if info["kind"] not in BLACKBOX_KINDS + WHITEBOX_KINDS:
                continue
            curve = eps_curve(results, run)
            cc = clean_counts(results.outcomes(run))
            clean = cc[0] / cc[1] if cc and cc[1] else None
            curves[run.protocol] = (info, curve)
            flags.extend(curve_flags(entry, run.protocol, info["kind"], curve, clean))
        # pair white-box with black-box runs of the same paper and member choice
        for wp, (wi, wc) in sorted(curves.items()):
            if wi["kind"] not in WHITEBOX_KINDS:
                continue
            for bp, (bi, bc) in sorted(curves.items()):
                if bi["kind"] in BLACKBOX_KINDS and (bi["paper"], bi["member"]) == (wi["paper"], wi["member"]):
                    flags.extend(pair_flags(entry, wp, wc, bp, bc))
    return sorted(set(flags), key=lambda f: (f.entry, f.protocol, -1 if f.eps is None else f.eps, f.code, f.message))


def flags_frame(flags: list[Flag]) -> pd.DataFrame:
    return pd.DataFrame([f.__dict__ for f in flags], columns=["entry", "protocol", "eps", "code", "message"])
