"""``score_prune``: score-based adversarial pruning, one framework for HYDRA, HARP and EED's sub-models.

The entry's model uses ``model.transform = 'masked'`` (sparsity, HARP ``learn_rates``). Two phases,
each its own entry and run (each with its own schedule, as HYDRA's ``--exp-mode prune`` / ``finetune``
runs and EED App. A.1's "20 epochs for pruning, 40 epochs for sub-model fine-tuning"):

- ``phase = 'prune'``: on the first start the dense weights come from ``dense_from`` (a trained entry of
  the same architecture without the transform, e.g. the Madry-AT base), the scores are initialised by
  ``score`` (nis | erm | ase | bnsf, or 'kaiming' = HYDRA's default random init) and the masks set from
  them; then weights are frozen and the scores (BatchNorm affine too unless ``train_bn = false``; HARP:
  the k_scores) train on the adversarial ``objective`` (+ HARP's (epoch + 1) * hw_gamma * L_hw when the
  transform learns rates);
- ``phase = 'finetune'`` (``train.init_from`` = the prune entry): scores and rates frozen, the stored
  masks fixed, the surviving weights train on the same objective.

``subset = 'eed'`` trains on EED's shared + private parts (:mod:`robbench.eed.subsets`; ``subset_parts``
= EED's d, 4 quarters by default), cut by ``subset_key`` (default: the score name, so each score
reshuffles) for sub-model ``subset_member``.
The masks are buffers of the model, so they are saved in ``model.safetensors`` (sha256 in the
manifest); kept parameters, sparsity and FLOPs are measured from them (:mod:`robbench.pruning.measure`)
and logged per epoch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch

from robbench.config import opt
from robbench.errors import ConfigError
from robbench.pruning.masked import masked_layers, set_phase
from robbench.pruning.rates import has_learnable_rates, hardware_loss
from robbench.registry import METHODS
from robbench.train.methods.base import Batch, Method
from robbench.train.methods.adv_bases import OBJECTIVES, AdvBaseOptions, craft

if TYPE_CHECKING:
    from robbench.train.loop import TrainContext

ScoreName = Literal["nis", "erm", "ase", "bnsf", "kaiming"]


@dataclass
class PruneOptions(AdvBaseOptions):
    phase: Literal["prune", "finetune"] = opt("prune", help="'prune': scores train, weights frozen; 'finetune': "
                                                            "masks fixed, weights train (HYDRA/HARP two phases)")
    score: ScoreName = opt("erm", help="score initialiser (EED §3.2: nis, erm = HYDRA, ase = MAD, bnsf = BNAP; "
                                       "'kaiming' = HYDRA's random popup-score init)")
    objective: Literal["pgd_at", "trades", "mart"] = opt(
        "pgd_at", help="adversarial objective (EED §3.1 follows HARP: Madry PGD; HYDRA's trainer: trades)")
    beta: float = opt(6.0, min=0.0, help="TRADES/MART beta (references: 6)")
    nat_forwards: int = opt(2, min=1, max=2, help="TRADES: train-mode forwards of x_nat (trades.py: 2)")
    dense_from: str | None = opt(None, help="prune phase: trained dense entry whose weights the masked model "
                                            "starts from (EED Alg. 1: the AT base model)")
    train_bn: bool = opt(True, help="prune phase: BatchNorm affine trains (HYDRA default; --freeze-bn = false)")
    hw_gamma: float = opt(0.01, min=0.0, help="HARP compression-loss weight gamma, times (epoch + 1) (HARP "
                                              "README CIFAR 0.01; EED App. A.1: 0.01 small / 0.1 large scale)")
    score_batches: int = opt(8, min=1, help="training batches the data-dependent scores (ase, nis logit_abs) "
                                            "use (robbench choice; MAD averages over the train loader)")
    fisher: Literal["kfac", "empirical"] = opt("kfac", help="ASE Hessian diagonal: K-FAC G_oo*A_ii (MAD) or "
                                                            "squared batch gradients")
    saliency: Literal["eq10", "mad"] = opt("eq10", help="ASE: EED Eq. 10's 1/2 H_ii w^2, or MAD's learned-mask "
                                                        "damage 1/2 dw^T H dw (dw = w - w softplus(m))")
    mask_steps: int = opt(20, min=0, help="ASE saliency 'mad': Adam steps on the mask per batch (MAD: 20)")
    mask_lr: float = opt(0.1, min=0.0, help="ASE saliency 'mad': the mask's Adam learning rate (MAD: 0.1)")
    nis_seed: Literal["uniform", "logit_abs"] = opt("uniform", help="NIS final-response importance (NISP uses "
                                                                    "Inf-FS, unspecified in EED): all 1, or mean |logit|")
    subset: Literal["all", "eed"] = opt("all", help="'eed': shared quarter + private quarter (EED §5.1)")
    subset_parts: int = opt(4, min=2, help="EED's d (supp. B.5): parts the pruning data is cut into, one "
                                           "shared + d - 1 private, one per sub-model (§5.1: 4 quarters)")
    subset_member: int = opt(0, min=0, help="EED sub-model index within its score (0..subset_parts - 2)")
    subset_key: str | None = opt(None, help="cut of the parts; none = the score name (reshuffled per score)")

    def validate(self, file: str) -> None:
        # d parts hold one shared part and d - 1 private ones: members 0..d-2 (the range eed_subset takes)
        if self.subset_member >= self.subset_parts - 1:
            raise ConfigError(f"{self.subset_member} is out of range; with subset_parts = {self.subset_parts} "
                              f"allowed: 0..{self.subset_parts - 2}", file=file, field="train.params.subset_member")


def _load_dense(ctx: "TrainContext", name: str) -> dict[str, Any]:
    """Copy a trained dense entry's tensors into the masked model (every dense key must exist)."""
    from robbench.checkpoint import WEIGHTS, load_trained
    from robbench.eed.prerequisites import missing_prerequisites, train_commands
    from robbench.errors import CheckpointError, UserError

    try:
        src, manifest = load_trained(name, ctx.runs_dir, ctx.device)  # the runs folder this run trains in
    except CheckpointError as e:
        if e.reason in ("checkpoint-missing", "checkpoint-incomplete"):
            missing = missing_prerequisites([name], ctx.runs_dir)
            raise UserError(f"prunes {name!r}, not trained yet under {ctx.runs_dir or 'runs'}; train first: "
                            f"{train_commands(missing)}", file=ctx.entry.source,
                            field="train.params.dense_from") from None
        raise UserError(f"prunes {name!r}, not usable: {e}", file=ctx.entry.source,
                        field="train.params.dense_from") from None
    sd = src.state_dict()
    mine = ctx.model.state_dict()
    bad = [k for k in sd if k not in mine or mine[k].shape != sd[k].shape]
    if bad:
        raise ConfigError(f"{name!r} has a different architecture (e.g. {bad[0]}); dense_from needs the same "
                          "model table without the 'masked' transform", file=ctx.entry.source,
                          field="train.params.dense_from")
    ctx.model.load_state_dict(sd, strict=False)
    return {"entry": name, "weights_sha256": manifest["files"].get(WEIGHTS)}


