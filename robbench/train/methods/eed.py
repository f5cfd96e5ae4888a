"""``eed``: EED's joint team training (Alg. 1 step 4; §4.2-4.3; App. A.1 "80 epochs for ensemble
learning"). The entry's model is an ``eed_team`` (``model.arch``) with ``model.transform = 'masked'``;
on the first start every sub-network takes the weights *and masks* of one pool entry (``team``, in
the order DIE adds them). The masks stay fixed (the scores and rates do not train); the kept weights,
BatchNorm and biases train on

    L_EED = L_E + omega * L_R + gamma * L_C      (Eq. 19; terms in robbench.eed.losses)

computed on adversarial examples crafted against the team's mean output with the training attack
(EED §5.1: Madry PGD-20, step 2/255, eps 8/255; reading: EED trains with AT throughout, the team loss
replaces Madry's CE). ``train_on = 'clean'`` computes the loss on clean inputs instead.
``ensemble_loss`` picks L_E's diversity term (supp. C, Table 9): ADP's (default), GAL's or DVERGE's
(:mod:`robbench.eed.losses`); DVERGE's needs a second data stream (``streams``) to distil towards.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from robbench.config import opt
from robbench.eed.losses import (activation_l1, dverge_ensemble_loss, ensemble_loss, gal_ensemble_loss,
                                 misclassification_loss, weight_l1)
from robbench.errors import ConfigError, UserError
from robbench.models import num_feature_layers
from robbench.models.eed_team import TeamNet, find_team
from robbench.pruning.masked import set_phase
from robbench.registry import METHODS
from robbench.train.distill import distill
from robbench.train.methods.base import Batch, Method, module_mode
from robbench.train.methods.dverge import layer_for_epoch
from robbench.train.methods.adv_bases import AdvBaseOptions, craft

if TYPE_CHECKING:
    from robbench.train.loop import TrainContext


@dataclass
class EEDOptions(AdvBaseOptions):
    team: list[str] = opt([], help="pool entries whose weights and masks start the sub-networks, in DIE order "
                                   "(the RD selection: python -m robbench.eed.select)")
    omega: float = opt(10.0, min=0.0, help="L_R weight (EED §5.1: omega = 10)")
    gamma: float = opt(4.0, min=0.0, help="L_C weight (EED §5.1: gamma = 4 for s_r = 80%)")
    lambda1: float = opt(0.7, min=0.0, help="weight-sparsity weight in L_C (EED §5.1: 0.7)")
    lambda2: float = opt(0.25, min=0.0, help="activation-sparsity weight in L_C (EED §5.1: 0.25)")
    alpha: float = opt(2.0, min=0.0, help="Reg weight in L_E: not given by EED; ADP README CIFAR alpha = 2")
    beta: float = opt(0.5, min=0.0, help="Div weight in L_E: not given by EED; ADP README CIFAR beta = 0.5")
    lr_c: float = opt(1.0, min=0.0, help="the undefined C in L_R's log(1 - C * max): reading C = 1")
    lr_wrong_only: bool = opt(True, help="L_R's max over wrong classes only (iGAT reading); false = all classes")
    lc_normalise: bool = opt(True, help="L_C terms as means over their elements (false: raw sums, as printed)")
    activation_site: Literal["penultimate", "logits"] = opt("penultimate", help="activations in L_C's L0 (L1) term")
    ensemble_loss: Literal["adp", "gal", "dverge"] = opt(
        "adp", help="L_E's Reg/Div: ADP's entropy and log-det (default reading), GAL's gradient coherence or "
                    "DVERGE's all-pairs distilled CE (supp. C.2-C.3, Table 9)")
    # DVERGE's distillation (arguments.py dverge_train_args; robbench.train.methods.dverge): momentum mu = 1,
    # no random start, features before the ReLU, BatchNorm in train mode, the reference's x' update
    dverge_eps: float = opt(0.07, min=0.0, max=1.0, help="dverge: distillation radius (--distill-eps 0.07)")
    dverge_step: float = opt(0.007, min=0.0, max=1.0, help="dverge: distillation step (--distill-alpha 0.007)")
    dverge_steps: int = opt(10, min=1, help="dverge: distillation steps (--distill-steps 10)")
    dverge_layer: int = opt(0, min=0, help="dverge: feature layer; 0 = a random layer per epoch (reference)")
    train_on: Literal["adv", "clean"] = opt("adv", help="inputs of L_EED: PGD examples of the team (AT) or clean")


def _classifier_input_hooks(nets: list[nn.Module], store: list[torch.Tensor]) -> list[Any]:
    """Capture the input of each net's last Linear (the penultimate features)."""
    handles = []
    for net in nets:
        last = [m for m in net.modules() if isinstance(m, nn.Linear)]
        if not last:
            raise ConfigError("the team's sub-networks have no Linear classifier", field="model.options.base_arch")
        handles.append(last[-1].register_forward_pre_hook(lambda m, a: store.append(a[0])))
    return handles


