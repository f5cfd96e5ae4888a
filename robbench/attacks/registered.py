"""The attacks a protocol can name: 'fgsm', 'pgd' (also momentum / M-DI2 / SGM / targeted / CW / DLR),
'deepfool' and 'autoattack'. Each registers ``make(params) -> AttackFn`` with an options dataclass;
``AttackFn(model, x, y, eps, **core_overrides) -> AttackResult`` (``.x_adv`` for the adversarial images).

``core_overrides`` are passed to :func:`robbench.attacks.core.iterative_attack` for the iterative attacks.
Each attack also declares its :class:`~robbench.attacks.capabilities.Capabilities` for given options:
the evaluation engine asks these (and passes only the settings they declare, as
:class:`~robbench.attacks.capabilities.AttackCall`) instead of reading the options.
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch
from torch import nn

from robbench.attacks.autoattack import AA_ATTACKS, autoattack
from robbench.attacks.capabilities import Capabilities
from robbench.attacks.core import AttackResult, iterative_attack
from robbench.attacks.deepfool import deepfool
from robbench.attacks.input_transforms import DiverseInput
from robbench.attacks.losses import get_loss
from robbench.attacks.sgm import skip_gradient
from robbench.config import opt
from robbench.errors import ConfigError
from robbench.registry import ATTACKS

Model = Callable[[torch.Tensor], torch.Tensor]
AttackFn = Callable[..., AttackResult]


def _check_loss(loss: str, kappa: float, mask_bug: bool, file: str | None) -> None:
    get_loss(loss, kappa=kappa, mask_bug=mask_bug, file=file)


# ----------------------------------------------------------------------------------------------
# FGSM
# ----------------------------------------------------------------------------------------------

@dataclass
class FGSMOptions:
    loss: Literal["ce", "cw", "dlr"] = opt("ce", help="advertorch GradientSignAttack default: CE "
                                                      "(DVERGE eval_wbox.py --convergence-check)")
    kappa: float = opt(0.0, min=0.0, help="CW confidence (C&W kappa = 0)")
    mask_bug: bool = opt(False, help="reproduce max((1-onehot)*z) of the DVERGE/MAD CW loss")
    norm: Literal["linf", "l2"] = opt("linf", help="linf = FGSM (Goodfellow et al. 2015); l2 = fast gradient method")


def fgsm_capabilities(p: FGSMOptions) -> Capabilities:
    # one core step without random start: per-sample eps through the core, nothing to seed
    return Capabilities(per_sample_eps=True)


@ATTACKS.register("fgsm", params=FGSMOptions, capabilities=fgsm_capabilities)
def make_fgsm(p: FGSMOptions) -> AttackFn:
    """x + eps*sign(grad) clipped to [0, 1] (advertorch GradientSignAttack): one core step, no init."""
    def fgsm(model: Model, x: torch.Tensor, y: torch.Tensor, eps: float | torch.Tensor, **kw: Any) -> AttackResult:
        args: dict[str, Any] = dict(norm=p.norm, steps=1, step_size=eps, init="none", restarts=1,
                                    loss=get_loss(p.loss, kappa=p.kappa, mask_bug=p.mask_bug))
        args.update(kw)
        return iterative_attack(model, x, y, eps, **args)
    return fgsm


# ----------------------------------------------------------------------------------------------
# PGD and its relatives
# ----------------------------------------------------------------------------------------------

@dataclass
class PGDOptions:
    norm: Literal["linf", "l2"] = opt("linf", help="advertorch LinfPGDAttack (DVERGE eval_wbox.py)")
    loss: Literal["ce", "cw", "dlr"] = opt("ce", help="eval_wbox.py --loss-fn xent (default)")
    kappa: float = opt(0.0, min=0.0, help="CW confidence: C&W/MAD kappa = 0; DVERGE eval uses 0.1 (set it)")
    mask_bug: bool = opt(False, help="CW: reproduce the reference's max((1-onehot)*z) masking (parity runs)")
    steps: int = opt(50, min=0, max=1_000_000, help="eval_wbox.py --steps 50")
    step_size: float | None = opt(None, min=0.0, help="absolute step; exclusive with rel_step")
    rel_step: float | None = opt(None, min=0.0, help="step = rel_step * eps (eval_wbox.py eps_iter = eps/5 -> 0.2); "
                                                     "default 0.2 when step_size is unset")
    restarts: int = opt(1, min=1, max=1000, help="random starts (eval_wbox.py uses 5: set it)")
    init: Literal["none", "uniform", "clean_or_uniform"] = opt(
        "uniform", help="advertorch rand_init=True: uniform in the eps ball")
    clean_prob: float = opt(0.2, min=0.0, max=1.0, help="clean_or_uniform: Xie & Yuille prob_start_from_clean 0.2")
    momentum: float | None = opt(None, min=0.0, help="MI-FGSM decay mu (Dong et al.: 1.0); none = plain PGD")
    momentum_floor: float = opt(1e-12, min=0.0, help="L1-norm floor: DVERGE distillation.py 1e-12 (advertorch 1e-6)")
    di_prob: float = opt(0.0, min=0.0, max=1.0, help="M-DI2-FGSM transform probability (DVERGE: 0.5); 0 = off")
    di_resize_back: bool = opt(True, help="resize the padded image back to the input size (see DiverseInput)")
    sgm_gamma: float = opt(1.0, min=0.0, max=1.0, help="SGM residual gradient decay (DVERGE: 0.2); 1 = off")
    sgm_blocks: Literal["all", "reference"] = opt("all", help="all residual blocks (SGM Eq. 8) or the "
                                                             "utils_sgm.py name rule (blocks *0 unscaled)")
    targeted: Literal["none", "random", "least_likely"] = opt(
        "none", help="random: target = (y + U{1..C-1}) mod C (Xie & Yuille adv_model.py)")
    labels_from: Literal["true", "prediction"] = opt("true", help="DI2-FGSM original attacks the model's predictions")
    keep: Literal["last", "best"] = opt("last", help="advertorch returns the last iterate")
    early_stop: bool | Literal["none", "restart", "step"] = opt(
        True, help="true/'restart': skip later restarts of fooled samples (identical any-restart result); "
                   "'step': also stop iterating at the first fooling iterate (= keep best flags)")
    record_steps: list[int] = opt([], min=0, help="also report accuracy after these iteration counts")
    seed: int = opt(0, min=0, help="restart r uses seed + r (eval_wbox.py: torch.manual_seed(r))")

    def validate(self, file: str) -> None:
        if self.step_size is not None and self.rel_step is not None:
            raise ConfigError("give step_size or rel_step, not both", file=file, field="step_size")
        if any(s > self.steps for s in self.record_steps):
            raise ConfigError(f"record_steps must be <= steps ({self.steps})", file=file, field="record_steps")
        if self.sgm_gamma == 0.0:
            raise ConfigError("sgm_gamma must be in (0, 1]; 1 = off", file=file, field="sgm_gamma")
        _check_loss(self.loss, self.kappa, self.mask_bug, file)


def _targets(model: Model, x: torch.Tensor, y: torch.Tensor, how: str, seed: int) -> torch.Tensor | None:
    if how == "none":
        return None
    with torch.no_grad():
        out = model(x)
    n_cls = out.shape[1]
    if how == "least_likely":
        return out.argmin(dim=1)
    g = torch.Generator().manual_seed(seed)
    shift = torch.randint(1, n_cls, (x.shape[0],), generator=g).to(y.device)
    return (y + shift) % n_cls  # uniform over the wrong classes


def sgm_context(model: Model, gamma: float, blocks: str) -> contextlib.AbstractContextManager[Any]:
    if gamma == 1.0:
        return contextlib.nullcontext()
    if not isinstance(model, nn.Module):
        raise ConfigError("SGM needs the model itself (an nn.Module with residual blocks)", field="sgm_gamma")
    return skip_gradient(model, gamma, blocks=blocks)  # type: ignore[arg-type]


def pgd_capabilities(p: PGDOptions) -> Capabilities:
    return Capabilities(
        per_sample_eps=True, restarts=p.restarts, seed=p.seed,
        for_restart=lambda r: dataclasses.replace(p, restarts=1, seed=p.seed + r),
        # L-inf uniform start (one uniform value per element) is then the generators' only use
        stream_init=p.init == "uniform" and p.norm == "linf" and p.di_prob == 0.0,
        target_seed=p.seed if p.targeted == "random" else None,
        steps=p.steps, record_steps=tuple(sorted(set(p.record_steps))))


@ATTACKS.register("pgd", params=PGDOptions, capabilities=pgd_capabilities)
def make_pgd(p: PGDOptions) -> AttackFn:
    """PGD (Madry et al.) with the options above; momentum -> MI-FGSM, di_prob -> M-DI2-FGSM,
    sgm_gamma -> SGM, targeted -> Xie & Yuille's targeted PGD, loss cw -> CW-Linf (MAD)."""
    loss = get_loss(p.loss, kappa=p.kappa, mask_bug=p.mask_bug)
    rel = p.rel_step if p.rel_step is not None else (0.2 if p.step_size is None else None)
    transform = DiverseInput(p=p.di_prob, resize_back=p.di_resize_back) if p.di_prob > 0 else None

    def pgd(model: Model, x: torch.Tensor, y: torch.Tensor, eps: float | torch.Tensor, **kw: Any) -> AttackResult:
        step = p.step_size if rel is None else rel * (eps if isinstance(eps, torch.Tensor) else float(eps))
        seed = kw.get("seed", p.seed)
        # targets passed in (the engine draws them per sample id) win; else drawn here per call
        targets = kw.pop("targeted") if "targeted" in kw else _targets(model, x, y, p.targeted,
                                                                        0 if seed is None else seed)
        args: dict[str, Any] = dict(
            norm=p.norm, steps=p.steps, step_size=step, loss=loss, restarts=p.restarts, init=p.init,
            clean_prob=p.clean_prob, momentum=p.momentum, momentum_floor=p.momentum_floor,
            input_transform=transform, targeted=targets, early_stop=p.early_stop, keep=p.keep,
            seed=p.seed, record_steps=tuple(p.record_steps), labels_from=p.labels_from)
        args.update(kw)
        with sgm_context(model, p.sgm_gamma, p.sgm_blocks):
            return iterative_attack(model, x, y, eps, **args)
    return pgd