@METHODS.register("score_prune", params=PruneOptions)
class ScorePrune(Method):
    def __init__(self, options: PruneOptions | None = None) -> None:
        super().__init__(options or PruneOptions())
        self.initialised = False
        self.stream: Any = None
        self.provenance: dict[str, Any] = {}
        self._sums: dict[str, float] = {}
        self._count = 0
        self._sums_epoch = -1

    def state_dict(self) -> dict[str, Any]:
        return {"initialised": self.initialised, "subset_sums": dict(self._sums), "subset_count": self._count,
                "subset_epoch": self._sums_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.initialised = bool(state.get("initialised", False))
        self._sums = {k: float(v) for k, v in state.get("subset_sums", {}).items()}
        self._count = int(state.get("subset_count", 0))
        self._sums_epoch = int(state.get("subset_epoch", -1))

    # ---- setup
    def setup(self, ctx: "TrainContext") -> None:
        o: PruneOptions = self.options
        file = ctx.entry.source
        if ctx.entry.model.transform != "masked" or not masked_layers(ctx.model):
            raise ConfigError("score_prune trains a masked model; allowed: model.transform = 'masked'",
                              file=file, field="model.transform")
        if o.phase == "finetune" and not ctx.entry.train.init_from:
            raise ConfigError("the fine-tune phase starts from the pruned model; set train.init_from to the "
                              "prune entry", file=file, field="train.init_from")
        if o.phase == "prune" and o.dense_from is None and not ctx.entry.train.init_from and o.score != "kaiming":
            raise ConfigError("the prune phase scores a trained model; set train.params.dense_from to the dense "
                              "AT entry (or train.init_from to a masked one)", file=file,
                              field="train.params.dense_from")
        self._make_stream(ctx)
        if o.phase == "prune" and not self.initialised:
            if o.dense_from:
                self.provenance = _load_dense(ctx, o.dense_from)
            self._init_scores(ctx)
        self.initialised = True
        set_phase(ctx.model, "prune" if o.phase == "prune" else "finetune", train_bn=o.train_bn)

    def _make_stream(self, ctx: "TrainContext") -> None:
        o: PruneOptions = self.options
        if o.subset == "all":
            return
        from robbench.data import load_split
        from robbench.eed.subsets import SubsetStream, eed_subset

        d = ctx.entry.data
        data = load_split(d.dataset, "train", d.root or ctx.data_root, d.options)
        key = o.subset_key or o.score
        idx = eed_subset(len(data), o.subset_member, key=key, seed=ctx.seed, parts=o.subset_parts)
        self.stream = SubsetStream(data, idx, d.batch_size, d.augment, ctx.seed)

    def _score_batches(self, ctx: "TrainContext") -> list[tuple[torch.Tensor, torch.Tensor]]:
        from robbench.data import BatchLoader, load_split

        o: PruneOptions = self.options
        d = ctx.entry.data
        if self.stream is not None:
            loader = self.stream.loader
        else:
            loader = BatchLoader(load_split(d.dataset, "train", d.root or ctx.data_root, d.options), d.batch_size, shuffle=True,
                                 augment=d.augment, seed=ctx.seed)
        out = []
        for b, (x, y) in enumerate(loader.epoch(0)):
            if b >= o.score_batches:
                break
            out.append((ctx.prepare(x), y.to(ctx.device)))
        return out

    def _init_scores(self, ctx: "TrainContext") -> None:
        from robbench.pruning.scores import ScoreData, initialise_scores

        o: PruneOptions = self.options
        if o.score == "kaiming":  # the layers' own kaiming_uniform_ scores
            for _, layer in masked_layers(ctx.model):
                layer.refresh_mask()
            return
        data = ScoreData()
        if o.score == "ase" or (o.score == "nis" and o.nis_seed == "logit_abs"):
            data.batches = self._score_batches(ctx)
        if o.score == "ase":
            data.craft = lambda x, y: craft(ctx.model, ctx.model, x, y, o, "ce")
        data.options = {"fisher": o.fisher, "nis_seed": o.nis_seed, "saliency": o.saliency,
                        "mask_steps": o.mask_steps, "mask_lr": o.mask_lr}
        for member in ctx.members:  # one network at a time (each member has its own layers)
            initialise_scores(member, o.score, data if len(ctx.members) == 1 else
                              ScoreData(data.batches, (lambda x, y, m=member: craft(m, m, x, y, o, "ce"))
                                        if o.score == "ase" else None, data.options))

    # ---- training
    def on_epoch_start(self, ctx: "TrainContext", epoch: int) -> None:
        from robbench.pruning.measure import footprint

        info = _input_shape(ctx)
        fps = [footprint(m, info) for m in ctx.members]
        ctx.extras["log_sparsity"] = sum(f.prunable - f.prunable_kept for f in fps) / max(1, sum(f.prunable for f in fps))
        ctx.extras["log_kept_params"] = sum(f.params_kept for f in fps)
        ctx.extras["log_macs_kept"] = sum(f.macs_kept for f in fps)
        if self.provenance:
            ctx.extras["log_dense_from"] = self.provenance
        if self._sums_epoch != epoch:  # a resume mid-epoch keeps the epoch's running sums
            self._sums, self._count, self._sums_epoch = {}, 0, epoch

    def step(self, ctx: "TrainContext", batch: Batch) -> dict[str, float]:
        o: PruneOptions = self.options
        x, y = batch.x, batch.y
        if self.stream is not None:
            got = self.stream.batch(ctx.epoch, ctx.step)
            if got is None:
                return {}  # past this subset's batches: the epoch is one pass over the subset
            x, y = _shard_to(ctx, *got)
            metrics = self._objective_step(ctx, x, y)
            # the loop averages returned metrics over all of its steps, skipped ones included: the
            # subset's epoch means go to the log through extras instead
            for k, v in metrics.items():
                self._sums[k] = self._sums.get(k, 0.0) + v
            self._count += 1
            ctx.extras["log_subset_losses"] = {k: v / self._count for k, v in self._sums.items()}
            ctx.extras["log_subset_batches"] = self._count
            return {}
        return self._objective_step(ctx, x, y)

    def _objective_step(self, ctx: "TrainContext", x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        o: PruneOptions = self.options
        _, fn = OBJECTIVES[o.objective]
        loss, metrics = fn(ctx.model, ctx.model, x, y, o)
        if o.phase == "prune" and has_learnable_rates(ctx.model) and o.hw_gamma > 0:
            from robbench.pruning.transform import MaskOptions

            target = ctx.entry.model.transform_options.get("sparsity", MaskOptions().sparsity)
            hw = hardware_loss(ctx.model, 1.0 - float(target))
            loss = loss + (ctx.epoch + 1) * o.hw_gamma * hw
            metrics["hw_loss"] = float(hw.detach())
        ctx.update(loss)
        return metrics


def _input_shape(ctx: "TrainContext") -> tuple[int, int, int]:
    from robbench.data import get_info

    info = get_info(ctx.entry.data.dataset, ctx.entry.data.options)
    return (info.in_channels, info.image_size, info.image_size)


def _shard_to(ctx: "TrainContext", x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's contiguous chunk of a global batch (as the loop shards its own), on the device."""
    if ctx.dist.enabled:
        x = torch.tensor_split(x, ctx.dist.world_size)[ctx.dist.rank]
        y = torch.tensor_split(y, ctx.dist.world_size)[ctx.dist.rank]
    return ctx.prepare(x), y.to(ctx.device)
