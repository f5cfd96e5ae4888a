"""What an attack supports, declared by the attack, asked by the evaluation engine.

An attack registers ``ATTACKS.register(name, params=Options, capabilities=fn)`` where ``fn(options) ->
Capabilities`` says, for those options, what the engine may do with it. The engine reads nothing
else of the options: a new attack that declares per-sample eps and restarts gets eps batching,
per-restart EOT judging, restarts-as-runs, resume and sharding like the built-in ones. An attack
without a declaration gets :data:`NO_CAPABILITIES` (one call per eps, one restart, nothing injected).

The engine's settings reach an attack call as :class:`AttackCall` keyword arguments, and only those
the capabilities declare (an attack is never handed a setting it would ignore).
No torch import here: the evaluation plan reads capabilities without it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass(frozen=True)
class Capabilities:
    """What one configured attack supports.

    - ``per_sample_eps``: accepts a [B] eps tensor and ``tiles`` (B = tiles stacked copies of one batch,
      each drawing the random start of a separate run), so several eps share one call;
    - ``restarts`` and ``for_restart``: the attack runs ``restarts`` random restarts per call, restart r
      seeded ``seed + r``; ``for_restart(r)`` gives the options of restart r alone (the engine judges each
      restart of a randomized model on its own draw, and runs restarts as separate transferability runs);
    - ``seed``: the seed of restart 0 (None: the attack draws from the global RNG);
    - ``stream_init``: restart r's generator draws exactly one value per input element per call, for the
      random start, and nothing else; the engine may then pass ``rng`` generators continued over the
      sample batches (DVERGE eval_wbox.py seeds once per restart for the whole test set);
    - ``target_seed``: the attack moves towards random target classes drawn with this seed; the engine
      draws them per sample id (independent of batching, sharding and resume) and passes ``targets``;
    - ``eot``: on randomized models the attack is given the EOT wrapper (mean softmax over draws); False:
      the attack handles the model's randomness itself and gets the model as it is;
    - ``steps`` and ``record_steps``: iteration count, and the counts after which accuracy is also
      reported (one run gives PGD-K for every recorded K).
    """

    per_sample_eps: bool = False
    restarts: int = 1
    for_restart: Callable[[int], Any] | None = field(default=None, compare=False)
    seed: int | None = None
    stream_init: bool = False
    target_seed: int | None = None
    eot: bool = True
    steps: int | None = None
    record_steps: tuple[int, ...] = ()

    def options_for_restart(self, options: Any, r: int) -> Any:
        """The options of restart ``r`` run alone (the options themselves when restarts are not split)."""
        return self.for_restart(r) if self.for_restart is not None else options


NO_CAPABILITIES = Capabilities()


@dataclass(frozen=True)
class AttackCall:
    """The engine's settings for one attack call, passed as keyword arguments of the attack function.

    ``targets``: target classes [B] (needs ``target_seed``); ``rng``: one generator per restart (needs
    ``stream_init``); ``tiles``: copies of one batch stacked for eps batching (needs ``per_sample_eps``)."""

    targets: Any = None
    rng: Any = None
    tiles: int | None = None

    def kwargs(self, caps: Capabilities) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.targets is not None:
            if caps.target_seed is None:
                raise ValueError("targets given to an attack that declares no random targets")
            out["targeted"] = self.targets
        if self.rng is not None:
            if not caps.stream_init:
                raise ValueError("rng given to an attack that declares no continuable stream")
            out["rng"] = self.rng
        if self.tiles is not None:
            if not caps.per_sample_eps:
                raise ValueError("tiles given to an attack that takes one eps per call")
            out["tiles"] = self.tiles
        return out
