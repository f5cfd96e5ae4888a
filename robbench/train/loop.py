"""The one training loop: epochs, optimizers, learning-rate schedule, per-epoch clean evaluation,
``log.jsonl``, progress bars, atomic resume state and data-parallel training.

A method (``robbench.train.methods``) supplies only the per-batch objective; it works through a
:class:`TrainContext` (members, optimizers via :meth:`TrainContext.update`, device, epoch/step).

Resume. The state (model, optimizers, epoch, next batch, every RNG state of every rank, the method's
own state, the running epoch metrics) is written atomically at the end of every epoch and every
``train.save_every_steps`` batches. Data order and augmentation are pure functions of (seed, stream,
epoch, batch) (:class:`~robbench.data.BatchLoader`), the learning rate a pure function of the epoch,
so a run killed at any moment and resumed ends with bit-identical weights on CPU.

Data parallel (``torchrun``): every rank holds the full model; each global batch (``data.batch_size``)
is cut into one contiguous chunk per rank; after ``backward`` the gradients are averaged with one
``all_reduce`` (so methods with several forwards per step, partial forwards and double backprop need
no DistributedDataParallel wrapper) and BatchNorm buffers are broadcast from rank 0 after each update
(DDP's ``broadcast_buffers``). Rank 0 writes every file.
"""
from __future__ import annotations

import json
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from robbench.checkpoint import RunDir, rng_state, set_rng_state
from robbench.config import OptimizerSpec, ScheduleSpec, ZooEntry
from robbench.memformat import FormatChoice, choose_memory_format
# the torchrun handle is shared with evaluation; re-exported here, where training code imports it from
from robbench.distributed import DistEnv, dist_env_from_environment  # noqa: F401
from robbench.errors import CheckpointError, ConfigError
from robbench.train.methods import Batch, Method
from robbench.train.schedule import lr_at, lr_factor  # noqa: F401  (re-exported: methods and tests use them)

STATE_FORMAT = "robbench-train-state/1"


# ----------------------------------------------------------------------------------------------
# Optimizers and schedule
# ----------------------------------------------------------------------------------------------

def build_optimizers(model: nn.Module, members: list[nn.Module], spec: OptimizerSpec) -> list[torch.optim.Optimizer]:
    """One optimizer per member (DVERGE utils.get_optimizers: SGD per sub-model) or one joint optimizer
    over every parameter (ADP/GAL: one Adam over all models)."""
    groups = [list(m.parameters()) for m in members] if spec.per_member else [list(model.parameters())]
    out: list[torch.optim.Optimizer] = []
    for params in groups:
        if spec.name == "sgd":
            out.append(torch.optim.SGD(params, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay,
                                       nesterov=spec.nesterov))
        elif spec.name == "rmsprop":
            out.append(torch.optim.RMSprop(params, lr=spec.lr, alpha=spec.alpha, eps=spec.eps, momentum=spec.momentum,
                                           weight_decay=spec.weight_decay))
        else:
            out.append(torch.optim.Adam(params, lr=spec.lr, weight_decay=spec.weight_decay, eps=spec.eps))
    return out


# ----------------------------------------------------------------------------------------------
# The context a method sees
# ----------------------------------------------------------------------------------------------

@dataclass
class TrainContext:
    """What a method's ``setup``/``on_epoch_start``/``step`` may use."""

    entry: ZooEntry
    model: nn.Module  # the Ensemble (never wrapped)
    optimizers: list[torch.optim.Optimizer]
    device: torch.device
    dist: DistEnv
    seed: int
    num_classes: int
    epoch: int = 0
    step: int = 0  # batch index within the epoch
    global_step: int = 0
    memory_format: torch.memory_format = torch.contiguous_format
    extras: dict[str, Any] = field(default_factory=dict)  # scratch space for methods
    # where this run is trained and where its data lives: a method that loads a prerequisite run
    # (e.g. a team picked from other trained entries) must read it from the same runs folder
    runs_dir: Path | None = None
    data_root: Path | None = None

    @property
    def members(self) -> list[nn.Module]:
        return list(self.model.members)  # type: ignore[attr-defined]

    @property
    def options(self) -> Any:
        return self.entry.method_params

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Move an input batch to the device in the model's memory format."""
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=self.memory_format) if x.dim() == 4 else x

    def zero_grad(self) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    def update(self, loss: torch.Tensor) -> None:
        """zero_grad, ``loss.backward()``, data-parallel gradient average, step every optimizer.

        With per-member optimizers pass the sum of the members' losses: when loss i depends only on
        member i's parameters, the gradients equal those of separate per-member backward passes."""
        self.zero_grad()
        loss.backward()
        self.step_optimizers()

    def step_optimizers(self) -> None:
        """Average gradients over ranks (if distributed) and step every optimizer (for methods that
        run their own backward passes, e.g. accumulating over paths)."""
        if self.dist.enabled:
            allreduce_grads(self.model, self.dist.world_size)
        for opt in self.optimizers:
            opt.step()
        if self.dist.enabled:
            broadcast_buffers(self.model)