# ----------------------------------------------------------------------------------------------
# DeepFool
# ----------------------------------------------------------------------------------------------

@dataclass
class DeepFoolOptions:
    norm: Literal["l2"] = opt("l2", help="DeepFool L2 (EED: 'Except for DF using l2 norm')")
    steps: int = opt(50, min=1, max=100_000, help="original DeepFool max_iter = 50")
    overshoot: float = opt(0.02, min=0.0, help="original DeepFool overshoot = 0.02")
    candidates: int | None = opt(None, min=2, help="classes considered incl. the label (original: 10); none = all")
    success_rule: Literal["norm_within_eps", "project", "unbounded"] = opt(
        "norm_within_eps", help="norm_within_eps: fooled only if ||delta||_2 <= eps (else x_adv = x); "
                                "project: delta scaled into the eps ball, then re-evaluated; unbounded: minimal-norm result")
    labels_from: Literal["true", "prediction"] = opt("true", help="original attacks the clean prediction")


def deepfool_capabilities(p: DeepFoolOptions) -> Capabilities:
    # deterministic, one eps per call (the success rule compares with one eps); its steps are a budget,
    # not a reported curve
    return Capabilities()


@ATTACKS.register("deepfool", params=DeepFoolOptions, capabilities=deepfool_capabilities)
def make_deepfool(p: DeepFoolOptions) -> AttackFn:
    def attack(model: Model, x: torch.Tensor, y: torch.Tensor, eps: float | torch.Tensor, **kw: Any) -> AttackResult:
        r = deepfool(model, x, y, steps=p.steps, overshoot=p.overshoot, candidates=p.candidates,
                     labels_from=p.labels_from)
        y = y.to(x.device)
        e = torch.as_tensor(eps, dtype=x.dtype, device=x.device).expand(x.shape[0])
        if p.success_rule == "unbounded":
            x_adv, fooled = r.x_adv, r.fooled
        elif p.success_rule == "norm_within_eps":
            within = r.norms <= e
            x_adv = torch.where(within.reshape(-1, *([1] * (x.ndim - 1))), r.x_adv, x)
            fooled = r.fooled & within  # clean-misclassified samples have norm 0: fooled
        else:
            delta = r.x_adv - x
            scale = torch.minimum(e / r.norms.clamp_min(1e-12), torch.ones_like(e))
            x_adv = (x + delta * scale.reshape(-1, *([1] * (x.ndim - 1)))).clamp(0.0, 1.0)
            with torch.no_grad():
                fooled = model(x_adv).argmax(dim=1) != y
            r.stats["eval"] += x.shape[0]
        # objective = DeepFool's ||delta||_2 (the minimal-norm result, before the rule)
        return AttackResult(x_adv=x_adv, fooled=fooled, fooled_per_restart=fooled[None].clone(),
                            best_restart=torch.zeros_like(y), objective=r.norms, stats=r.stats)
    return attack


