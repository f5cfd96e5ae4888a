"""The one iterative attack core: PGD / BIM / FGSM / MI-FGSM / (M-)DI2-FGSM / SGM / feature distillation.

One loop with small pluggable parts, each a function here or in a sibling module:

- loss (``losses.py``): per-sample objective, ascended (``descend=True`` minimises, e.g. feature MSE);
- gradient transform: sign (L-inf) or L2-normalisation, optionally momentum
  g <- mu*g + grad/||grad||_1 per sample (MI-FGSM; advertorch ``MomentumIterativeAttack``, DVERGE
  ``distillation.py``);
- input transform (``input_transforms.DiverseInput``), applied to the gradient forward only;
- gradient hooks: SGM is a model property (``sgm.skip_gradient``), so the core needs nothing for it;
- init: none, uniform in the ball, clean-with-probability-q (one draw per batch), or an injected delta;
- projection: L-inf or L2 ball, then the box ``clip``.

Exactness. The update is advertorch ``perturb_iterative`` operation for operation (a perturbation
``delta`` is iterated; L-inf: delta + a*sign(g), clamp to eps, clip x+delta; L2: delta + a*g/max(||g||,1e-6),
clip, rescale into the ball). Random init as advertorch ``rand_init_delta`` for L-inf
(``uniform_(-1, 1) * eps``). Restart r draws from a generator seeded with ``seed + r``: the DVERGE
reference (eval/eval_wbox.py) runs ``torch.manual_seed(r)`` before restart r, so ``seed=0`` reproduces
it on the first batch. The reference seeds once per restart for the *whole* test set; pass the same
``rng`` list for consecutive batches to continue each restart's stream as it does. The init noise is
always drawn for the whole batch (also for samples skipped by early stop) so the stream never shifts.

``iterate='x'`` (L-inf only) is the DVERGE reference's form instead (``distillation.py`` ``Linf_PGD`` /
``Linf_distillation``): the iterate x' itself is updated in place, x' <- x' + a*sign(g), then
``torch.max(torch.min(x', x+eps), x-eps)`` and ``clamp(0, 1)``; momentum normalises by division,
``grad / clamp(torch.norm(grad, 1), min=floor)``. Both forms are the same maths, but x' - a*s and
x + (delta - a*s) round differently in the last bit, which flips the sign of near-zero momentum
components after a few steps: each form equals its reference to the bit, not the other one.

Speed. Gradients are taken with ``torch.autograd.grad`` w.r.t. the input only (no parameter .grad is
written, weight gradients are not computed). Early stop: with ``early_stop='restart'`` (or True) a
sample already fooled is not attacked by later restarts -- any-restart results are identical, that work
is skipped. With ``early_stop='step'`` a sample also stops iterating at its first fooling iterate; its
result is then that iterate ("fooled at any iterate"), the same flags as ``keep='best'``.
The core never changes the model's train/eval mode (the caller decides: DVERGE distils in train mode).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal, Sequence

import torch

from robbench.attacks.losses import AttackLoss, Target, get_loss

Norm = Literal["linf", "l2"]
Init = Literal["none", "uniform", "clean_or_uniform"]
EarlyStop = bool | Literal["none", "restart", "step"]
Iterate = Literal["delta", "x"]
Model = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class AttackResult:
    """What an attack returns. ``fooled[i]``: the model misclassifies ``x_adv[i]`` w.r.t. the given
    labels (for a targeted attack too: robust accuracy is about the true label).

    - ``fooled_per_restart[r, i]``: restart r fooled sample i (False where it did not run: ``ran``);
    - ``step_correct[s][i]``: sample i correctly classified after s iterations under every restart
      (``keep='best'``/``early_stop='step'``: at every iterate up to s) -- one run gives PGD-s for all s;
    - ``best_restart[i]``: the restart whose iterate is ``x_adv[i]`` (-1: none ran, x_adv = x);
    - ``objective[i]``: the loss of the returned iterate (nan when not evaluated);
    - ``x_adv_per_restart``: [R, B, ...] when asked for (``keep_restarts=True``);
    - ``stats``: work done, in sample-passes: ``grad`` (forward+backward) and ``eval`` (forward only);
    - ``warnings``: messages from checks (AutoAttack's gradient-masking checks).
    """

    x_adv: torch.Tensor
    fooled: torch.Tensor
    fooled_per_restart: torch.Tensor
    step_correct: dict[int, torch.Tensor] = field(default_factory=dict)
    best_restart: torch.Tensor | None = None
    objective: torch.Tensor | None = None
    ran: torch.Tensor | None = None
    x_adv_per_restart: torch.Tensor | None = None
    stats: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def correct(self) -> torch.Tensor:
        return ~self.fooled


# ----------------------------------------------------------------------------------------------
# Small parts
# ----------------------------------------------------------------------------------------------

def per_sample(value: float | torch.Tensor, batch: int, like: torch.Tensor) -> torch.Tensor:
    """A float or a [B] tensor as a float tensor [B, 1, ..., 1] broadcastable against ``like``."""
    t = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    if t.ndim == 0:
        t = t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"expected a float or a tensor of shape [{batch}], got shape {tuple(t.shape)}")
    return t.reshape(batch, *([1] * (like.ndim - 1)))


def flat_norm(t: torch.Tensor, p: float) -> torch.Tensor:
    """Per-sample Lp norm, shaped [B, 1, ..., 1], computed as advertorch ``_get_norm_batch`` does
    (|t|^p summed, ^(1/p)) so results agree with it to the last bit."""
    n = t.abs().pow(p).flatten(1).sum(dim=1).pow(1.0 / p)
    return n.reshape(-1, *([1] * (t.ndim - 1)))


def make_generators(seed: int | None, restarts: int, device: torch.device) -> list[torch.Generator | None]:
    """One generator per restart, seeded ``seed + r`` (DVERGE: torch.manual_seed(r) before restart r).
    ``seed=None`` draws from the global RNG (not reproducible)."""
    if seed is None:
        return [None] * restarts
    gens = []
    for r in range(restarts):
        g = torch.Generator(device=device)
        g.manual_seed(int(seed) + r)
        gens.append(g)
    return gens


def draw_init(x: torch.Tensor, eps: torch.Tensor, init: Init | torch.Tensor, norm: Norm,
              generator: torch.Generator | None, clean_prob: float = 0.2, tiles: int = 1,
              clip: tuple[float, float] | None = (0.0, 1.0), init_rows: torch.Tensor | None = None,
              init_base: int | None = None) -> torch.Tensor:
    """The starting perturbation delta0 for the whole batch.

    'uniform', L-inf: advertorch ``rand_init_delta``: ``uniform_(-1, 1) * eps`` then clip x+delta.
    'uniform', L2: uniform in the L2 ball (Gaussian direction, radius eps*U^(1/d)), then clip.
    'clean_or_uniform': one draw per batch, clean with probability ``clean_prob`` (Xie & Yuille,
    ImageNet-Adversarial-Training ``prob_start_from_clean`` = 0.2 in training), else 'uniform'.
    A tensor is used as delta0 as it is (inject the init of a peer implementation).
    ``tiles``: x is ``tiles`` stacked copies of one base batch (eps batching); the noise is drawn for the
    base batch and repeated, so every eps block sees what a separate run would.
    ``init_rows``: the general form: row i of x takes the noise of row ``init_rows[i]`` of a base batch
    of ``init_base`` rows (default max + 1), so packed (eps, sample) pairs still draw what a run on the
    base batch (e.g. the reference's batch of 200) would.
    """
    if isinstance(init, torch.Tensor):
        if init.shape != x.shape:
            raise ValueError(f"init tensor has shape {tuple(init.shape)}, x has {tuple(x.shape)}")
        return init.to(x).clone()
    if init == "none":
        return torch.zeros_like(x)
    if init_rows is not None:
        n_base = int(init_base) if init_base is not None else int(init_rows.max().item()) + 1
        if init_rows.shape != (x.shape[0],) or int(init_rows.max().item()) >= n_base:
            raise ValueError(f"init_rows must be [{x.shape[0]}] indices below init_base={n_base}")
        base = (n_base, *x.shape[1:])
    elif x.shape[0] % tiles:
        raise ValueError(f"batch {x.shape[0]} is not a multiple of tiles={tiles}")
    else:
        base = (x.shape[0] // tiles, *x.shape[1:])
    dev = x.device if generator is None else generator.device
    if init == "clean_or_uniform":
        if float(torch.rand((1,), generator=generator, device=dev).item()) < clean_prob:
            return torch.zeros_like(x)
    elif init != "uniform":
        raise ValueError(f"unknown init {init!r}; allowed: none, uniform, clean_or_uniform or a tensor")
    if norm == "linf":
        u = torch.empty(base, dtype=x.dtype, device=dev).uniform_(-1, 1, generator=generator)
    else:
        d = int(torch.tensor(base[1:]).prod().item())
        direction = torch.randn(base, dtype=x.dtype, device=dev, generator=generator)
        radius = torch.rand((base[0],), dtype=x.dtype, device=dev, generator=generator).pow(1.0 / d)
        u = direction / flat_norm(direction, 2).clamp_min(1e-12) * radius.reshape(-1, *([1] * (x.ndim - 1)))
    u = u.to(x.device)
    if init_rows is not None:
        u = u[init_rows.to(x.device)]
    elif tiles > 1:
        u = u.repeat(tiles, *([1] * (x.ndim - 1)))
    delta = u * eps
    if clip is not None:
        # twice, as advertorch (rand_init_delta clips, then PGDAttack.perturb clips again): x + (c - x)
        # need not equal c in floating point, and parity to the last bit needs the same operations
        delta = (x + delta).clamp(*clip) - x
        delta = (x + delta).clamp(*clip) - x
    return delta


def momentum_update(g: torch.Tensor, grad: torch.Tensor, mu: float, floor: float) -> torch.Tensor:
    """MI-FGSM: g <- mu*g + grad / max(||grad||_1, floor) per sample. The floor is 1e-12 in DVERGE
    ``distillation.py`` and 1e-6 in advertorch ``normalize_by_pnorm``; it only matters for tiny gradients."""
    return mu * g + grad * (1.0 / flat_norm(grad, 1).clamp_min(floor))  # advertorch multiplies by 1/norm


def momentum_update_x(g: torch.Tensor, grad: torch.Tensor, mu: float, floor: float) -> torch.Tensor:
    """:func:`momentum_update` as DVERGE ``distillation.py`` writes it (``iterate='x'``): the L1 norm by
    ``torch.norm`` and a division, ``mu*g + grad / clamp(||grad||_1, min=floor)``, to the reference's bit."""
    l1 = torch.norm(grad.reshape(grad.shape[0], -1), 1, dim=1)
    return mu * g + grad / torch.clamp(l1, min=floor).reshape(-1, *([1] * (grad.ndim - 1)))


def step_and_project_x(xa: torch.Tensor, direction: torch.Tensor, x: torch.Tensor, eps: torch.Tensor,
                       step: torch.Tensor, clip: tuple[float, float] | None) -> torch.Tensor:
    """One L-inf ascent step on the iterate itself, in DVERGE ``Linf_PGD``/``Linf_distillation``'s order
    (``iterate='x'``): x' + a*sign(d), ``max(min(x', x+eps), x-eps)``, clamp to the box."""
    xa = xa + step * direction.sign()
    xa = torch.max(torch.min(xa, x + eps), x - eps)
    if clip is not None:
        xa = torch.clamp(xa, *clip)
    return xa


def step_and_project(delta: torch.Tensor, direction: torch.Tensor, x: torch.Tensor, eps: torch.Tensor,
                     step: torch.Tensor, norm: Norm, clip: tuple[float, float] | None) -> torch.Tensor:
    """One ascent step on ``direction`` and the projection, in advertorch's order.

    L-inf: delta + step*sign(d), clamp to [-eps, eps], clip x+delta to the box.
    L2: delta + step*d/max(||d||_2, 1e-6), clip to the box, rescale by min(1, eps/||delta||_2)
    (scaling towards x keeps x+delta inside the box).
    """
    if norm == "linf":
        delta = delta + step * direction.sign()
        delta = torch.minimum(torch.maximum(delta, -eps), eps)
        if clip is not None:
            delta = (x + delta).clamp(*clip) - x
        return delta
    delta = delta + step * (direction * (1.0 / flat_norm(direction, 2).clamp_min(1e-6)))
    if clip is not None:
        delta = (x + delta).clamp(*clip) - x
    factor = torch.minimum(eps / flat_norm(delta, 2), torch.ones_like(eps))
    return delta * factor


def project(delta: torch.Tensor, eps: torch.Tensor, norm: Norm) -> torch.Tensor:
    """Projection onto the eps ball (no step)."""
    if norm == "linf":
        return torch.minimum(torch.maximum(delta, -eps), eps)
    return delta * torch.minimum(eps / flat_norm(delta, 2), torch.ones_like(eps))


def _early_stop_mode(early_stop: EarlyStop) -> str:
    if early_stop is True:
        return "restart"
    if early_stop is False or early_stop is None:
        return "none"
    if early_stop not in ("none", "restart", "step"):
        raise ValueError(f"early_stop must be False, True, 'restart' or 'step', got {early_stop!r}")
    return str(early_stop)


# ----------------------------------------------------------------------------------------------
# One restart
# ----------------------------------------------------------------------------------------------

@dataclass
class _RestartOut:
    x: torch.Tensor
    fooled: torch.Tensor
    objective: torch.Tensor
    step_correct: dict[int, torch.Tensor]


def _run_restart(model: Model, x0: torch.Tensor, y_att: torch.Tensor, y_true: torch.Tensor,
                 target: Target, eps: torch.Tensor, step: torch.Tensor, delta: torch.Tensor, *,
                 norm: Norm, steps: int, loss: AttackLoss, momentum: float | None, momentum_floor: float,
                 input_transform: Callable[..., torch.Tensor] | None, generator: torch.Generator | None,
                 sign: float, mode: str, keep: str, record: Sequence[int], evaluate: bool,
                 clip: tuple[float, float] | None, stats: dict[str, int], iterate: Iterate = "delta") -> _RestartOut:
    n = x0.shape[0]
    on_x = iterate == "x"
    if on_x:  # iterate x' itself (DVERGE reference): x' starts at the clipped init, as Linf_PGD's clamp
        delta = x0 + delta
        if clip is not None:
            delta = torch.clamp(delta, *clip)
    dev = x0.device
    classifies = evaluate and loss.classifies
    best_so_far = keep == "best" or mode == "step"
    step_eval = classifies and (keep == "best" or mode == "step")
    record_set = set(record) if classifies else set()

    x_res = x0.clone()
    fooled_res = torch.zeros(n, dtype=torch.bool, device=dev)
    obj_res = torch.full((n,), float("nan"), dtype=x0.dtype, device=dev)
    step_corr = {s: torch.ones(n, dtype=torch.bool, device=dev) for s in record_set}
    if keep == "best":
        best_x = (delta if on_x else x0 + delta).clone()
        best_obj = torch.full((n,), float("-inf"), dtype=x0.dtype, device=dev)
        best_correct = torch.ones(n, dtype=torch.bool, device=dev)

    alive = torch.arange(n, device=dev)  # rows still iterating
    g = torch.zeros_like(x0) if momentum is not None else None
    tgt_tensor = target if isinstance(target, torch.Tensor) else None

    def tgt(rows: torch.Tensor) -> Target:
        if tgt_tensor is not None:
            return tgt_tensor[rows]
        return target  # None or a callable (feature targets of the caller's batch)

    for t in range(steps + 1):
        last = t == steps
        xa = delta if on_x else x0[alive] + delta  # ``delta`` holds x' itself when on_x
        out_d = obj_d = None
        grad = None
        if not last:
            xin = xa.detach().requires_grad_(True)
            inp = input_transform(xin, generator) if input_transform is not None else xin
            out = model(inp)
            obj = loss(out, y_att[alive], tgt(alive))
            grad = torch.autograd.grad(obj.sum() * sign, xin)[0]
            stats["grad"] += int(alive.numel())
            if input_transform is None:
                out_d, obj_d = out.detach(), obj.detach()
        if classifies and (last or step_eval or t in record_set):
            if out_d is None:
                with torch.no_grad():
                    out_d = model(xa)
                    obj_d = loss(out_d, y_att[alive], tgt(alive))
                stats["eval"] += int(alive.numel())
            correct = out_d.argmax(dim=1) == y_true[alive]
            xa_d = xa.detach()
            if keep == "best":
                bc, bo = best_correct[alive], best_obj[alive]
                better = (bc & ~correct) | ((bc == correct) & (obj_d > bo))
                rows = alive[better]
                best_x[rows] = xa_d[better]
                best_obj[rows] = obj_d[better]
                best_correct[rows] = correct[better]
            if t in record_set:
                step_corr[t][alive] = best_correct[alive] if keep == "best" else correct
            if last:
                if keep == "best":
                    x_res[alive], obj_res[alive] = best_x[alive], best_obj[alive]
                    fooled_res[alive] = ~best_correct[alive]
                else:
                    x_res[alive], obj_res[alive], fooled_res[alive] = xa_d, obj_d, ~correct
                break
            if mode == "step":
                done = ~correct
                if done.any():
                    rows = alive[done]
                    x_res[rows] = best_x[rows] if keep == "best" else xa_d[done]
                    obj_res[rows] = best_obj[rows] if keep == "best" else obj_d[done]
                    fooled_res[rows] = True
                    for s in record_set:
                        if s > t:  # frozen at a fooling iterate: fooled at every later count
                            step_corr[s][rows] = False
                    keep_rows = ~done
                    alive, delta, grad = alive[keep_rows], delta[keep_rows], grad[keep_rows]
                    if g is not None:
                        g = g[keep_rows]
                    if alive.numel() == 0:
                        break
        elif last:
            x_res[alive] = xa.detach()
            break
        assert grad is not None
        direction = grad
        if g is not None:
            update = momentum_update_x if on_x else momentum_update
            g = update(g, grad, float(momentum), momentum_floor)  # type: ignore[arg-type]
            direction = g
        if on_x:
            delta = step_and_project_x(delta, direction, x0[alive], eps[alive], step[alive], clip).detach()
        else:
            delta = step_and_project(delta, direction, x0[alive], eps[alive], step[alive], norm, clip).detach()
    if clip is not None:
        x_res = x_res.clamp(*clip)  # advertorch returns clamp(x + delta)
    return _RestartOut(x_res, fooled_res, obj_res, step_corr)


# ----------------------------------------------------------------------------------------------
# The core
# ----------------------------------------------------------------------------------------------

def iterative_attack(
    model: Model,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float | torch.Tensor,
    *,
    norm: Norm = "linf",
    steps: int,
    step_size: float | torch.Tensor,
    loss: str | AttackLoss = "ce",
    restarts: int = 1,
    init: Init | torch.Tensor = "uniform",
    clean_prob: float = 0.2,
    momentum: float | None = None,
    momentum_floor: float = 1e-12,
    input_transform: Callable[..., torch.Tensor] | None = None,
    targeted: torch.Tensor | None | bool = None,
    feature_target: Target = None,
    descend: bool = False,
    early_stop: EarlyStop = False,
    keep: Literal["last", "best"] = "last",
    seed: int | None = 0,
    rng: Sequence[torch.Generator | None] | None = None,
    tiles: int = 1,
    init_rows: torch.Tensor | None = None,
    init_base: int | None = None,
    record_steps: Sequence[int] = (),
    clip: tuple[float, float] | None = (0.0, 1.0),
    labels_from: Literal["true", "prediction"] = "true",
    evaluate: bool = True,
    keep_restarts: bool = False,
    iterate: Iterate = "delta",
) -> AttackResult:
    """Run the iterative attack; see the module docstring for the exact semantics.

    ``model``: any callable x -> output (logits, log-probabilities, or features for ``feature_mse``).
    ``eps``/``step_size``: floats or per-sample tensors [B] (batch several eps by repeating x; pass
    ``tiles`` so each copy draws the same init noise as a separate run; ``init_rows``/``init_base`` for
    any packing, see :func:`draw_init`).
    ``targeted``: target labels [B] (loss variant moving towards them); ``feature_target``: target
    features or a zero-argument callable for ``feature_mse``.
    ``labels_from='prediction'``: attack the model's clean predictions (DI2-FGSM uses the predictions
    of iteration 0); ``fooled`` is still w.r.t. ``y``.
    ``evaluate=False``: no forward pass beyond the ``steps`` gradient passes (training in train mode:
    an extra forward would update BatchNorm statistics); ``fooled`` is then all False.
    ``seed``/``rng``: restart r uses ``rng[r]`` if given, else a generator seeded ``seed + r``.
    ``iterate``: 'delta' iterates the perturbation (advertorch ``perturb_iterative``, to its bit);
    'x' updates x' in place (DVERGE ``distillation.py``, to its bit; L-inf only). See the module docstring.
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if restarts < 1:
        raise ValueError(f"restarts must be >= 1, got {restarts}")
    if norm not in ("linf", "l2"):
        raise ValueError(f"norm must be 'linf' or 'l2', got {norm!r}")
    if keep not in ("last", "best"):
        raise ValueError(f"keep must be 'last' or 'best', got {keep!r}")
    if iterate not in ("delta", "x"):
        raise ValueError(f"iterate must be 'delta' or 'x', got {iterate!r}")
    if iterate == "x" and norm != "linf":
        raise ValueError("iterate='x' (the DVERGE reference's update) exists for norm='linf' only")
    mode = _early_stop_mode(early_stop)
    loss_fn = get_loss(loss)
    record = sorted({int(s) for s in record_steps})
    if record and (record[0] < 0 or record[-1] > steps):
        raise ValueError(f"record_steps must lie in [0, {steps}], got {record}")
    classifies = evaluate and loss_fn.classifies
    if not classifies and (keep == "best" or mode != "none" or record):
        raise ValueError("keep='best', early_stop and record_steps need evaluate=True and a classification loss")
    if isinstance(targeted, bool):
        targeted = None
    target: Target = targeted if targeted is not None else feature_target
    sign = -1.0 if descend else 1.0

    x = x.detach()
    bsz = x.shape[0]
    dev = x.device
    y = y.to(dev)
    eps_t = per_sample(eps, bsz, x)
    step_t = per_sample(step_size, bsz, x)
    stats = {"grad": 0, "eval": 0}
    if labels_from == "prediction":
        with torch.no_grad():
            y_att = model(x).argmax(dim=1)
        stats["eval"] += bsz
    elif labels_from == "true":
        y_att = y
    else:
        raise ValueError(f"labels_from must be 'true' or 'prediction', got {labels_from!r}")

    gens = list(rng) if rng is not None else make_generators(seed, restarts, dev)
    if len(gens) < restarts:
        raise ValueError(f"rng has {len(gens)} generators for {restarts} restarts")

    x_out = x.clone()
    fooled = torch.zeros(bsz, dtype=torch.bool, device=dev)
    fooled_pr = torch.zeros(restarts, bsz, dtype=torch.bool, device=dev)
    ran = torch.zeros(restarts, bsz, dtype=torch.bool, device=dev)
    best_restart = torch.full((bsz,), -1, dtype=torch.long, device=dev)
    objective = torch.full((bsz,), float("nan"), dtype=x.dtype, device=dev)
    step_correct = {s: torch.ones(bsz, dtype=torch.bool, device=dev) for s in record} if classifies else {}
    per_restart = x.unsqueeze(0).repeat(restarts, *([1] * x.ndim)) if keep_restarts else None
    done = torch.zeros(bsz, dtype=torch.bool, device=dev)

    for r in range(restarts):
        # drawn for the whole batch, also for skipped samples, so the random stream never shifts
        delta0 = draw_init(x, eps_t, init, norm, gens[r], clean_prob, tiles, clip, init_rows, init_base)
        act = (~done).nonzero().squeeze(1) if mode != "none" else torch.arange(bsz, device=dev)
        if act.numel() == 0:
            continue
        sub_target: Target = target[act] if isinstance(target, torch.Tensor) else target
        out = _run_restart(
            model, x[act], y_att[act], y[act], sub_target, eps_t[act], step_t[act], delta0[act],
            norm=norm, steps=steps, loss=loss_fn, momentum=momentum, momentum_floor=momentum_floor,
            input_transform=input_transform, generator=gens[r], sign=sign, mode=mode, keep=keep,
            record=record, evaluate=evaluate, clip=clip, stats=stats, iterate=iterate)
        ran[r, act] = True
        fooled_pr[r, act] = out.fooled
        if per_restart is not None:
            per_restart[r, act] = out.x
        for s, c in out.step_correct.items():
            step_correct[s][act] &= c
        # choose x_adv: the first fooling restart; otherwise the highest objective (or the last restart)
        prev_fooled = fooled[act]
        obj_new = out.objective
        obj_old = objective[act]
        better_obj = torch.isnan(obj_old) | (obj_new > obj_old) | (torch.isnan(obj_new) & ~torch.isnan(obj_old))
        if not classifies:
            better_obj = torch.ones_like(prev_fooled)
        take = ~prev_fooled & (out.fooled | better_obj)
        rows = act[take]
        x_out[rows] = out.x[take]
        objective[rows] = obj_new[take]
        best_restart[rows] = r
        fooled[act] |= out.fooled
        if mode != "none":
            # fooled at the end of a restart and at every recorded step count: nothing left to find
            finished = fooled.clone()
            for s in record:
                finished &= ~step_correct[s]
            done |= finished
    return AttackResult(x_adv=x_out, fooled=fooled, fooled_per_restart=fooled_pr, step_correct=step_correct,
                        best_restart=best_restart, objective=objective, ran=ran,
                        x_adv_per_restart=per_restart, stats=stats)
