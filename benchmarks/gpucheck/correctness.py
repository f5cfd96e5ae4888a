"""Correctness sections: the memory-format check, batched (vmap) vs looped members, CUDA vs CPU.

Tolerances (relative to the largest magnitude of the reference tensor, float32):
- vmap vs loop, strict float32: logits, input gradients and weight gradients within ``VMAP_RTOL``; the
  same under the default TF32 settings within ``TF32_RTOL`` (different kernels round differently);
- DVERGE step, batched distillation (one attack call for all members) vs one call per member: losses
  within ``DVERGE_LOSS_RTOL``, weight update within ``DVERGE_UPDATE_RTOL`` (sign steps can turn a last-bit
  difference into a different step on a few pixels);
- CUDA vs CPU, strict float32: logits and input gradients within ``DEVICE_RTOL``; PGD-10 (no random
  start, so both devices start alike) adversarial images equal within 1e-5 on at least
  ``PGD_AGREE_FRAC`` of the elements and the fooled flags differing on at most ``PGD_FLAG_FRAC`` of the
  samples; one training step's weight update within ``STEP_UPDATE_RTOL`` (baseline) and
  ``DVERGE_UPDATE_RTOL`` (DVERGE).
A wrong kernel is off by O(1) relative, orders of magnitude above every one of these.
"""
from __future__ import annotations

import copy
import time
from typing import Any

import torch
import torch.nn.functional as F

from gpucheck import fixtures as fx
from gpucheck.numerics import (cpu_state, max_rel_diff, rel_diff, strict_fp32, tf32_settings, update_rel_error)

VMAP_RTOL = 1e-4
TF32_RTOL = 2e-2
DEVICE_RTOL = 1e-4
DVERGE_LOSS_RTOL = 1e-3
DVERGE_UPDATE_RTOL = 5e-2
STEP_UPDATE_RTOL = 1e-3
PGD_AGREE_FRAC = 0.99
PGD_FLAG_FRAC = 0.05

# architectures whose layer shapes the memory-format check covers (zoo names; absent ones are skipped)
MEMFORMAT_ENTRIES = ("baseline_resnet20_x3", "eio_resnet20", "eio_vgg16")


def _r(v: float) -> float:
    return float(f"{v:.3g}") if v == v and v not in (float("inf"), float("-inf")) else v


# ---------------------------------------------------------------------------------------------- memory format
def memformat(sec: Any) -> dict[str, Any]:
    """robbench.memformat.choose_memory_format on each zoo architecture, on this device: the choice, the
    reason, the worst per-layer and whole-model differences between the formats, and the time it takes."""
    from robbench.memformat import RTOL, check_layers, conv_shapes, model_gradient_diff

    o = sec.options
    names = MEMFORMAT_ENTRIES[:1] if o.quick else MEMFORMAT_ENTRIES
    known = {n for n, _, _ in fx.zoo_entries()}
    rows = []
    for name in names:
        if name not in known:
            rows.append({"entry": name, "status": "skipped: not in the zoo"})
            continue
        if sec.left() < 5:
            rows.append({"entry": name, "status": "skipped: section budget spent"})
            continue
        entry = fx.synthetic_entry(name, o.geometry, batch=o.batch)
        model, _ = fx.build(entry, o.device, "contiguous")
        t = time.monotonic()
        _, choice = fx.build(entry, o.device, "auto")
        seconds = time.monotonic() - t
        shape = o.geometry.shape
        layers = check_layers(conv_shapes(model, shape, o.device), o.device)  # cached by the call above
        worst = max(layers, key=lambda t: t[1]) if layers else None
        whole, where = model_gradient_diff(model, shape, o.device)
        rows.append({"entry": name, "model": fx.describe_model(entry), "chosen": choice.name,
                     "reason": choice.reason, "check_seconds": round(seconds, 2), "conv_shapes": len(layers),
                     "worst_layer": None if worst is None else worst[0].describe(),
                     "worst_layer_rel_diff": None if worst is None else _r(worst[1]),
                     "model_rel_diff": _r(whole), "model_rel_diff_at": where, "status": "ok"})
    return {"rtol": RTOL, "device": str(o.device), "rows": rows}


