"""Transfer sources: crafting (or finding in the cache) every transfer set of a protocol's source
attacks, and storing each source's own accuracy on its sets (a run of role ``source``)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from robbench.attacks.capabilities import AttackCall
from robbench.config import to_dict
from robbench.distributed import DistEnv
from robbench.errors import UserError
from robbench.evaluate import transfer
from robbench.evaluate.execute import TransferSets, Work, make_attack
from robbench.evaluate.plan import PlannedAttack
from robbench.evaluate.protocol import Protocol
from robbench.evaluate.targets import Target, load_target
from robbench.models.eot import EOT
from robbench.outcomes import NO_MEMBER, BatchKey


def set_fields(proto: Protocol, attack: PlannedAttack, source: Target, eps: float, ids: Sequence[int]) -> dict[str, Any]:
    return transfer.set_fields(source=source.name, source_sha256=source.checkpoint_sha256, attack=attack.spec.attack,
                               params=to_dict(attack.options), norm=attack.spec.norm or proto.norm, eps=eps,
                               dataset=source.dataset, split=proto.samples.split, sample_ids=ids, seed=proto.seed)


def _crafter(attack: PlannedAttack, model: Any, work: Work) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    fn = make_attack(attack)

    def craft(xb: torch.Tensor, yb: torch.Tensor, eb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if attack.caps.per_sample_eps:
            # ensure_sets stacks one copy of the batch per missing eps: tiles = that count, so each eps
            # block draws the random start of a separate run at that eps and a set's content depends
            # only on its key, not on the eps generated beside it
            res = fn(model, xb, yb, eb, **AttackCall(tiles=int(torch.unique(eb).numel())).kwargs(attack.caps))
        else:
            res = fn(model, xb, yb, float(eb[0]))
        work.grad_passes += int((getattr(res, "stats", {}) or {}).get("grad", 0))
        return res.x_adv, ~res.fooled
    return craft


class SourceSets:
    """Every transfer set one target reads: made (sharded over ranks) when missing, keyed in ``sets``."""

    def __init__(self, proto: Protocol, attacks: Sequence[PlannedAttack], dist: DistEnv, work: Work,
                 cache_root: Path | None) -> None:
        self.proto, self.attacks, self.dist, self.work, self.root = proto, list(attacks), dist, work, cache_root

    def ensure(self, target: Target, data: Any, ids: list[int], opts: "SourceOptions") -> TransferSets:
        sets = TransferSets(self.root, ids)
        for src in self.proto.sources:
            released = transfer.released_index(src, self.root)
            if released is not None:  # a paper's own adversarial examples: no source model to load
                self._released(src, released, target, sets)
                continue
            s = load_target(src, opts.runs_dir, opts.device, memory_format=opts.memory_format)
            if s.dataset != target.dataset:
                raise UserError(f"source {src} is a {s.dataset} model, target {target.name} a {target.dataset} model",
                                file=self.proto.source_file, field="sources")
            for a in self.attacks:
                fields = {e: set_fields(self.proto, a, s, e, ids) for e in a.eps}
                keys = {e: transfer.set_key(f) for e, f in fields.items()}
                if not all(transfer.exists(k, self.root) for k in keys.values()):
                    self._make(a, s, data, ids, fields, opts)
                for e, k in keys.items():
                    sets.keys[(src, a.id, e)] = k
            if self.dist.is_main and opts.store is not None:
                self._store_accuracy(s, sets, ids, opts.store)
            del s
        return sets

    def _released(self, src: str, index: dict[str, Any], target: Target, sets: TransferSets) -> None:
        if index.get("dataset") != target.dataset:
            raise UserError(f"released sets {src} are {index.get('dataset')} images, target {target.name} a "
                            f"{target.dataset} model", file=self.proto.source_file, field="sources")
        for a in self.attacks:
            for e in a.eps:
                key = index["sets"].get(a.id, {}).get(transfer.eps_label(e))
                if key is None:
                    have = ", ".join(sorted(index["sets"])) or "none"
                    raise UserError(f"released sets {src} have no {a.id!r} at eps {e:g} (attack ids there: {have})",
                                    file=self.proto.source_file, field="sources")
                sets.keys[(src, a.id, e)] = key

    def _make(self, a: PlannedAttack, s: Target, data: Any, ids: list[int], fields: dict[float, dict[str, Any]],
              opts: "SourceOptions") -> None:
        model = EOT(s.model, self.proto.eot_samples) if s.randomized and a.caps.eot else s.model
        craft = _crafter(a, model, self.work)

        def get_batch(bid: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
            xb, yb = data.get(list(bid))
            return s.fmt.prepare(xb.to(opts.device)), yb.to(opts.device)

        opts.say(f"generating transfer sets {a.id} from {s.name} (eps {', '.join(map(str, fields))})")
        bar = opts.progress(len(ids) // self.dist.world, f"{s.name} {a.id}")
        stats = {"generated_batches": 0}
        transfer.ensure_sets(fields, sample_ids=ids, get_batch=get_batch, craft=craft, batch_size=self.proto.batch_size,
                             root=self.root, progress=bar.update, stats=stats, shard=(self.dist.rank, self.dist.world),
                             assemble=not self.dist.enabled)
        bar.close()
        self.dist.barrier()
        if self.dist.enabled and self.dist.is_main:
            transfer.ensure_sets(fields, sample_ids=ids, get_batch=get_batch, craft=craft,
                                 batch_size=self.proto.batch_size, root=self.root)
        self.dist.barrier()
        self.work.generated_batches += stats["generated_batches"]

    def _store_accuracy(self, s: Target, sets: TransferSets, ids: list[int], store: Any) -> None:
        """The source's accuracy on its own sets, as a run of role ``source`` under the protocol."""
        proto = self.proto
        run_id = store.start_run(s.name, s.checkpoint_sha256, proto.name, proto.sha256(), proto.overrides, proto.seed,
                                 {"role": "transfer source", "protocol": proto.name}, force=False, role="source")
        if store.run(run_id)["status"] == "done":
            return
        done = store.done_batches(run_id)
        for a in self.attacks:
            for e in a.eps:
                key = BatchKey(a.id, eps=float(e))
                if key in done:
                    continue
                ts = transfer.load_set(sets.keys[(s.name, a.id, e)], root=self.root, expect_ids=ids)
                final = a.final()
                store.write_batch(run_id, key, [(final, float(e), sid, NO_MEMBER, int(v), None)
                                                for sid, v in zip(ids, ts.source_correct.tolist())])
        store.finish_run(run_id)


@dataclass
class SourceOptions:
    """Where sources load from, where their accuracy goes and how progress is shown."""

    runs_dir: Any
    device: torch.device
    memory_format: str
    store: Any
    say: Callable[[str], None]
    progress: Callable[[int, str], Any]
