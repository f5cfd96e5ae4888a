"""The memory format of a model on a device, chosen by checking it.

channels_last is +20-37% on CPU and helps on GPU, but a kernel can be wrong in one format only: torch
2.14.1's CPU kernel for a 1x1 stride-2 convolution with 2-7 input channels computes wrong weight
gradients in channels_last and corrupts the heap. So ``auto`` never assumes a format is right:

1. every distinct ``Conv2d`` shape of the model (with the input size it sees) runs forward + backward in
   both formats and the output, weight, bias and input gradients are compared. On CPU this runs in a
   child process, because a wrong kernel may corrupt the heap of the process that calls it;
2. if every layer agrees, the whole model runs forward + backward in both formats (in this process, on
   copies, under a forked RNG) and all parameter and input gradients are compared.

Both run at the batch size the model will run at (capped at :data:`MAX_PROBE_BATCH`): wrong results
can depend on it. Measured on this project's AVX512 machine, torch 2.14.1: a width-0.25 ResNet-20 on
1x8x8 inputs has every gradient upstream of its second stage off by 1-30% relative in channels_last at
batch 256 (2 of 3 seeded members; right at batch <= 64, and every single-layer probe agrees), while the
AVX2 machine gets wrong 1x1 stride-2 weight gradients at any batch.

Any disagreement chooses contiguous format and prints one line naming the layer (shape) and the torch
version. Verdicts of step 1 are cached per process by (device type, layer shape, batch); step 2 runs
once per call (two forward + backward passes). ``channels_last`` or ``contiguous`` forces a format
without a check.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
from torch import nn

MEMORY_FORMATS = ("auto", "channels_last", "contiguous")
_FORMATS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}

# float32 rounding differs between the two formats' kernels by ~1e-6-1e-5 relative (measured on ResNet-20,
# TF32 off); the wrong kernels are off by 1e-4-1e+1 relative, depending on the input.
RTOL = 1e-4
# Wrong channels_last results on this project's AVX512 machine depend on the input: the same width-0.25
# ResNet-20 at batch 256 is off by 3e-5 for one uniform draw and 2e-2 for another, so the whole model is
# checked on several draws (the first wrong one ends the check).
DRAWS = 3
MAX_PROBE_BATCH = 512  # bounds the cost of the check; training and attack batches are at most this in the zoo


@dataclass(frozen=True)
class FormatChoice:
    """The format a model runs in: ``name`` is "channels_last" or "contiguous"; ``reason`` says why
    contiguous was chosen under ``auto`` (None when channels_last checked out or the user forced it)."""

    name: str
    requested: str
    reason: str | None = None

    @property
    def format(self) -> torch.memory_format:
        return _FORMATS[self.name]

    def as_record(self) -> dict[str, Any]:
        return {"requested": self.requested, "chosen": self.name, "reason": self.reason}

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` in this format (4-d tensors only; others are returned as they are)."""
        return x.contiguous(memory_format=self.format) if x.dim() == 4 else x


@dataclass(frozen=True)
class ConvShape:
    """A Conv2d's hyperparameters and the spatial size of its input: all a kernel choice depends on."""

    in_channels: int
    out_channels: int
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    bias: bool
    height: int
    width: int
    batch: int = 2

    def describe(self) -> str:
        k, s = self.kernel_size, self.stride
        return (f"Conv2d({self.in_channels}, {self.out_channels}, kernel {k[0]}x{k[1]}, stride {s[0]}x{s[1]}"
                f"{', groups ' + str(self.groups) if self.groups != 1 else ''}) on {self.height}x{self.width} inputs, "
                f"batch {self.batch}")

    def to_json(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.__dict__.items()}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "ConvShape":
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def _max_rel_diff(a: torch.Tensor | None, b: torch.Tensor | None) -> float:
    """max|a - b| / max|a| (0 when both are absent; inf when only one is, or on non-finite values)."""
    if a is None and b is None:
        return 0.0
    if a is None or b is None:
        return float("inf")
    a, b = a.detach().double(), b.detach().double()
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return float("inf")
    scale = float(a.abs().max()) if a.numel() else 0.0
    return float((a - b).abs().max()) / max(scale, 1e-12) if a.numel() else 0.0


def probe_conv(shape: ConvShape, device: torch.device) -> float:
    """Largest relative difference between the formats over the output and the weight, bias and input
    gradients of one convolution of ``shape`` (seeded, so the same on every call)."""
    g = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(shape.in_channels, shape.out_channels, shape.kernel_size, shape.stride, shape.padding,
                     shape.dilation, shape.groups, shape.bias)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g))
        if conv.bias is not None:
            conv.bias.copy_(torch.randn(conv.bias.shape, generator=g))
    x0 = torch.rand(shape.batch, shape.in_channels, shape.height, shape.width, generator=g)
    results = []
    for mf in (torch.contiguous_format, torch.channels_last):
        m = copy.deepcopy(conv).to(device).to(memory_format=mf)
        x = x0.to(device).clone(memory_format=mf).detach().requires_grad_(True)
        out = m(x)
        # a weight that varies over every output element: a plain sum would hide transposed indexing
        w = torch.linspace(-1, 1, out.numel(), device=device).view(out.shape)
        (out * w).sum().backward()
        results.append((out.detach(), m.weight.grad, None if m.bias is None else m.bias.grad, x.grad))
    return max(_max_rel_diff(a, b) for a, b in zip(*results))