def _flat_collective(tensors: list[torch.Tensor], collective: Any) -> None:
    """Run one collective over ``tensors`` flattened into one buffer (one call, not one per tensor),
    then copy the result back in place."""
    flat = torch.cat([t.reshape(-1).to(tensors[0].dtype) for t in tensors])
    collective(flat)
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset:offset + n].view_as(t))
        offset += n


def allreduce_grads(model: nn.Module, world_size: int) -> None:
    """Average every existing gradient across ranks with one flat all_reduce."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if grads:
        _flat_collective(grads, lambda flat: (dist.all_reduce(flat), flat.div_(world_size)))


def broadcast_buffers(model: nn.Module) -> None:
    """BatchNorm running statistics (every buffer) from rank 0, like DDP's broadcast_buffers."""
    bufs = list(model.buffers())
    for group in ([b for b in bufs if b.is_floating_point()], [b for b in bufs if not b.is_floating_point()]):
        if group:
            _flat_collective(group, lambda flat: dist.broadcast(flat, src=0))


def broadcast_parameters(model: nn.Module) -> None:
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t.data, src=0)


def weights_sha256(model: nn.Module) -> str:
    """sha256 over every parameter and buffer in state-dict order (to compare ranks)."""
    import hashlib

    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate_clean(model: nn.Module, loader: Any, ctx: TrainContext) -> dict[str, Any]:
    """Clean test accuracy of the ensemble and of each member (eval mode; batches split over ranks)."""
    from robbench.models import combine_logits

    was = [(m, m.training) for m in model.modules()]
    model.eval()
    m = len(model.members)  # type: ignore[attr-defined]
    counts = torch.zeros(m + 2, dtype=torch.float64)  # [ensemble, member..., total]
    try:
        for b, (x, y) in enumerate(loader.epoch(0)):
            if b % ctx.dist.world_size != ctx.dist.rank:
                continue
            x, y = ctx.prepare(x), y.to(ctx.device)
            logits = model.member_logits(x)  # type: ignore[attr-defined]
            ens = logits[0] if m == 1 else combine_logits(logits, model.combine)  # type: ignore[attr-defined]
            counts[0] += (ens.argmax(1) == y).sum().item()
            counts[1:m + 1] += (logits.argmax(2) == y).sum(1).double().cpu()
            counts[m + 1] += len(y)
    finally:
        for mod, flag in was:
            mod.training = flag
    if ctx.dist.enabled:
        dist.all_reduce(counts)
    total = max(1.0, float(counts[m + 1]))
    return {"acc": float(counts[0]) / total, "member_acc": [float(c) / total for c in counts[1:m + 1]]}


# ----------------------------------------------------------------------------------------------
# Resume state
# ----------------------------------------------------------------------------------------------

def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _gather_rng(env: DistEnv) -> list[dict[str, Any]]:
    st = rng_state()
    if not env.enabled:
        return [st]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, st)
    return out


def load_resume_state(run: RunDir, entry: ZooEntry) -> dict[str, Any] | None:
    """The resume state if the run has one for this exact config.

    Its sha256 must be the one the manifest records (or announced just before writing it: a kill
    between the file and the manifest): any other bytes are refused, never trained on. It is read
    with ``weights_only=True``, so nothing in it can run."""
    state = run.load_train_state()
    if state is None:
        return None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT or state.get("entry_sha256") != entry.sha256():
        raise CheckpointError(f"resume state belongs to another configuration; {run.fresh_hint()}",
                              file=str(run.train_state_path))
    return state


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------

