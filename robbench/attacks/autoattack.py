"""AutoAttack (Croce & Hein 2020) through the ``pyautoattack`` package, behind robbench's call shape.

pyautoattack 0.2.0 is fra31/auto-attack refactored with a different API (keyword-only constructor,
``attacks=`` instead of ``attacks_to_run=``, ``batch_size=`` instead of ``bs=``, always returns
``(x_adv, y_adv)``, logs through the 'auto-attack' logger). Versions (fra31 ``_set_version``):
'standard' = apgd-ce (1 restart), apgd-t (9 targets), fab-t (9 targets), square (5000 queries), APGD
100 iterations; 'plus' adds apgd-dlr and fab with 5 restarts; 'rand' = apgd-ce + apgd-dlr with EOT 20
for randomised models. 'custom' runs ``attacks`` with the constructor's defaults (note: APGD and FAB
then use 5 restarts, unlike 'standard').

The checks AutoAttack runs (randomised output, softmax output, dynamic defence, zero gradients, Square
beating the white-box attacks, number of classes) are returned as ``warnings`` so the engine can store
them. Feed logits or log-probabilities, never softmax (the softmax check flags it).
"""
from __future__ import annotations

import contextlib
import logging
import sys
import warnings as _warnings
from typing import Callable, Iterator, Literal, Sequence

import torch

from robbench.attacks.core import AttackResult
from robbench.errors import ConfigError

Model = Callable[[torch.Tensor], torch.Tensor]
AA_VERSIONS = ("standard", "plus", "rand", "custom")
AA_ATTACKS = ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t")
_NORMS = {"linf": "Linf", "l2": "L2", "l1": "L1"}


def _print_line(msg: str) -> None:
    """One AutoAttack log line on stderr, above a progress bar when one is drawn."""
    try:
        from tqdm import tqdm

        tqdm.write(f"  autoattack: {msg}", file=sys.stderr)
    except ImportError:  # tqdm is a dependency; this keeps the adapter usable without it
        print(f"  autoattack: {msg}", file=sys.stderr, flush=True)


# Where AutoAttack's per-attack lines go while it runs (None: nowhere). A run takes minutes, so its
# lines (each attack's robust accuracy and time) are shown as they come, not only stored at the end.
_stream: Callable[[str], None] | None = _print_line


@contextlib.contextmanager
def streaming(fn: Callable[[str], None] | None) -> Iterator[None]:
    """Send AutoAttack's live log lines to ``fn`` (None: silence them) inside the block."""
    global _stream
    old, _stream = _stream, fn
    try:
        yield
    finally:
        _stream = old


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        if _stream is not None:  # its per-attack lines are DEBUG records
            _stream(record.getMessage())


def autoattack(model: Model, x: torch.Tensor, y: torch.Tensor, eps: float, *,
               version: Literal["standard", "plus", "rand", "custom"] = "standard",
               norm: Literal["linf", "l2", "l1"] = "linf", seed: int = 0,
               attacks: Sequence[str] | None = None, n_iter: int | None = None,
               n_queries: int | None = None, n_restarts: int | None = None, eot_iter: int | None = None,
               n_target_classes: int | None = None, batch_size: int = 250,
               log: list[str] | None = None) -> AttackResult:
    """Run AutoAttack on (x, y) and return an :class:`AttackResult` with its check warnings.

    seed 0: fra31 APGD's default seed (pyautoattack's ``seed=None`` would use ``time.time()``).
    ``n_iter`` / ``n_queries`` / ``n_restarts`` / ``n_target_classes`` / ``eot_iter`` override the
    version's values (for quick tests; a protocol records every override). ``log`` receives every
    message AutoAttack logged (per-attack robust accuracy and timings).
    """
    from pyautoattack import AutoAttack

    if version not in AA_VERSIONS:
        raise ConfigError(f"unknown AutoAttack version {version!r}; allowed: {', '.join(AA_VERSIONS)}",
                          field="version")
    if norm not in _NORMS:
        raise ConfigError(f"unknown norm {norm!r}; allowed: {', '.join(_NORMS)}", field="norm")
    if version == "custom":
        if not attacks:
            raise ConfigError("version 'custom' needs a list of attacks", field="attacks")
        bad = [a for a in attacks if a not in AA_ATTACKS]
        if bad:
            raise ConfigError(f"unknown AutoAttack attack {bad[0]!r}; allowed: {', '.join(AA_ATTACKS)}",
                              field="attacks")
    elif attacks:
        raise ConfigError(f"'attacks' needs version 'custom' (version {version!r} fixes its own list)",
                          field="attacks")

    x = x.detach()
    aa = AutoAttack(model, attacks=list(attacks) if version == "custom" else None, device=x.device,
                    eps=float(eps), norm=_NORMS[norm], seed=seed, version=version)
    if n_iter is not None:
        aa.apgd.n_iter = aa.apgd_targeted.n_iter = aa.fab.n_iter = int(n_iter)
    if n_queries is not None:
        aa.square.n_queries = int(n_queries)
    if n_restarts is not None:
        aa.apgd.n_restarts = aa.fab.n_restarts = int(n_restarts)
    if n_target_classes is not None:
        aa.apgd_targeted.n_target_classes = aa.fab.n_target_classes = int(n_target_classes)
    if eot_iter is not None:
        aa.apgd.eot_iter = int(eot_iter)

    logger = logging.getLogger("auto-attack")
    handler = _Capture()
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        with _warnings.catch_warnings(record=True) as caught:
            _warnings.simplefilter("always")
            x_adv, _ = aa.run_standard_evaluation(x, y.to(x.device), batch_size=batch_size)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    found = [r.getMessage() for r in handler.records if r.levelno >= logging.WARNING]
    # checks called without a logger fall back to warnings.warn
    found += [str(w.message) for w in caught if "pyautoattack" in str(w.filename)]
    if log is not None:
        log.extend(r.getMessage() for r in handler.records)
    with torch.no_grad():
        fooled = model(x_adv).argmax(dim=1) != y.to(x.device)
    return AttackResult(x_adv=x_adv.detach(), fooled=fooled, fooled_per_restart=fooled[None].clone(),
                        best_restart=torch.zeros_like(y, device=x.device), warnings=found,
                        stats={"eval": int(x.shape[0])})
