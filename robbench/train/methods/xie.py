"""``xie``: adversarial training at scale (Xie & Yuille, "Intriguing properties of adversarial training
at scale", ICLR 2020), every strategy of the paper as an option of one method. Reference code:
facebookresearch/ImageNet-Adversarial-Training (``adv_model.py``, ``main.py``,
``third_party/imagenet_utils.py``); it implements the default strategy (100% adv + 0% clean) only, so
the other strategies follow the paper text (and ALP the ALP reference, tensorflow/models
``research/adversarial_logit_pairing/train.py``).

The training attack (paper §3; ``adv_model.py`` ``PGDAttacker``) is the attack core's registered
targeted PGD configured as data (:func:`training_attack_options`): target = (y + U{1..C-1}) mod C
(uniform over the wrong classes), eps 16/255, step 1/255, N = 30 iterations (paper §3 "N = 30";
``main.py --attack-iter`` default 30: they agree), x <- clip(x - a*sign(grad CE(target))); the start is
the clean image with probability 0.2, else uniform in the eps-ball, *one coin per batch* (per GPU in
the reference: per micro-batch here); BatchNorm in inference mode with its statistics frozen while
attacking ("We use the testing mode of it during attack", ``freeze_collection(UPDATE_OPS)``).
Step size for N != 30: the paper's footnote 6 gives alpha = 4 (PGD-5) and 2 (PGD-10); the reference
uses ``max(alpha, eps / N)`` (3.2 and 1.6): ``adv_step_rule`` 'given' (default; set adv_step) or
'max_eps_over_steps'. Not reproduced: the reference takes its first gradient at the unclipped random
start; the core clips the start to the image box first (as in protocols/xie-pgd2000.toml).

Per (micro-)batch of B images with k = round(clean_ratio * B) clean images kept (the first k of the
shuffled batch; paper §4.1 "we keep adversarial images unchanged, but removing their clean
counterparts by 20%, ..., 100%"):

- BN / GN: one forward of cat(x[:k], x_adv) in train mode -- the BN statistics are those of the
  clean/adversarial mixture (paper Figure 4 left; ALP reference ``tf.concat([images, adv_examples])``);
- mixture BN (``model.norm_layer = 'mbn'``): x_adv through the adversarial BN set, x[:k] through the
  clean set, convolutions and fc shared (Figure 4 right); the attack runs on ``attack_route``;
- loss = CE with label smoothing 0.1 averaged over all B + k images ('per_image'; equals Eq. 1 with
  alpha = 0.5 at clean_ratio 1) or Eq. 1 alpha*CE_clean + (1-alpha)*CE_adv ('eq1'), plus ALP
  lambda * MSE(z_clean, z_adv) over the k pairs (``tf.losses.mean_squared_error``: mean over pairs and
  logits; 'pair_sum' = squared L2 per pair, mean over pairs);
- the last ``running_stats_last_epochs`` epochs train with BN in eval mode (running statistics, not
  updated: §4.3 "applying precomputed running statistics for model training during the last 10
  epochs", the * rows of Tables 2, 5, 7).

Pipeline (``imagenet_utils.py``, ``main.py``): weight decay 1e-4 on conv/fc weights only (the
optimizer's ``weight_decay`` is moved onto those tensors' gradients), label smoothing 0.1, and the
linear per-step warm-up from 0.1 to ``train.optimizer.lr`` over ``train.schedule.warmup_epochs``
epochs (only when lr > 0.1), see :mod:`robbench.train.optim_warmup`. ``micro_batch`` splits each
(per-rank) batch into BN batches of that size with gradient accumulation: the reference's 4096 images
are 128 GPUs x 32, each GPU normalising its own 32 (+ k clean) images, so ``micro_batch = 32``
reproduces its BN batches on any number of GPUs. With several members each member is trained this way
on its own (independent attacks and losses).
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from robbench.config import opt
from robbench.errors import ConfigError
from robbench.models import xie_deploy  # noqa: F401  (registers the 'xie' model transform)
from robbench.models.layers import MixtureBN, bn_route
from robbench.registry import METHODS
from robbench.train.methods.base import Batch, BNMode, Method, module_mode
from robbench.train.optim_decay import add_weight_decay_, conv_fc_weights
from robbench.train.optim_warmup import steps_per_epoch, warmup_lr

if TYPE_CHECKING:
    from robbench.attacks.registered import PGDOptions
    from robbench.train.loop import TrainContext

EPS_16 = 16 / 255
STEP_1 = 1 / 255


@dataclass
class XieOptions:
    # ---- the training attack: paper §3 "Training Parameters"; adv_model.py PGDAttacker
    adversarial: bool = opt(True, help="false: '0% adv + 100% clean' (standard training; Table 1, Figure 7)")
    adv_eps: float = opt(EPS_16, min=0.0, max=1.0, help="L-inf radius (paper §3: eps = 16 pixels = 16/255)")
    adv_step: float = opt(STEP_1, min=0.0, max=1.0, help="step (paper §3: alpha = 1 = 1/255; footnote 6: "
                                                         "4/255 for PGD-5, 2/255 for PGD-10)")
    adv_steps: int = opt(30, min=1, max=100000, help="N (paper §3: N = 30; main.py --attack-iter 30)")
    adv_step_rule: Literal["given", "max_eps_over_steps"] = opt(
        "given", help="'given': adv_step as set (paper); 'max_eps_over_steps': max(adv_step, adv_eps / N) "
                      "(adv_model.py PGDAttacker)")
    adv_target: Literal["random", "none"] = opt(
        "random", help="'random': targeted towards (y + U{1..C-1}) mod C (paper §3, adv_model.py); 'none': "
                       "untargeted CE ascent (the reference's cifar10.py PGDAttacker)")
    adv_clean_start_prob: float = opt(0.2, min=0.0, max=1.0, help="P(start at the clean image), one draw per "
                                                                  "batch (paper §3: 0.2; main.py prob_start_from_clean)")
    attack_bn_mode: BNMode = opt("eval", help="BatchNorm mode while attacking (adv_model.py: eval, statistics frozen)")
    attack_route: Literal["adv", "clean"] = opt(
        "adv", help="mixture BN: the BN set the training attack runs on (paper silent; 'adv' as Xie et al. "
                    "AdvProp 2020, whose auxiliary BNs craft the adversarial images)")
    # ---- strategies (paper §4)
    clean_ratio: float = opt(0.0, min=0.0, max=1.0, help="clean images kept per batch, fraction of B "
                                                         "(§4.1 / Figure 1; 0 = reference code, 100% adv + 0% clean)")
    loss_weighting: Literal["per_image", "eq1"] = opt(
        "per_image", help="'per_image': mean CE over the B + k images of the mixed batch (ALP reference); "
                          "'eq1': alpha*CE_clean + (1-alpha)*CE_adv (paper Eq. 1)")
    clean_loss_weight: float = opt(0.5, min=0.0, max=1.0, help="Eq. 1 alpha (paper: 0.5, following Goodfellow et al.)")
    alp_weight: float = opt(0.0, min=0.0, help="ALP lambda; 0 = off (ALP README: train_lp_weight=0.5)")
    alp_reduction: Literal["mean", "pair_sum"] = opt(
        "mean", help="'mean': tf.losses.mean_squared_error (ALP train.py: mean over pairs and logits); "
                     "'pair_sum': ||z - z'||^2 per pair, mean over pairs")
    running_stats_last_epochs: int = opt(0, min=0, help="train with BN running statistics (eval mode) in the "
                                                        "last K epochs (§4.3, Tables 2/5/7 '*': 10)")
    # ---- pipeline: imagenet_utils.py / adv_model.py / main.py
    label_smoothing: float = opt(0.1, min=0.0, max=1.0, help="CE label smoothing (adv_model.py: 0.1)")
    weight_decay_params: Literal["conv_fc_weights", "all"] = opt(
        "conv_fc_weights", help="train.optimizer.weight_decay on conv/fc weights only (imagenet_utils.py "
                                "weight_decay_pattern '.*/W') or on every parameter (the optimizer's own)")
    warmup: Literal["reference_steps", "loop"] = opt(
        "reference_steps", help="schedule.warmup_epochs as main.py: linear per step from warmup_start_lr to "
                                "lr, only if lr > warmup_start_lr; 'loop': the loop's epoch-wise factor")
    warmup_start_lr: float = opt(0.1, min=0.0, help="warm-up start (main.py: 0.1)")
    micro_batch: int = opt(0, min=0, help="BN batch / accumulation chunk per rank; 0 = the whole per-rank batch "
                                          "(reference: 32 images per GPU, main.py --batch)")

    def validate(self, file: str) -> None:
        if self.alp_weight > 0 and (not self.adversarial or self.clean_ratio == 0.0):
            raise ConfigError("ALP pairs clean and adversarial logits: it needs adversarial = true and "
                              "clean_ratio > 0", file=file, field="train.params.alp_weight")


def training_attack_options(o: XieOptions) -> "PGDOptions":
    """The training attack as the registered 'pgd' attack's options (targets passed per call)."""
    from robbench.attacks.registered import PGDOptions

    step = max(o.adv_step, o.adv_eps / o.adv_steps) if o.adv_step_rule == "max_eps_over_steps" else o.adv_step
    return PGDOptions(norm="linf", loss="ce", steps=o.adv_steps, step_size=step, restarts=1,
                      init="clean_or_uniform", clean_prob=o.adv_clean_start_prob, targeted=o.adv_target,
                      keep="last", early_stop=False)