# ----------------------------------------------------------------------------------------------
# AutoAttack
# ----------------------------------------------------------------------------------------------

@dataclass
class AutoAttackOptions:
    version: Literal["standard", "plus", "rand", "custom"] = opt(
        "standard", help="fra31 versions; rand = APGD-CE/DLR with EOT 20 for randomized models")
    norm: Literal["linf", "l2", "l1"] = opt("linf")
    seed: int = opt(0, min=0, help="fra31 APGD default seed 0")
    attacks: list[str] = opt([], help=f"version custom only: any of {', '.join(AA_ATTACKS)}")
    n_iter: int | None = opt(None, min=1, help="override APGD/FAB iterations (100) for quick runs")
    n_queries: int | None = opt(None, min=1, help="override Square queries (5000) for quick runs")
    n_restarts: int | None = opt(None, min=1, help="override APGD/FAB restarts")
    n_target_classes: int | None = opt(None, min=1, help="override targeted classes (9)")
    eot_iter: int | None = opt(None, min=1, help="override EOT draws (rand: 20)")
    batch_size: int = opt(250, min=1, help="run_standard_evaluation default batch size")

    def validate(self, file: str) -> None:
        bad = [a for a in self.attacks if a not in AA_ATTACKS]
        if bad:
            raise ConfigError(f"unknown AutoAttack attack {bad[0]!r}; allowed: {', '.join(AA_ATTACKS)}",
                              file=file, field="attacks")
        if (self.version == "custom") != bool(self.attacks):
            raise ConfigError("attacks is required with version 'custom' and allowed only there",
                              file=file, field="attacks")