@dataclass
class LoopResult:
    epochs_done: int
    last: dict[str, Any]  # last epoch's log record (empty if nothing ran)
    rank_weights_sha256: list[str]


def _peak_memory_mb(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "cpu_max_rss"


def _progress(total: int, initial: int, desc: str, enabled: bool) -> Any:
    from tqdm import tqdm

    # disable=None: tqdm turns itself off when stderr is not a terminal (logs, CI).
    return tqdm(total=total, initial=initial, desc=desc, leave=False, dynamic_ncols=True,
                disable=None if enabled else True)


def _shard(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """This rank's contiguous chunk of a global batch."""
    if not env.enabled:
        return t
    return torch.tensor_split(t, env.world_size)[env.rank]


def train_loop(entry: ZooEntry, model: nn.Module, method: Method, run: RunDir | None, *, device: torch.device,
               data_root: Any = None, env: DistEnv = DistEnv(), progress: bool = True,
               resume: bool = True, memory_format: str | FormatChoice = "auto",
               runs_dir: Path | str | None = None) -> LoopResult:
    """Train ``model`` (an Ensemble, already on ``device``) for ``entry.train.epochs`` with ``method``.

    Resumes from ``run``'s train state when present; writes train state and ``log.jsonl`` there
    (rank 0). ``run=None`` trains without any files (benchmarks, tests). ``memory_format`` is a
    :class:`FormatChoice` already made, or what to request from :func:`choose_memory_format`.
    ``runs_dir``/``data_root`` are handed to the method on :class:`TrainContext` (None: the defaults)."""
    from robbench.data import BatchLoader, get_info, load_split

    t = entry.train
    info = get_info(entry.data.dataset, entry.data.options)
    fmt = memory_format if isinstance(memory_format, FormatChoice) else choose_memory_format(
        model, (info.in_channels, info.image_size, info.image_size), device, memory_format, what=entry.name,
        batch_size=max(1, entry.data.batch_size // env.world_size))
    mf = fmt.format
    model.to(memory_format=mf)
    opts = build_optimizers(model, list(model.members), t.optimizer)  # type: ignore[attr-defined]
    ctx = TrainContext(entry=entry, model=model, optimizers=opts, device=device, dist=env, seed=t.seed,
                       num_classes=info.num_classes, memory_format=mf,
                       runs_dir=Path(runs_dir) if runs_dir is not None else None,
                       data_root=Path(data_root) if data_root is not None else None)

    root = entry.data.root or data_root
    train_data = load_split(entry.data.dataset, "train", root, entry.data.options)
    test_data = load_split(entry.data.dataset, "test", root, entry.data.options)
    loader = BatchLoader(train_data, entry.data.batch_size, shuffle=True, augment=entry.data.augment, seed=t.seed)
    streams = [loader] + [loader.stream(k) for k in range(1, method.streams)]
    test_loader = BatchLoader(test_data, entry.data.test_batch_size, shuffle=False, augment="none", seed=0)
    n_batches = len(loader)

    # ---- resume
    epoch, start_step, global_step = 0, 0, 0
    sums: dict[str, float] = {}
    count, seconds = 0, 0.0
    state = load_resume_state(run, entry) if (run is not None and resume) else None
    if state is not None:
        if int(state["world_size"]) != env.world_size:
            raise ConfigError(f"the run was started with {state['world_size']} process(es); resume it with the "
                              f"same number (got {env.world_size})", file=str(run.train_state_path) if run else None)
        model.load_state_dict(state["model"])
        for opt, sd in zip(opts, state["optimizers"], strict=True):
            opt.load_state_dict(sd)
        method.load_state_dict(state.get("method", {}))
        epoch, start_step, global_step = int(state["epoch"]), int(state["step"]), int(state["global_step"])
        sums = {k: float(v) for k, v in state["metrics"]["sums"].items()}
        count, seconds = int(state["metrics"]["count"]), float(state["metrics"]["seconds"])
    elif env.enabled:
        broadcast_parameters(model)
    method.setup(ctx)
    if state is not None:
        set_rng_state(state["rng"][env.rank])  # last: setup/building may have drawn numbers
        if run is not None and env.is_main:
            _truncate_log(run, epoch)

    def save_state(ep: int, st: int) -> None:
        rngs = _gather_rng(env)
        if run is None or not env.is_main:
            return
        run.save_train_state({
            "format": STATE_FORMAT, "entry_sha256": entry.sha256(), "world_size": env.world_size,
            "epoch": ep, "step": st, "global_step": global_step,
            "model": _cpu_state(model), "optimizers": [o.state_dict() for o in opts],
            "rng": rngs, "method": method.state_dict(),
            "metrics": {"sums": dict(sums), "count": count, "seconds": seconds},
        }, epochs_done=ep)

    last: dict[str, Any] = {}
    every = t.save_every_steps
    while epoch < t.epochs:
        t0 = time.perf_counter()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        lr = lr_at(t.schedule, t.optimizer.lr, epoch, t.epochs)
        for opt in opts:
            for g in opt.param_groups:
                g["lr"] = lr
        ctx.epoch = epoch
        model.train()
        method.on_epoch_start(ctx, epoch)
        bar = _progress(n_batches, start_step, f"{entry.name} epoch {epoch + 1}/{t.epochs}", progress and env.is_main)
        iters = [s.epoch(epoch, start_batch=start_step) for s in streams]
        for b, data in enumerate(zip(*iters), start=start_step):
            ctx.step, ctx.global_step = b, global_step
            (x, y), extra = data[0], data[1:]
            batch = Batch(ctx.prepare(_shard(x, env)), _shard(y, env).to(device),
                          tuple((ctx.prepare(_shard(ex, env)), _shard(ey, env).to(device)) for ex, ey in extra))
            metrics = method.step(ctx, batch)
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            count += 1
            global_step += 1
            bar.update(1)
            if metrics:
                bar.set_postfix({k: f"{v:.3f}" for k, v in list(metrics.items())[:3]}, refresh=False)
            if every and (b + 1) % every == 0 and b + 1 < n_batches:
                seconds += time.perf_counter() - t0
                t0 = time.perf_counter()
                save_state(epoch, b + 1)
        bar.close()
        evals = evaluate_clean(model, test_loader, ctx)
        seconds += time.perf_counter() - t0
        mem, mem_kind = _peak_memory_mb(device)
        losses = {k: v / max(1, count) for k, v in sums.items()}
        if env.enabled:  # average the epoch means over ranks
            vec = torch.tensor([losses[k] for k in sorted(losses)], dtype=torch.float64)
            dist.all_reduce(vec)
            losses = {k: float(v) / env.world_size for k, v in zip(sorted(losses), vec)}
        last = {"epoch": epoch + 1, "lr": lr, "losses": losses, "test_acc": evals["acc"],
                "member_test_acc": {str(i): a for i, a in enumerate(evals["member_acc"])}, "seconds": round(seconds, 3), "batches": n_batches,
                "peak_mem_mb": round(mem, 1), "peak_mem_kind": mem_kind, "world_size": env.world_size,
                **{k: v for k, v in ctx.extras.items() if k.startswith("log_")}}
        if run is not None and env.is_main:
            # log first, then state: a kill in between repeats this epoch's line, which resume drops.
            run.append_log(last)
            accs = " ".join(f"{a:.3f}" for a in evals["member_acc"])
            summary = " ".join(f"{k}={v:.4f}" for k, v in losses.items() if "/" not in k)
            print(f"[{entry.name}] epoch {epoch + 1}/{t.epochs} lr={lr:.4g} {summary} test_acc={evals['acc']:.4f} "
                  f"members=[{accs}] {seconds:.1f}s", file=sys.stderr, flush=True)
        epoch, start_step = epoch + 1, 0
        sums, count, seconds = {}, 0, 0.0
        save_state(epoch, 0)

    if env.enabled:
        shas: list[Any] = [None] * env.world_size
        dist.all_gather_object(shas, weights_sha256(model))
    else:
        shas = [weights_sha256(model)]
    return LoopResult(epochs_done=epoch, last=last, rank_weights_sha256=shas)


def _truncate_log(run: RunDir, epoch: int) -> None:
    """Keep only log lines of finished epochs (< resumed ``epoch`` + 1): a line written just before a kill
    for an epoch whose state was not saved would otherwise appear twice."""
    records = [r for r in run.read_log() if int(r.get("epoch", 0)) <= epoch]
    if len(records) == len(run.read_log()) and run.log_path.is_file():
        return
    from robbench.checkpoint import atomic_write_bytes

    atomic_write_bytes(run.log_path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records).encode())