def conv_shapes(model: nn.Module, input_shape: Sequence[int], device: torch.device, batch: int = 2) -> list[ConvShape]:
    """Distinct Conv2d shapes of ``model`` on ``batch`` inputs of ``input_shape`` (C, H, W), found by one
    contiguous forward of a copy (the model itself, its BN statistics and the RNGs are untouched)."""
    probe = copy.deepcopy(model).to(device).eval()
    seen: dict[ConvShape, None] = {}

    def hook(mod: nn.Module, inputs: tuple[torch.Tensor, ...], _out: Any) -> None:
        x = inputs[0]
        if isinstance(mod, nn.Conv2d) and x.dim() == 4 and isinstance(mod.padding, tuple):
            seen[ConvShape(mod.in_channels, mod.out_channels, tuple(mod.kernel_size), tuple(mod.stride),
                           tuple(mod.padding), tuple(mod.dilation), mod.groups, mod.bias is not None,
                           int(x.shape[-2]), int(x.shape[-1]), batch)] = None

    handles = [m.register_forward_hook(hook) for m in probe.modules() if isinstance(m, nn.Conv2d)]
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
            probe(torch.zeros(2, *input_shape, device=device))
    finally:
        for h in handles:
            h.remove()
    return list(seen)


_VERDICTS: dict[tuple[str, ConvShape], float] = {}
_CHILD_ARGS = ("-m", "robbench.memformat")  # the child that probes (see _child_main)


def _probe_in_child(shapes: list[ConvShape]) -> list[float]:
    """:func:`probe_conv` of each shape in a child process; a shape whose probe kills the child
    (heap corruption) gets ``inf``. One child for all shapes, then one per shape if that child died."""
    def run(batch: list[ConvShape]) -> list[float] | None:
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        proc = subprocess.run([sys.executable, *_CHILD_ARGS],
                              input=json.dumps([s.to_json() for s in batch]), capture_output=True, text=True,
                              env=env, timeout=600)
        if proc.returncode != 0:
            return None
        return [float(v) for v in json.loads(proc.stdout.strip().splitlines()[-1])]

    got = run(shapes)
    if got is not None:
        return got
    return [(r[0] if (r := run([s])) is not None else float("inf")) for s in shapes]


def check_layers(shapes: list[ConvShape], device: torch.device) -> list[tuple[ConvShape, float]]:
    """(shape, relative difference) of every shape, probing only those not cached in this process."""
    todo = [s for s in shapes if (device.type, s) not in _VERDICTS]
    if todo:
        diffs = _probe_in_child(todo) if device.type == "cpu" else [probe_conv(s, device) for s in todo]
        _VERDICTS.update({(device.type, s): d for s, d in zip(todo, diffs)})
    return [(s, _VERDICTS[(device.type, s)]) for s in shapes]


def _gradients(model: nn.Module, x0: torch.Tensor, device: torch.device, mf: torch.memory_format,
               flow: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor | None]:
    """Output, input gradient and parameter gradients of a copy of ``model`` in format ``mf`` (seeded RNG,
    restored after). With ``flow``, also each leaf module's output gradient, in backward order."""
    m = copy.deepcopy(model).to(device).to(memory_format=mf)
    handles = []
    if flow is not None:
        def hook(name: str) -> Any:
            def record(_mod: nn.Module, _gin: Any, gout: tuple[torch.Tensor | None, ...]) -> None:
                if name not in flow and gout and gout[0] is not None:
                    flow[name] = gout[0].detach().clone()
            return record

        handles = [mod.register_full_backward_hook(hook(n)) for n, mod in m.named_modules()
                   if n and not list(mod.children())]
    try:
        x = x0.to(device).clone(memory_format=mf).detach().requires_grad_(True)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(0)
            out = m(x)
        out = out if isinstance(out, torch.Tensor) else out[0]
        w = torch.linspace(-1, 1, out.numel(), device=device).view(out.shape)
        (out * w).sum().backward()
    finally:
        for h in handles:
            h.remove()
    grads: dict[str, torch.Tensor | None] = {"output": out.detach(), "input gradient": x.grad}
    grads.update({f"gradient of {n}": p.grad for n, p in m.named_parameters() if p.requires_grad})
    return grads


def _first_wrong_module(model: nn.Module, input_shape: Sequence[int], device: torch.device, batch: int) -> str | None:
    """The first leaf module, in backward order, whose output gradient differs between the formats (where
    a wrong kernel sits), or None when it cannot be told (e.g. in-place ops refuse backward hooks)."""
    flows: list[dict[str, torch.Tensor]] = [{}, {}]
    x0 = torch.rand(batch, *input_shape, generator=torch.Generator().manual_seed(0))
    try:
        for mf, flow in zip((torch.contiguous_format, torch.channels_last), flows):
            _gradients(model, x0, device, mf, flow)
    except RuntimeError:
        return None
    for n, a in flows[0].items():
        if not _max_rel_diff(a, flows[1].get(n)) <= RTOL:
            return f"{n} ({'x'.join(map(str, a.shape))})"
    return None