def autoattack_capabilities(p: AutoAttackOptions) -> Capabilities:
    # one eps per call; its restarts and seeds stay inside pyautoattack
    return Capabilities(seed=p.seed)


@ATTACKS.register("autoattack", params=AutoAttackOptions, capabilities=autoattack_capabilities)
def make_autoattack(p: AutoAttackOptions) -> AttackFn:
    def attack(model: Model, x: torch.Tensor, y: torch.Tensor, eps: float | torch.Tensor, **kw: Any) -> AttackResult:
        if isinstance(eps, torch.Tensor):
            if eps.numel() > 1 and not bool((eps == eps.flatten()[0]).all()):
                raise ValueError("AutoAttack takes one eps per call")
            eps = float(eps.flatten()[0])
        args: dict[str, Any] = dict(version=p.version, norm=p.norm, seed=p.seed, attacks=p.attacks or None,
                                    n_iter=p.n_iter, n_queries=p.n_queries, n_restarts=p.n_restarts,
                                    n_target_classes=p.n_target_classes, eot_iter=p.eot_iter,
                                    batch_size=p.batch_size)
        args.update({k: v for k, v in kw.items() if k in ("log", "seed", "batch_size")})
        return autoattack(model, x, y, float(eps), **args)
    return attack


def make_attack(name: str, params: Any = None, **options: Any) -> AttackFn:
    """Build a registered attack: ``make_attack('pgd', steps=10, loss='cw', kappa=0.1)``."""
    from robbench.config import parse_dataclass

    factory = ATTACKS.get(name)
    cls = ATTACKS.params(name)
    if params is None:
        params = parse_dataclass(cls, options, file=f"attack {name!r}") if cls is not None else None
    return factory(params)