def load_team_members(ctx: "TrainContext", team: TeamNet, names: list[str]) -> list[dict[str, Any]]:
    """Copy pool entry i's single network (``members.0.*``) into sub-network i."""
    from robbench.checkpoint import WEIGHTS, load_trained
    from robbench.eed.prerequisites import missing_prerequisites, train_commands
    from robbench.errors import CheckpointError

    missing = missing_prerequisites(names, ctx.runs_dir)
    if missing:
        untrained = [n for n in names if n in missing]
        raise UserError(f"team members not trained yet under {ctx.runs_dir or 'runs'}: {', '.join(untrained)}; "
                        f"train first: {train_commands(missing)}", file=ctx.entry.source, field="train.params.team")
    prov = []
    for i, name in enumerate(names):
        try:
            src, manifest = load_trained(name, ctx.runs_dir, ctx.device)
        except CheckpointError as e:
            raise UserError(f"team member {name!r} is not usable: {e}", file=ctx.entry.source,
                            field="train.params.team") from None
        members = getattr(src, "members", None)
        if members is None or len(members) != 1:
            raise ConfigError(f"team member {name!r} must be one network", file=ctx.entry.source,
                              field="train.params.team")
        sd = members[0].state_dict()
        mine = team.nets[i].state_dict()
        bad = sorted(set(sd) ^ set(mine)) or [k for k in sd if sd[k].shape != mine[k].shape]
        if bad:
            raise ConfigError(f"team member {name!r} does not match model.options.base_arch with the 'masked' "
                              f"transform (e.g. {bad[0]})", file=ctx.entry.source, field="train.params.team")
        team.nets[i].load_state_dict(sd)
        prov.append({"entry": name, "weights_sha256": manifest["files"].get(WEIGHTS)})
    return prov