def model_gradient_diff(model: nn.Module, input_shape: Sequence[int], device: torch.device,
                        batch: int = 2) -> tuple[float, str]:
    """Largest relative difference between the formats over the output, every parameter gradient and the
    input gradient of ``model`` on ``batch`` inputs (copies, in the model's train/eval mode, same RNG
    stream for both), and the tensor where it occurs (the first module whose output gradient already
    differs is :func:`_first_wrong_module`'s to find)."""
    worst, where = 0.0, ""
    for seed in range(DRAWS):
        x0 = torch.rand(batch, *input_shape, generator=torch.Generator().manual_seed(seed))
        a, b = (_gradients(model, x0, device, mf) for mf in (torch.contiguous_format, torch.channels_last))
        for k, v in a.items():
            d = _max_rel_diff(v, b.get(k))
            if d > worst:
                worst, where = d, k
        if worst > RTOL:
            break
    return worst, where


def _wrong_at(model: nn.Module, input_shape: Sequence[int], device: torch.device, batch: int) -> str:
    first = _first_wrong_module(model, input_shape, device, batch)
    return f"; the first wrong gradient reaches the output of {first}" if first else ""


_ANNOUNCED: set[str] = set()


def _announce(line: str) -> None:
    if line not in _ANNOUNCED:
        _ANNOUNCED.add(line)
        print(f"robbench: {line}", file=sys.stderr)


def _torch_build() -> str:
    cap = ""
    with_cpu = getattr(torch.backends, "cpu", None)
    if with_cpu is not None and hasattr(with_cpu, "get_cpu_capability"):
        cap = f", CPU {with_cpu.get_cpu_capability()}"
    return f"torch {torch.__version__}{cap}"


def choose_memory_format(model: nn.Module, input_shape: Sequence[int], device: torch.device | str,
                         requested: str = "auto", what: str = "model", batch_size: int = 128) -> FormatChoice:
    """The memory format to run ``model`` in on ``device`` for batches of ``batch_size`` inputs of
    ``input_shape`` (C, H, W), in the model's current train/eval mode.

    ``requested`` is "auto" (check, see the module docstring), "channels_last" or "contiguous" (forced,
    no check). ``what`` names the model in the one line printed when auto falls back to contiguous."""
    if requested not in MEMORY_FORMATS:
        from robbench.errors import ConfigError

        raise ConfigError(f"unknown memory format {requested!r}; allowed: {', '.join(MEMORY_FORMATS)}",
                          field="memory_format")
    if requested != "auto":
        return FormatChoice(requested, requested)
    device = torch.device(device)
    if len(input_shape) != 3:  # not images: channels_last does not apply
        return FormatChoice("contiguous", requested, "inputs are not images")
    batch = max(1, min(int(batch_size), MAX_PROBE_BATCH))
    with _exact_math(device):
        return _choose_checked(model, input_shape, device, requested, what, batch)


@contextlib.contextmanager
def _exact_math(device: torch.device) -> Iterator[None]:
    """TF32 off while checking on CUDA: both formats would round to TF32 differently (~1e-3) and hide nothing
    but a real error, while making the comparison useless."""
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, allow_tf32=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def _choose_checked(model: nn.Module, input_shape: Sequence[int], device: torch.device, requested: str,
                    what: str, batch: int) -> FormatChoice:
    bad = [(s, d) for s, d in check_layers(conv_shapes(model, input_shape, device, batch), device) if not d <= RTOL]
    if bad:
        shape, diff = max(bad, key=lambda t: t[1])
        reason = (f"channels_last is wrong for {shape.describe()} on {device.type} ({_torch_build()}; "
                  f"relative error {diff:.3g}{f'; {len(bad)} layer shapes affected' if len(bad) > 1 else ''})")
    else:
        diff, where = model_gradient_diff(model, input_shape, device, batch)
        if diff <= RTOL:
            return FormatChoice("channels_last", requested)
        reason = (f"channels_last changes the {where} by {diff:.3g} relative (whole model, batch {batch}, "
                  f"{device.type}, {_torch_build()}){_wrong_at(model, input_shape, device, batch)}")
    _announce(f"{what}: using contiguous memory format: {reason}")
    return FormatChoice("contiguous", requested, reason)


def _child_main() -> None:
    """``python -m robbench.memformat``: probe the ConvShapes given as JSON on stdin; print the relative
    differences as one JSON line."""
    torch.set_num_threads(1)
    shapes = [ConvShape.from_json(d) for d in json.loads(sys.stdin.read())]
    print(json.dumps([probe_conv(s, torch.device("cpu")) for s in shapes]))


if __name__ == "__main__":
    _child_main()