# ---------------------------------------------------------------------------------------------- vmap vs loop
def _ensemble_pair(model: Any) -> tuple[Any, Any]:
    from robbench.models import Ensemble

    loop = Ensemble(model.members, combine=model.combine, batched=False)
    vm = Ensemble(model.members, combine=model.combine, batched=True)
    return loop, vm


def _vmap_compare(loop: Any, vm: Any, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    params = list(loop.members.parameters())
    with torch.no_grad():
        la, lb = loop.member_logits(x), vm.member_logits(x)
    out: dict[str, Any] = {"logits": rel_diff(la, lb)}

    def input_grad(ens: Any) -> torch.Tensor:
        xx = x.detach().clone().requires_grad_(True)
        return torch.autograd.grad(F.nll_loss(ens(xx), y), xx)[0]

    for p in params:  # attacks freeze the weights: the batched path then uses its cached stacked state
        p.requires_grad_(False)
    out["input_grad_frozen"] = rel_diff(input_grad(loop), input_grad(vm))
    for p in params:  # trainable weights: the stacked parameters keep the graph to every member
        p.requires_grad_(True)

    def weight_grads(ens: Any) -> dict[str, torch.Tensor]:
        for p in params:
            p.grad = None
        xx = x.detach().clone().requires_grad_(True)
        F.nll_loss(ens(xx), y).backward()
        grads = {f"weight {n}": p.grad.detach().clone() for n, p in loop.members.named_parameters()
                 if p.grad is not None}
        grads["input"] = xx.grad.detach().clone()
        return grads

    out["weight_and_input_grad"], out["weight_grad_worst_at"] = max_rel_diff(weight_grads(loop), weight_grads(vm))
    for p in params:
        p.grad = None
    return out


def vmap_equivalence(sec: Any) -> dict[str, Any]:
    """Members run batched (torch.func vmap) vs in a loop: logits, input gradients (frozen weights, as
    in attacks), weight gradients (trainable weights); and one DVERGE step with the batched distillation
    vs one distillation per member. DVERGE's training step itself runs the members in train mode, where
    the Ensemble always loops (vmap needs eval-mode BatchNorm): its batched path is the distillation."""
    o = sec.options
    g, dev = o.geometry, o.device
    entry = fx.synthetic_entry("baseline_resnet20_x3", g, batch=o.batch)
    model, fmt = fx.build(entry, dev)
    model.eval()
    loop, vm = _ensemble_pair(model)
    x, y = fx.random_images(g, o.check_n, seed=1)
    x, y = fmt.prepare(x.to(dev)), y.to(dev)
    data: dict[str, Any] = {"device": str(dev), "memory_format": fmt.name, "n": o.check_n,
                            "can_vmap": bool(vm.can_vmap()), "tf32_defaults": tf32_settings(),
                            "rtol_strict": VMAP_RTOL, "rtol_tf32_default": TF32_RTOL}
    if not sec.check("vmap possible (identical eval-mode members)", data["can_vmap"]):
        return data
    with strict_fp32() as ok:
        strict = _vmap_compare(loop, vm, x, y)
    # a torch whose TF32 switches cannot be set is compared at the TF32 tolerance (recorded)
    data["strict_fp32_settable"] = ok
    tol = VMAP_RTOL if ok or dev.type != "cuda" else TF32_RTOL
    data["vmap_ran"] = not bool(getattr(vm, "_vmap_failed", False))
    sec.check("vmap ran without falling back to the loop", data["vmap_ran"])
    data["strict"] = {k: (_r(v) if isinstance(v, float) else v) for k, v in strict.items()}
    for k in ("logits", "input_grad_frozen", "weight_and_input_grad"):
        sec.check(f"vmap {k} (strict fp32)", strict[k] <= tol)
    if dev.type == "cuda":
        default = _vmap_compare(loop, vm, x, y)
        data["tf32_default"] = {k: (_r(v) if isinstance(v, float) else v) for k, v in default.items()}
        for k in ("logits", "input_grad_frozen"):
            sec.check(f"vmap {k} (default TF32)", default[k] <= TF32_RTOL)

    # one DVERGE step: batched distillation vs a loop over members, from identical weights and batch
    if sec.left() < 2:
        data["dverge_step"] = "skipped: section budget spent"
        return data
    with strict_fp32():
        data["dverge_step"] = _dverge_batched_vs_loop(o, sec)
    return data


def _dverge_batched_vs_loop(o: Any, sec: Any) -> dict[str, Any]:
    g, dev = o.geometry, o.device
    base = fx.synthetic_entry("dverge_resnet20_x3", g, batch=o.check_n)
    runs = {}
    model0, fmt = fx.build(base, dev)
    before = cpu_state(model0)
    for batched in (True, False):
        e = fx.synthetic_entry("dverge_resnet20_x3", g, batch=o.check_n,
                               extra=[f"train.params.batched_distillation={str(batched).lower()}"])
        model = copy.deepcopy(model0)
        ctx, method = fx.method_context(e, model, dev, fmt)
        batch = fx.random_batch(g, o.check_n, method.streams, dev, fmt, seed=2)
        torch.manual_seed(0)
        out = method.step(ctx, batch)
        runs[batched] = (out, cpu_state(model), method.layer)
    (oa, sa, layer), (ob, sb, _) = runs[True], runs[False]
    loss_keys = [k for k in oa if k.startswith("loss/")]
    loss_diff = max(abs(oa[k] - ob[k]) / max(abs(ob[k]), 1e-12) for k in loss_keys) if loss_keys else float("inf")
    upd = update_rel_error(before, sb, sa)
    sec.check("DVERGE step losses, batched vs per-member distillation", loss_diff <= DVERGE_LOSS_RTOL)
    sec.check("DVERGE step weight update, batched vs per-member distillation", upd <= DVERGE_UPDATE_RTOL)
    return {"layer": layer, "losses_batched": [round(oa[k], 6) for k in loss_keys],
            "losses_loop": [round(ob[k], 6) for k in loss_keys], "loss_rel_diff": _r(loss_diff),
            "update_rel_error": _r(upd), "rtol_loss": DVERGE_LOSS_RTOL, "rtol_update": DVERGE_UPDATE_RTOL}


# ---------------------------------------------------------------------------------------------- CUDA vs CPU
def cuda_vs_cpu(sec: Any) -> dict[str, Any]:
    """The same weights and inputs on the CPU and on CUDA (each in the memory format robbench picks
    there): logits, input gradients, a PGD-10 attack, and one baseline and one DVERGE training step."""
    from robbench.attacks import make_attack

    o = sec.options
    g, n = o.geometry, o.device_check_n
    cpu, dev = torch.device("cpu"), o.device
    entry = fx.synthetic_entry("baseline_resnet20_x3", g, batch=n)
    m_cpu, f_cpu = fx.build(entry, cpu)
    m_dev, f_dev = copy.deepcopy(m_cpu).to(dev), None
    from robbench.memformat import choose_memory_format

    f_dev = choose_memory_format(m_dev, g.shape, dev, "auto", what=entry.name)
    m_dev = m_dev.to(memory_format=f_dev.format)
    for m in (m_cpu, m_dev):
        m.eval()
        for p in m.parameters():
            p.requires_grad_(False)
    x, y = fx.random_images(g, n, seed=3)
    xc, yc = f_cpu.prepare(x), y
    xd, yd = f_dev.prepare(x.to(dev)), y.to(dev)
    data: dict[str, Any] = {"n": n, "memory_format": {"cpu": f_cpu.name, str(dev): f_dev.name},
                            "tf32_defaults": tf32_settings(), "rtol": DEVICE_RTOL}

    def logits_and_grad(m: Any, xx: torch.Tensor, yy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xx = xx.detach().clone().requires_grad_(True)
        out = m(xx)
        return out.detach(), torch.autograd.grad(F.nll_loss(out, yy), xx)[0]

    with strict_fp32() as ok:
        tol = DEVICE_RTOL if ok else TF32_RTOL  # TF32 switches not settable: compared at the TF32 tolerance
        data["strict_fp32_settable"], data["rtol"] = ok, tol
        lc, gc = logits_and_grad(m_cpu, xc, yc)
        ld, gd = logits_and_grad(m_dev, xd, yd)
        data["logits_rel_diff"] = _r(rel_diff(lc, ld))
        data["input_grad_rel_diff"] = _r(rel_diff(gc, gd))
        sec.check("CUDA vs CPU logits", data["logits_rel_diff"] <= tol)
        sec.check("CUDA vs CPU input gradient", data["input_grad_rel_diff"] <= tol)

        # PGD-10 without random start (the CPU and CUDA generators differ), eps 8/255, step eps/4
        attack = make_attack("pgd", loss="ce", steps=10, rel_step=0.25, restarts=1, init="none",
                             early_stop=False)
        eps = 8 / 255
        rc = attack(m_cpu, xc, yc, eps)
        rd = attack(m_dev, xd, yd, eps)
        diff = (rc.x_adv.detach().cpu().float() - rd.x_adv.detach().cpu().float()).abs()
        agree = float((diff <= 1e-5).float().mean())
        flags = int((rc.fooled.cpu() != rd.fooled.cpu()).sum())
        data["pgd"] = {"steps": 10, "eps": eps, "agree_frac_1e-5": round(agree, 5), "max_abs_diff": _r(float(diff.max())),
                       "fooled_cpu": int(rc.fooled.sum()), "fooled_cuda": int(rd.fooled.sum()), "flags_differ": flags,
                       "tolerance": f">= {PGD_AGREE_FRAC:.0%} of elements within 1e-5, flags differ on <= "
                                    f"{PGD_FLAG_FRAC:.0%} of samples"}
        sec.check("CUDA vs CPU PGD-10 adversarial images", agree >= PGD_AGREE_FRAC)
        sec.check("CUDA vs CPU PGD-10 fooled flags", flags <= max(1, int(PGD_FLAG_FRAC * n)))

        steps: dict[str, Any] = {}
        for name, tol in (("baseline_resnet20_x3", STEP_UPDATE_RTOL), ("dverge_resnet20_x3", DVERGE_UPDATE_RTOL)):
            if sec.left() < 3:
                steps[name] = "skipped: section budget spent"
                continue
            steps[name] = _step_on_both(name, g, n, dev, f_cpu, f_dev)
            steps[name]["rtol_update"] = tol
            sec.check(f"CUDA vs CPU training step {name}", steps[name]["update_rel_error"] <= tol)
        data["training_step"] = steps
    return data


def _step_on_both(name: str, g: fx.Geometry, n: int, dev: torch.device, f_cpu: Any, f_dev: Any) -> dict[str, Any]:
    entry = fx.synthetic_entry(name, g, batch=n)
    m_cpu, _ = fx.build(entry, torch.device("cpu"), f_cpu.name)
    m_dev = copy.deepcopy(m_cpu).to(dev).to(memory_format=f_dev.format)
    before = cpu_state(m_cpu)
    outs, states = [], []
    for m, d, f in ((m_cpu, torch.device("cpu"), f_cpu), (m_dev, dev, f_dev)):
        ctx, method = fx.method_context(entry, m, d, f)
        batch = fx.random_batch(g, n, method.streams, d, f, seed=4)
        torch.manual_seed(0)
        outs.append(method.step(ctx, batch))
        states.append(cpu_state(m))
    keys = sorted(set(outs[0]) & set(outs[1]))
    loss_diff = max((abs(outs[0][k] - outs[1][k]) / max(abs(outs[0][k]), 1e-12) for k in keys), default=0.0)
    return {"loss_rel_diff": _r(loss_diff), "update_rel_error": _r(update_rel_error(before, states[0], states[1]))}
