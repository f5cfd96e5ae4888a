"""Training methods: each module registers one per-batch objective in ``robbench.registry.METHODS``.

The method interface (what a new method, e.g. Ensemble-in-One's ``eio``, implements)::

    @dataclass
    class MyOptions:                       # validated from the entry's [train.params] table
        coeff: float = opt(0.5, min=0.0, help="... (paper §x / reference file:line)")

    @METHODS.register("mine", params=MyOptions)
    class Mine(Method):
        streams = 1             # independent training-data streams the loop zips (DVERGE: 2)
        needs_init_from = False # True: the entry must set train.init_from (a ConfigError otherwise)

        def setup(self, ctx): ...              # once, after model, optimizers and a resumed state exist
        def on_epoch_start(self, ctx, epoch): ...  # also called when resuming mid-epoch: must be a pure
                                               # function of (seed, epoch, method state), never draw
                                               # from the global RNGs
        def step(self, ctx, batch) -> dict[str, float]:
            # batch.x, batch.y: the main stream (on ctx.device, channels_last); batch.extra: the other
            # streams' (x, y). Build the loss, then ctx.update(loss): zero grads, backward, DDP
            # gradient all-reduce, optimizer step(s). A method that runs its own backward passes
            # (accumulating gradients) calls ctx.zero_grad() first and ctx.step_optimizers() last.
            # Return floats to log (averaged per epoch); values of ctx.extras["log_*"] are logged too.
        def state_dict(self) -> dict: ...      # only for state the RNGs and weights do not capture
        def load_state_dict(self, state): ...

``self.options`` holds the validated options dataclass (``None`` for a method without options).
Randomness inside ``step`` must come from torch's global RNG (or generators derived from
``ctx.seed``): the loop saves and restores every global RNG state with the resume state.

The BatchNorm mode during inner attacks/distillation is each method's named option; use
:func:`module_mode` to switch and restore it (the attack core never changes train/eval mode).
"""
from robbench.train.methods.base import BNMode, Batch, Method, member_ce, module_mode, per_member_metrics

__all__ = ["BNMode", "Batch", "Method", "member_ce", "module_mode", "per_member_metrics"]

# Importing the modules registers the methods.
from robbench.train.methods import adp, advt, baseline, dverge, dverge_advt, gal  # noqa: F401
from robbench.train.methods import eio  # noqa: F401  (Ensemble-in-One)
from robbench.train.methods import adv_bases, eed, score_prune  # noqa: F401  (AT bases, pruning, EED)
from robbench.train.methods import xie  # noqa: F401  (Xie & Yuille adversarial training at scale)