@METHODS.register("eed", params=EEDOptions)
class EED(Method):
    def __init__(self, options: EEDOptions | None = None) -> None:
        super().__init__(options or EEDOptions())
        self.initialised = False
        self.team: TeamNet | None = None
        self.num_layers = 0
        self.layer = 0

    @property
    def streams(self) -> int:  # type: ignore[override]
        """DVERGE's term distils towards a second, independent batch (the reference's two loaders)."""
        return 2 if self.options.ensemble_loss == "dverge" else 1

    def state_dict(self) -> dict[str, Any]:
        return {"initialised": self.initialised}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.initialised = bool(state.get("initialised", False))

    def setup(self, ctx: "TrainContext") -> None:
        o: EEDOptions = self.options
        file = ctx.entry.source
        if len(ctx.members) != 1 or ctx.entry.model.arch != "eed_team":
            raise ConfigError("EED trains one team network; allowed: model.arch = 'eed_team', model.members = 1",
                              file=file, field="model.arch")
        self.team = find_team(ctx.model)
        if o.team and len(o.team) != len(self.team.nets):
            raise ConfigError(f"team names {len(o.team)} entries but model.options.size is {len(self.team.nets)}",
                              file=file, field="train.params.team")
        if ctx.entry.train.init_from:  # the weights come from a trained team (e.g. another deployment of it)
            self.initialised = True
        if not self.initialised and not o.team:
            raise ConfigError("no team yet: run the RD selection over the pool (python -m robbench.eed.select) and "
                              "set train.params.team and model.options.size from it", file=file,
                              field="train.params.team")
        if not self.initialised:
            ctx.extras["log_team_from"] = load_team_members(ctx, self.team, list(o.team))
        self.initialised = True
        set_phase(ctx.model, "finetune")  # masks as the pool pruned them; weights train
        if o.ensemble_loss == "dverge":
            self.num_layers = num_feature_layers(self.team.nets[0])
            if not 0 < (o.dverge_layer or 1) <= self.num_layers:
                raise ConfigError(f"layer {o.dverge_layer} does not exist; allowed: 0 (random) or "
                                  f"1..{self.num_layers}", file=file, field="train.params.dverge_layer")

    def on_epoch_start(self, ctx: "TrainContext", epoch: int) -> None:
        o: EEDOptions = self.options
        if o.ensemble_loss == "dverge":
            self.layer = o.dverge_layer or layer_for_epoch(ctx.seed, epoch, self.num_layers)
            ctx.extras["log_distill_layer"] = self.layer

    def _distilled(self, ctx: "TrainContext", x_s: torch.Tensor, x_t: torch.Tensor) -> list[torch.Tensor]:
        o: EEDOptions = self.options
        assert self.team is not None
        with module_mode(ctx.model, "train"):
            return distill(list(self.team.nets), x_s, x_t, self.layer, eps=o.dverge_eps, step_size=o.dverge_step,
                           steps=o.dverge_steps, momentum=1.0, iterate="x")

    def _mean_output(self, x: torch.Tensor) -> torch.Tensor:
        team = self.team
        assert team is not None
        probs = torch.stack([torch.softmax(z, dim=1) for z in team.member_logits(x)]).mean(0)
        return torch.log(probs.clamp_min(1e-40))

    def step(self, ctx: "TrainContext", batch: Batch) -> dict[str, float]:
        o: EEDOptions = self.options
        team = self.team
        assert team is not None
        x = craft(self._mean_output, ctx.model, batch.x, batch.y, o, "ce") if o.train_on == "adv" else batch.x
        cross: list[list[torch.Tensor | None]] = []
        if o.ensemble_loss == "dverge":  # f_i(x'_j): member j's distilled batch through member i
            (x_t, _y_t), = batch.extra
            xs = self._distilled(ctx, batch.x, x_t)
            cross = [[None if i == j else net(xj) for j, xj in enumerate(xs)] for i, net in enumerate(team.nets)]
        if o.ensemble_loss == "gal":  # input gradients of every member's CE (double backprop)
            x = x.detach().requires_grad_(True)
        feats: list[torch.Tensor] = []
        handles = _classifier_input_hooks(list(team.nets), feats) if o.activation_site == "penultimate" else []
        try:
            logits = team.member_logits(x)
        finally:
            for h in handles:
                h.remove()
        if o.ensemble_loss == "gal":
            l_e, metrics = gal_ensemble_loss(logits, x, batch.y, o.beta)
        elif o.ensemble_loss == "dverge":
            l_e, metrics = dverge_ensemble_loss(logits, cross, batch.y, batch.y, o.beta)
        else:
            l_e, metrics = ensemble_loss(logits, batch.y, o.alpha, o.beta)
        l_r = misclassification_loss(logits, batch.y, o.lr_c, o.lr_wrong_only)
        acts = feats if o.activation_site == "penultimate" else logits
        l_c = o.lambda1 * weight_l1(list(team.nets), o.lc_normalise) + o.lambda2 * activation_l1(acts, o.lc_normalise)
        loss = l_e + o.omega * l_r + o.gamma * l_c
        ctx.update(loss)
        metrics.update(loss=float(loss.detach()), l_e=float(l_e.detach()), l_r=float(l_r.detach()),
                       l_c=float(l_c.detach()))
        return metrics
