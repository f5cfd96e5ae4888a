"""Protocols: attack suites as data (``protocols/*.toml``), validated into dataclasses.

A protocol names the sample selection, the eps list, the attacks with all their parameters (validated
against each attack's options dataclass from the ``ATTACKS`` registry), the transfer sources and the
aggregation rule. ``load_protocol`` merges ``extends`` chains, applies ``--set`` overrides and the
``--n/--eps/--batch-size`` shortcuts (all recorded in ``Protocol.overrides``) and validates everything;
every mistake is a :class:`ConfigError` naming the file and the field (or the flag that caused it).

``--set`` reaches an attack's table by its id: ``attacks.<id>.<field>`` sets a field of the table
(``attacks.pgd-ce.eps=[0.1]``) and any other name is one of the attack's parameters
(``attacks.aa.n_iter=10`` = ``attacks.aa.params.n_iter=10``). Two overrides of one field with different
values (``--n 30 --set samples.n=20``) are refused.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from robbench.config import apply_overrides, blame_override, check_conflicts, config_hash, load_raw, to_dict
from robbench.errors import ConfigError
from robbench.evaluate.distillation import DistillationSpec
from robbench.paths import PROTOCOLS_DIR
from robbench.registry import ATTACKS
from robbench.schema import opt, parse_dataclass, parse_options

KINDS = ("whitebox", "transfer", "transferability", "autoattack", "clean", "convergence", "distillation")


@dataclass
class SampleSpec:
    selection: Literal["dverge", "first", "random", "all", "all_correct"] = opt(
        "dverge", help="dverge: random.seed(seed); random.sample(range(pool), n) (DVERGE eval scripts); "
                       "all_correct: samples every member classifies correctly, then the same seeded draw "
                       "(DVERGE eval_transferability.py)")
    n: int = opt(1000, min=1, help="number of samples")
    seed: int = opt(0, min=0, help="seed of the sample draw")
    split: Literal["test", "train"] = opt("test")
    pool: int | None = opt(None, min=1, help="draw from the first `pool` samples (default: the whole split)")


@dataclass
class AttackSpec:
    id: str = opt(help="the attack id stored in the results store (e.g. 'pgd-ce')")
    attack: str = opt(registry="attacks", help="attack name in the ATTACKS registry")
    params: dict[str, Any] = opt({}, help="the attack's options, validated by its options dataclass")
    and_group: str | None = opt(None, help="attacks in one group are AND-ed into one result in per-attack "
                                           "tables (DVERGE eval_bbox.py: the 3 M-PGD restarts)")
    on: Literal["target", "sources", "members"] | None = opt(
        None, help="where adversarial examples are crafted: the evaluated model (white-box), the transfer "
                   "sources (black-box) or each member (transferability); default from the protocol kind")
    eps: list[float] | None = opt(None, min=0.0, help="eps list for this attack only (default: protocol eps)")
    restarts_as_runs: int = opt(0, min=0, max=1000,
                                help="transferability: run R single-restart attacks seeded 0..R-1 and test "
                                     "each on every member (DVERGE eval_transferability.py); 0 = off")
    norm: Literal["linf", "l2"] | None = opt(None, help="this attack's norm when it differs from the protocol's "
                                                         "(EED: DeepFool is L2 inside an L-inf suite)")
    params_parsed: Any = field(default=None, init=False, repr=False, compare=False)


@dataclass
class AppliesTo:
    papers: list[str] = opt([], help="entry.paper must be one of these (empty: any)")
    tags: list[str] = opt([], help="entry must carry at least one of these tags (empty: any)")
    exclude_tags: list[str] = opt([], help="entries carrying any of these tags are skipped (e.g. holdout)")
    datasets: list[str] = opt([], help="entry's dataset must be one of these (empty: the protocol's datasets)")
    members: list[int] = opt([], help="ensemble sizes allowed (empty: any)")
    entries: list[str] = opt([], help="entry name patterns (fnmatch; empty: any)")


@dataclass
class Protocol:
    name: str
    description: str = ""
    paper: str = opt("", help="dverge | eio | eed | xie | robustbench | demo")
    citation: str = opt("", help="where the values come from")
    kind: Literal["whitebox", "transfer", "transferability", "autoattack", "clean", "convergence",
                  "distillation"] = opt("whitebox", help="distillation: a measurement, not an attack "
                                                         "(robbench.evaluate.distillation; DVERGE Table 2)")
    scaled: bool = opt(False, help="true = a scaled-down version of a paper protocol (say how in description)")
    datasets: list[str] = opt([], help="datasets the protocol applies to")
    samples: SampleSpec = field(default_factory=SampleSpec)
    eps: list[float] = opt([], min=0.0, help="perturbation budgets")
    norm: Literal["linf", "l2"] = "linf"
    batch_size: int = opt(200, min=1, max=1 << 20, help="samples per batch (DVERGE eval_wbox.py: 200)")
    aggregation: str = opt("all_or_nothing", registry="aggregations")
    early_stop: bool = opt(True, help="all-or-nothing only: a sample fooled at an eps by an earlier attack "
                                      "is not attacked again at that eps and is recorded as fooled")
    clean: bool = opt(True, help="store clean accuracy as attack 'clean', eps 0")
    eot_samples: int = opt(20, min=1, help="randomized models: EOT draws per gradient (AutoAttack rand: 20)")
    seed: int = opt(0, min=0, help="seed for per-batch randomness (random targets, random paths)")
    member: int | None = opt(None, min=0, help="evaluate only this member of the entry's ensemble "
                                               "(Ensemble-in-One '/3/1': one derived model; recorded)")
    sources: list[str] = opt([], help="transfer: entry names of the source (surrogate) models")
    attacks: list[AttackSpec] = opt([])
    distillation: DistillationSpec = field(default_factory=DistillationSpec)
    applies_to: AppliesTo = field(default_factory=AppliesTo)
    _extends: str | None = field(default=None, repr=True)
    source_file: str = field(default="", init=False, repr=False, compare=False)
    overrides: list[str] = field(default_factory=list, init=False, repr=False, compare=False)

    def validate(self, file: str) -> None:
        if self.kind == "distillation" or self.distillation != DistillationSpec():
            self._validate_distillation(file)
            return
        if self.kind != "clean" and not self.attacks:
            raise ConfigError("a protocol of this kind needs at least one [[attacks]] table", file=file,
                              field="attacks")
        if self.kind != "clean" and not self.eps and not any(a.eps for a in self.attacks):
            raise ConfigError("empty; give at least one eps", file=file, field="eps")
        seen: set[str] = set()
        for i, a in enumerate(self.attacks):
            if not a.id or "@" in a.id or "|" in a.id or a.id == "clean":
                raise ConfigError(f"{a.id!r}: ids must be non-empty, not 'clean', without '@' or '|'", file=file,
                                  field=f"attacks[{i}].id")
            if a.and_group is not None and (not a.and_group or "|" in a.and_group):
                raise ConfigError(f"{a.and_group!r}: a non-empty name without '|'", file=file,
                                  field=f"attacks[{i}].and_group")
            if a.id in seen:
                raise ConfigError(f"duplicate attack id {a.id!r}", file=file, field=f"attacks[{i}].id")
            seen.add(a.id)
            on = self.attack_on(a)
            if on == "sources" and not self.sources:
                raise ConfigError("transfer attacks need source entries", file=file, field="sources")
            for e in self.attack_eps(a):
                if e <= 0:
                    raise ConfigError(f"eps {e!r} cannot change the input; clean accuracy is stored as attack "
                                      "'clean'; allowed: eps > 0", file=file,
                                      field=f"attacks[{i}].eps" if a.eps else "eps")
        if self.kind == "transfer" and not self.sources:
            raise ConfigError("a transfer protocol needs source entries", file=file, field="sources")
        if self.samples.selection != "all_correct" and self.kind == "transferability":
            raise ConfigError("transferability samples are those every member classifies correctly; "
                              "allowed: 'all_correct'", file=file, field="samples.selection")

    def _validate_distillation(self, file: str) -> None:
        if self.kind != "distillation":
            raise ConfigError(f"a [distillation] table belongs to kind = \"distillation\", not {self.kind!r}",
                              file=file, field="distillation")
        if self.attacks:
            raise ConfigError("a distillation protocol measures, it runs no attacks; allowed: no [[attacks]]",
                              file=file, field="attacks")
        if self.member is not None:
            raise ConfigError("distillation measures pairs of members; pick them with distillation.members",
                              file=file, field="member")
        if not self.eps:
            raise ConfigError("empty; give at least one eps", file=file, field="eps")
        for e in self.eps:
            if e <= 0:
                raise ConfigError(f"eps {e!r} cannot change the input; allowed: eps > 0", file=file, field="eps")
        if len(set(self.distillation.members)) != len(self.distillation.members):
            raise ConfigError("a member is named twice", file=file, field="distillation.members")
        if self.distillation.members and len(self.distillation.members) < 2:
            raise ConfigError("distillation runs from member i to member j; allowed: >= 2 members (or [] = all)",
                              file=file, field="distillation.members")

    # --------------------------------------------------------------------------------------------
    def attack_on(self, a: AttackSpec) -> str:
        if a.on is not None:
            return a.on
        return {"transfer": "sources", "transferability": "members"}.get(self.kind, "target")

    def attack_eps(self, a: AttackSpec) -> list[float]:
        return list(a.eps) if a.eps else list(self.eps)

    def resolved(self) -> dict[str, Any]:
        d = to_dict(self)
        d.pop("source_file", None)
        if self.kind != "distillation":  # other kinds' resolved protocol (and hash) stay as they were
            d.pop("distillation", None)
        for a, ad in zip(self.attacks, d["attacks"]):
            ad.pop("params_parsed", None)
            if a.params_parsed is not None:
                ad["params"] = to_dict(a.params_parsed)
        return d

    def sha256(self) -> str:
        """Hash of the resolved protocol (overrides applied, attack defaults filled)."""
        return config_hash(self.resolved())

    def applies(self, entry: Any) -> bool:
        """Whether a zoo entry (``robbench.config.ZooEntry``) is a target of this protocol."""
        f = self.applies_to
        datasets = f.datasets or self.datasets
        if datasets and entry.data.dataset not in datasets:
            return False
        if f.papers and entry.paper not in f.papers:
            return False
        tags = set(getattr(entry, "tags", []) or [])
        if f.tags and not tags & set(f.tags):
            return False
        if tags & set(f.exclude_tags):
            return False
        if f.members and entry.model.members not in f.members:
            return False
        if f.entries and not any(fnmatch.fnmatch(entry.name, p) for p in f.entries):
            return False
        if entry.name in self.sources:
            return False
        return True


def _attack_params(a: AttackSpec, norm: str, file: str, i: int) -> Any:
    """Validate ``a.params`` with the attack's options dataclass; fill the protocol's norm."""
    cls = ATTACKS.params(a.attack)
    prefix = f"attacks[{i}].params"
    params = dict(a.params)
    if cls is not None and "norm" in {f.name for f in dataclasses.fields(cls)}:
        if "norm" in params and params["norm"] != norm:
            raise ConfigError(f"{params['norm']!r} differs from the protocol's norm {norm!r}", file=file,
                              field=f"{prefix}.norm")
        params["norm"] = norm
    return parse_options(cls, params, file=file, prefix=prefix, what=f"attack {a.attack!r}")


def _check_attack_changes_input(proto: Protocol, file: str) -> None:
    """An attack that declares 0 iterations returns its starting point: that is not an attack result."""
    for i, a in enumerate(proto.attacks):
        caps = ATTACKS.capabilities(a.attack, a.params_parsed)
        if caps is not None and caps.steps == 0:
            raise ConfigError("0 steps: the attack returns its starting point (clean input or random noise), "
                              "which is not an attack result; allowed: steps >= 1", file=file,
                              field=f"attacks[{i}].params.steps")


_ATTACK_TABLE_FIELDS = {f.name for f in dataclasses.fields(AttackSpec) if f.init}


def _attack_param_override(text: str) -> str:
    """``attacks.<id>.<name>=v`` with ``<name>`` not a field of the attack table -> ``attacks.<id>.params.<name>=v``."""
    key, sep, value = text.partition("=")
    parts = key.strip().split(".")
    if sep and len(parts) >= 3 and parts[0] == "attacks" and parts[2] not in _ATTACK_TABLE_FIELDS:
        return ".".join([*parts[:2], "params", *parts[2:]]) + "=" + value
    return text


def shortcut_overrides(n: int | None = None, eps: list[float] | str | None = None,
                       batch_size: int | None = None) -> dict[str, str]:
    """The ``--n/--eps/--batch-size`` flags as overrides -> the flag each came from."""
    out: dict[str, str] = {}
    if n is not None:
        out[f"samples.n={int(n)}"] = f"--n {n}"
    if eps is not None:
        if isinstance(eps, str):
            try:
                vals = [float(v) for v in eps.split(",") if v.strip()]
            except ValueError:
                raise ConfigError(f"expected comma-separated numbers, got {eps!r}", file="--eps") from None
            if not vals:
                raise ConfigError(f"expected comma-separated numbers, got {eps!r}", file="--eps")
        else:
            vals = [float(v) for v in eps]
        text = ",".join(str(v) for v in eps) if not isinstance(eps, str) else eps
        out["eps=[" + ", ".join(repr(v) for v in vals) + "]"] = f"--eps {text}"
    if batch_size is not None:
        out[f"batch_size={int(batch_size)}"] = f"--batch-size {batch_size}"
    return out


def load_protocol(name: str, overrides: list[str] | None = None, *, n: int | None = None,
                  eps: list[float] | str | None = None, batch_size: int | None = None) -> Protocol:
    """Load, merge, override and validate a protocol (``NAME``, ``protocols/NAME`` or a path).

    ``n``, ``eps`` and ``batch_size`` are the CLI shortcuts; they become ``samples.n=…``, ``eps=[…]`` and
    ``batch_size=…`` overrides so they are validated and recorded like any ``--set``; an error they
    cause names the flag, and one that conflicts with a ``--set`` of the same field is refused.
    """
    flags = shortcut_overrides(n, eps, batch_size)
    typed = {_attack_param_override(o): o for o in (overrides or [])}
    ov = list(typed) + list(flags)
    flags.update({o: f"--set {t}" for o, t in typed.items() if o != t})  # errors show what was typed
    check_conflicts(ov, flags)
    raw, path = load_raw(name, PROTOCOLS_DIR, "protocol")
    file = str(path)
    try:
        raw = apply_overrides(raw, ov)
        raw.setdefault("name", path.stem)
        if "distillation" in raw and raw.get("kind") != "distillation":
            raise ConfigError(f"a [distillation] table belongs to kind = \"distillation\", not "
                              f"{raw.get('kind', 'whitebox')!r}", file=file, field="distillation")
        proto = parse_dataclass(Protocol, raw, file=file)
        proto.source_file = file
        proto.overrides = ov
        for i, a in enumerate(proto.attacks):
            a.params_parsed = _attack_params(a, a.norm or proto.norm, file, i)
        _check_attack_changes_input(proto, file)
    except ConfigError as e:
        by_id = _by_attack_id(e, raw)
        blamed = blame_override(by_id, ov, flags)
        raise (blame_override(e, ov, flags) if blamed is by_id else blamed) from None
    return proto


def _by_attack_id(err: ConfigError, raw: dict[str, Any]) -> ConfigError:
    """``attacks[2].params.n_iter`` -> ``attacks.aa.params.n_iter`` (the form ``--set`` uses), so an
    error an ``--set attacks.aa...`` override caused is blamed on it."""
    m = re.match(r"attacks\[(\d+)\](.*)", err.field or "")
    attacks = raw.get("attacks") if isinstance(raw, dict) else None
    if not m or not isinstance(attacks, list) or int(m.group(1)) >= len(attacks):
        return err
    a = attacks[int(m.group(1))]
    if not isinstance(a, dict) or not isinstance(a.get("id"), str):
        return err
    return ConfigError(err.detail, file=err.file, field=f"attacks.{a['id']}{m.group(2)}", reason=err.reason)