def random_wrong_targets(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(y + U{1..C-1}) mod C, uniform over the wrong classes (adv_model.py ``_create_random_target``),
    drawn on the CPU from torch's global RNG (saved with the resume state)."""
    shift = torch.randint(1, num_classes, (y.shape[0],))
    return (y + shift.to(y.device)) % num_classes


def has_mixture_bn(net: nn.Module) -> bool:
    return any(isinstance(m, MixtureBN) for m in net.modules())


@METHODS.register("xie", params=XieOptions)
class Xie(Method):
    def setup(self, ctx: "TrainContext") -> None:
        from robbench.data import get_info
        from robbench.registry import ATTACKS

        o = self.options
        self._attack = ATTACKS.get("pgd")(training_attack_options(o))
        self._mbn = [has_mixture_bn(m) for m in ctx.members]
        self._wd = 0.0
        self._decayed: list[nn.Parameter] = []
        if o.weight_decay_params == "conv_fc_weights":
            # the decay moves from the optimizer (every parameter) onto the conv/fc weights' gradients
            self._wd = float(ctx.entry.train.optimizer.weight_decay)
            self._decayed = conv_fc_weights(ctx.model)
            for optimizer in ctx.optimizers:
                for group in optimizer.param_groups:
                    group["weight_decay"] = 0.0
        info = get_info(ctx.entry.data.dataset, ctx.entry.data.options)
        self._steps_per_epoch = steps_per_epoch(info.train_size, ctx.entry.data.batch_size)

    # ------------------------------------------------------------------------------------------
    def _set_step_lr(self, ctx: "TrainContext") -> None:
        """main.py's per-step warm-up over the schedule's warm-up epochs (see optim_warmup)."""
        o, t = self.options, ctx.entry.train
        w = t.schedule.warmup_epochs
        if o.warmup != "reference_steps" or w == 0 or ctx.epoch >= w:
            return
        from robbench.train.schedule import lr_at

        lr = warmup_lr(t.optimizer.lr, o.warmup_start_lr, ctx.global_step, w * self._steps_per_epoch)
        if lr is None:  # no warm-up (lr <= start): the schedule without the loop's epoch-wise factor
            lr = lr_at(dataclasses.replace(t.schedule, warmup_epochs=0), t.optimizer.lr, ctx.epoch, t.epochs)
        for optimizer in ctx.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = lr

    def _frozen_bn(self, ctx: "TrainContext") -> bool:
        k = self.options.running_stats_last_epochs
        return k > 0 and ctx.epoch >= ctx.entry.train.epochs - k

    def craft(self, net: nn.Module, x: torch.Tensor, y: torch.Tensor, targets: torch.Tensor | None,
              mbn: bool) -> torch.Tensor:
        """The training attack on ``net`` (BN in ``attack_bn_mode``; MBN on ``attack_route``); ``targets``
        None = untargeted."""
        o = self.options
        route = bn_route(net, o.attack_route) if mbn else contextlib.nullcontext()
        with module_mode(net, o.attack_bn_mode), route:
            # evaluate=False: exactly N gradient forwards; seed=None: the start (and the per-batch
            # clean/uniform coin) draw from the global torch RNG, saved with the resume state
            res = self._attack(net, x, y, o.adv_eps, targeted=targets, seed=None, evaluate=False)
        return res.x_adv.detach()

    def objective(self, ctx: "TrainContext", net: nn.Module, mbn: bool, x: torch.Tensor,
                  y: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss of one (micro-)batch for one member, and its log values."""
        o = self.options
        ls = o.label_smoothing
        n = x.shape[0]
        k = n if not o.adversarial else int(round(o.clean_ratio * n))
        frozen = module_mode(net, "eval") if self._frozen_bn(ctx) else contextlib.nullcontext()
        logs: dict[str, float] = {}
        if not o.adversarial:
            with frozen, (bn_route(net, "clean") if mbn else contextlib.nullcontext()):
                z = net(x)
            loss = F.cross_entropy(z, y, label_smoothing=ls)
            logs["clean_ce"] = float(loss.detach())
            logs["train_acc"] = float((z.argmax(1) == y).float().mean())
            return loss, {"loss": float(loss.detach()), **logs}
        targets = random_wrong_targets(y, ctx.num_classes) if o.adv_target == "random" else None
        x_adv = self.craft(net, x, y, targets, mbn)
        x_c, y_c = x[:k], y[:k]
        with frozen:
            if mbn:
                with bn_route(net, "adv"):
                    z_adv = net(x_adv)
                if k:
                    with bn_route(net, "clean"):
                        z_c = net(x_c)
                else:
                    z_c = z_adv[:0]
            else:
                z = net(torch.cat([x_c, x_adv]) if k else x_adv)
                z_c, z_adv = z[:k], z[k:]
        if o.loss_weighting == "per_image" or k == 0:
            loss = F.cross_entropy(torch.cat([z_c, z_adv]), torch.cat([y_c, y]), label_smoothing=ls)
        else:
            a = o.clean_loss_weight
            loss = a * F.cross_entropy(z_c, y_c, label_smoothing=ls) + (1 - a) * F.cross_entropy(
                z_adv, y, label_smoothing=ls)
        if o.alp_weight > 0:
            diff2 = (z_c - z_adv[:k]).pow(2)
            alp = diff2.mean() if o.alp_reduction == "mean" else diff2.sum(dim=1).mean()
            loss = loss + o.alp_weight * alp
            logs["alp"] = float(alp.detach())
        with torch.no_grad():
            logs["adv_ce"] = float(F.cross_entropy(z_adv, y))
            pred = z_adv.argmax(1)
            logs["adv_train_acc"] = float((pred == y).float().mean())
            if targets is not None:
                logs["attack_success"] = float((pred == targets).float().mean())  # adv_model.py attack_success
            if k:
                logs["clean_ce"] = float(F.cross_entropy(z_c, y_c))
        return loss, {"loss": float(loss.detach()), **logs}

    def step(self, ctx: "TrainContext", batch: Batch) -> dict[str, float]:
        o = self.options
        self._set_step_lr(ctx)
        size = o.micro_batch or batch.x.shape[0]
        chunks = list(zip(torch.split(batch.x, size), torch.split(batch.y, size)))
        ctx.zero_grad()
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        for net, mbn in zip(ctx.members, self._mbn):
            for x, y in chunks:
                loss, logs = self.objective(ctx, net, mbn, x, y)
                # each chunk's mean loss weighs 1/K: Horovod's average of per-GPU mean losses
                (loss / len(chunks)).backward()
                for key, v in logs.items():
                    sums[key] = sums.get(key, 0.0) + v
                    counts[key] = counts.get(key, 0) + 1
        add_weight_decay_(self._decayed, self._wd)
        ctx.step_optimizers()
        lr = ctx.optimizers[0].param_groups[0]["lr"]
        ctx.extras["log_last_step_lr"] = lr
        return {key: v / counts[key] for key, v in sums.items()}

    def state_dict(self) -> dict[str, Any]:
        return {}
