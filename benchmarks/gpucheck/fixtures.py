"""Zoo entries on CIFAR-shaped synthetic data, and the models, method contexts and batches built from them.

The check needs no dataset: an entry keeps its model, method and options and only its data table is
replaced by robbench's ``synthetic`` dataset of the same geometry (channels, side, classes), so every
tensor has the shape it has in the paper run. Batches are uniform noise drawn from a seeded CPU generator
and then moved to the device, so CPU and CUDA see the same numbers.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Geometry:
    """What a batch looks like: ``channels`` x ``side`` x ``side`` images over ``classes`` classes."""

    side: int = 32
    channels: int = 3
    classes: int = 10

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.side, self.side)


CIFAR = Geometry(32, 3, 10)


def geometry_of(entry: Any) -> Geometry:
    """The image geometry of an entry's own dataset (CIFAR-10: 3x32x32, 10 classes)."""
    from robbench.data import get_info

    info = get_info(entry.data.dataset, entry.data.options)
    return Geometry(info.image_size, info.in_channels, info.num_classes)


def synthetic_overrides(g: Geometry, batch: int | None = None, n_train: int = 256, n_test: int = 256) -> list[str]:
    """``--set`` overrides that put an entry on synthetic data of geometry ``g`` (mean/std of the
    synthetic dataset, so the normalization layer has ``g.channels`` entries)."""
    ov = ["data.dataset=synthetic",
          f"data.options={{ image_size = {g.side}, channels = {g.channels}, num_classes = {g.classes}, "
          f"n_train = {n_train}, n_test = {n_test} }}",
          "model.normalization=dataset"]
    if batch is not None:
        ov.append(f"data.batch_size={batch}")
    return ov


def synthetic_entry(spec: str, g: Geometry, batch: int | None = None, extra: list[str] | tuple[str, ...] = (),
                    n_train: int = 256, n_test: int = 256) -> Any:
    from robbench.config import load_entry

    return load_entry(spec, synthetic_overrides(g, batch, n_train, n_test) + list(extra))


@functools.lru_cache(maxsize=1)
def zoo_entries() -> tuple[tuple[str, Any, str | None], ...]:
    """(name, ZooEntry or None, error line or None) of every zoo file, loaded once per process."""
    from robbench.config import list_entries, load_entry
    from robbench.errors import UserError

    out = []
    for name in list_entries():
        try:
            out.append((name, load_entry(name), None))
        except UserError as e:  # an entry another helper is still writing: reported, never fatal
            out.append((name, None, str(e)))
    return tuple(out)


def representative_entries(method: str) -> list[str]:
    """The zoo entries using ``method``, best first for the throughput table: ResNet-20 x3 on CIFAR-10 when
    one exists (the DVERGE setting of Table 1), then non-demo entries, then the rest."""
    using = [(n, e) for n, e, _ in zoo_entries() if e is not None and e.train.method == method]

    def rank(item: tuple[str, Any]) -> tuple[bool, bool, bool, bool, str]:
        n, e = item
        return (e.paper == "demo", e.model.arch != "resnet20", e.model.members != 3,
                e.data.dataset != "cifar10", n)

    return [n for n, _ in sorted(using, key=rank)]


def build(entry: Any, device: torch.device, memory_format: str = "auto", seed: int = 0) -> tuple[Any, Any]:
    """The entry's Ensemble on ``device`` (seeded init) in the memory format ``choose_memory_format``
    picks (or forces), and that FormatChoice."""
    from robbench.data import get_info
    from robbench.memformat import choose_memory_format
    from robbench.models import build_model

    info = get_info(entry.data.dataset, entry.data.options)
    torch.manual_seed(seed)
    model = build_model(entry, info).to(device)
    fmt = choose_memory_format(model, (info.in_channels, info.image_size, info.image_size), device,
                               memory_format, what=entry.name)
    return model.to(memory_format=fmt.format), fmt


def method_context(entry: Any, model: Any, device: torch.device, fmt: Any, dist: Any = None) -> tuple[Any, Any]:
    """(TrainContext, Method) ready for ``method.step(ctx, batch)``: optimizers as the loop builds them,
    ``setup`` and ``on_epoch_start(0)`` called (DVERGE draws its epoch-0 layer there)."""
    from robbench.data import get_info
    from robbench.registry import METHODS
    from robbench.train.loop import DistEnv, TrainContext, build_optimizers

    info = get_info(entry.data.dataset, entry.data.options)
    opts = build_optimizers(model, list(model.members), entry.train.optimizer)
    ctx = TrainContext(entry=entry, model=model, optimizers=opts, device=device, dist=dist or DistEnv(),
                       seed=entry.train.seed, num_classes=info.num_classes, memory_format=fmt.format)
    method = METHODS.get(entry.train.method)(entry.method_params)
    model.train()
    method.setup(ctx)
    method.on_epoch_start(ctx, 0)
    return ctx, method


def random_images(g: Geometry, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, *g.shape, generator=gen), torch.randint(0, g.classes, (n,), generator=gen)


def random_batch(g: Geometry, n: int, streams: int, device: torch.device, fmt: Any, seed: int = 0) -> Any:
    """A training Batch: the main stream plus ``streams - 1`` independent ones (DVERGE's x_t)."""
    from robbench.train.methods import Batch

    def one(s: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = random_images(g, n, seed + 1000 * s)
        return fmt.prepare(x.to(device)), y.to(device)

    x, y = one(0)
    return Batch(x, y, tuple(one(s) for s in range(1, streams)))


def step_fn(ctx: Any, method: Any, batch: Any) -> Any:
    """One training step as a closure that advances the step counters like the loop does."""
    def run() -> dict[str, float]:
        out = method.step(ctx, batch)
        ctx.step += 1
        ctx.global_step += 1
        return out
    return run


def describe_model(entry: Any) -> str:
    m = entry.model
    text = f"{m.arch} x{m.members}"
    if m.width != 1.0:
        text += f" width {m.width:g}"
    if m.transform:
        text += f" ({m.transform})"
    return text
