"""Random gated networks (Ensemble-in-One, Cai et al.): every conv(+norm) of a network becomes a random
gated block (RGB) of n candidate paths, exactly one open per forward.

- A *path* is a tuple of gate indices, one per RGB, in the order the forward pass reaches the blocks
  (the released code's ``modules()`` order: stem = gate 1, then ``layer1.0.conv1``, ...), so "the top-l
  gates" are the prefix of the path that feeds feature layer l.
- Only the open candidate runs: activation memory is one path's, and a path's BatchNorm running
  statistics move only while it is open.
- ``share_conv`` picks between the paper text (preprint §3.2 / ICLR §3.2: "repeated sub-layers are with
  different weight parameters": independent convs) and the released code (cai-y13/Ensemble-in-One
  ``augment_op.py``: all n candidates hold the *same* conv object, only the BatchNorms differ). Default:
  the paper. A shared conv is stored once (no aliased tensors in the state dict).
- Deployment as a randomized model (preprint §3.4 "the gates throughout the network will be randomly
  selected to process an input"): ``gate_mode`` 'per_input' (a new path for every sample) or
  'per_forward' (one path per call); 'fixed' uses the path set with :meth:`RandomGatedNetwork.set_path`.
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence

import torch
from torch import nn

from robbench.config import opt, parse_dataclass
from robbench.errors import ConfigError
from robbench.models.features import FeatureTap, feature_layers
from robbench.models.layers import MixtureBN

GateMode = Literal["fixed", "per_forward", "per_input"]
Path = tuple[int, ...]

_NORM_TYPES: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, MixtureBN)
_SHORTCUT_WORDS = ("shortcut", "downsample")


@dataclass
class RGNOptions:
    augment_factor: int = opt(2, min=1, max=64,
                              help="n candidate paths per RGB (preprint/ICLR §4.1: n = 2; Table 2 / Fig. 3: 3)")
    layers: str = opt("all", help="'all' or 'topK': augment only the first K gates in forward order "
                                  "(preprint Tables 3-4: top7, top14, top21)")
    include_shortcut: bool = opt(
        False, help="augment the 1x1 shortcut convs too: 21 RGBs for ResNet-20 (preprint §4.1, Tables 3-4 "
                    "'top21') instead of 19 (ICLR §4.1 and the released resnet.py)")
    share_conv: bool = opt(
        False, help="true = one conv per RGB and a BatchNorm per path (released augment_op.py and its "
                    "checkpoint); false = independent conv weights per path (paper text §3.2)")
    # Paper §3.2: "each RGB simply repeats the original layer by n times" and the repeated sub-layers
    # have "different weight parameters": separate copies, identical at init (the released code's
    # shared conv is identical too, and its fresh BNs are). 'reinit' (paths initialised like new
    # networks) is an option; on the digits demo it pre-trains far slower (26% vs 91% test accuracy
    # after 10 epochs), since every layer must then accept n unrelated feature sets from the previous one.
    path_init: Literal["copy", "reinit"] = opt(
        "copy", help="independent paths: 'copy' repeats the original layer n times (separate parameters, "
                     "identical at init: paper §3.2); 'reinit' initialises each extra path like a freshly "
                     "built network")
    gate_mode: Literal["per_input", "per_forward", "fixed"] = opt(
        "per_input", help="how a loaded RGN picks paths when evaluated as a whole (random-path deployment, "
                          "§3.4): a new path per input, per forward call, or the fixed path (default path 0)")

    def validate(self, file: str) -> None:
        if self.layers != "all" and not re.fullmatch(r"top[1-9][0-9]*", self.layers):
            raise ConfigError(f"got {self.layers!r}; allowed: 'all' or 'topK' (e.g. 'top7')", file=file,
                              field="model.transform_options.layers")

    @property
    def top_k(self) -> int | None:
        return None if self.layers == "all" else int(self.layers[3:])


def parse_rgn_options(options: RGNOptions | dict[str, Any] | None, file: str = "model.transform_options") -> RGNOptions:
    if isinstance(options, RGNOptions):
        return options
    return parse_dataclass(RGNOptions, dict(options or {}), file=file, prefix="model.transform_options")


class RandomGatedBlock(nn.Module):
    """n candidate (conv, norm) paths; ``active`` (an int, or a per-sample LongTensor) picks which run.

    ``conv_name`` / ``norm_name`` are where the conv and its norm lived in the plain network, so a path
    can be exported back to the plain architecture's state dict (:meth:`RandomGatedNetwork.derive_state_dict`).
    """

    def __init__(self, conv: nn.Conv2d, norm: nn.Module | None, n: int, *, share_conv: bool,
                 path_init: str, conv_name: str, norm_name: str | None,
                 fresh: list[tuple[nn.Module, nn.Module | None]] | None = None) -> None:
        super().__init__()
        self.n = n
        self.share_conv = share_conv
        self.conv_name = conv_name
        self.norm_name = norm_name
        convs = [conv] if share_conv else [conv] + [copy.deepcopy(conv) for _ in range(n - 1)]
        norms = [] if norm is None else [norm] + [copy.deepcopy(norm) for _ in range(n - 1)]
        if path_init == "reinit":
            if fresh is not None:  # the same layers of freshly built networks: the architecture's own init
                if not share_conv:
                    convs[1:] = [c for c, _ in fresh]
                if norms:
                    norms[1:] = [m for _, m in fresh]  # type: ignore[misc]
            else:
                for c in convs[1:]:
                    _reinit_conv(c)  # type: ignore[arg-type]
                for m in norms[1:]:
                    _reset_norm(m)
        self.convs = nn.ModuleList(convs)
        self.norms = nn.ModuleList(norms)
        self.active: int | torch.Tensor = 0

    def conv_of(self, k: int) -> nn.Conv2d:
        return self.convs[0 if self.share_conv else k]  # type: ignore[return-value]

    def candidate(self, k: int, x: torch.Tensor) -> torch.Tensor:
        y = self.conv_of(k)(x)
        return self.norms[k](y) if len(self.norms) else y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.active
        if isinstance(a, int):
            return self.candidate(a, x)
        # Per-sample gates: each candidate runs on its own samples only (total work = one path); meant
        # for eval mode, where a BatchNorm's output does not depend on the rest of the batch.
        out: torch.Tensor | None = None
        for k in range(self.n):
            idx = (a == k).nonzero(as_tuple=True)[0]
            if idx.numel() == 0:
                continue
            y = self.candidate(k, x.index_select(0, idx))
            if out is None:
                out = y.new_zeros((x.shape[0], *y.shape[1:]))
            out = out.index_copy(0, idx, y)
        assert out is not None
        return out

    def extra_repr(self) -> str:
        return f"n={self.n}, share_conv={self.share_conv}, conv={self.conv_name!r}, norm={self.norm_name!r}"


def _reinit_conv(conv: nn.Conv2d) -> None:
    # ResNet-20 / VGG init of DVERGE models/resnet.py and EIO resnet.py: normal(0, sqrt(2/(k*k*out))).
    fan = conv.kernel_size[0] * conv.kernel_size[1] * conv.out_channels
    nn.init.normal_(conv.weight, 0.0, (2.0 / fan) ** 0.5)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


def _reset_norm(m: nn.Module) -> None:
    for sub in m.modules():
        if isinstance(sub, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm)):
            sub.reset_parameters()


# ------------------------------------------------------------------------------------------ tracing
@dataclass
class _Trace:
    convs: list[str]                    # conv module names in execution order
    norm_of: dict[str, str | None]      # conv name -> name of the norm that consumes its output directly
    taps_after: dict[str, list[str]]    # tap name -> convs executed before the tap fired


def _probe_input(net: nn.Module, image_size: int | None, in_channels: int | None) -> list[torch.Tensor]:
    first = next((m for m in net.modules() if isinstance(m, nn.Conv2d)), None)
    if first is None:
        raise ConfigError("the random gated network transform needs a network with convolutions",
                          field="model.transform")
    c = in_channels or first.in_channels
    p = next(net.parameters())
    sizes = [image_size] if image_size else [32, 8, 64, 224]
    return [torch.rand(2, c, s, s, device=p.device, dtype=p.dtype) for s in sizes]


def _trace(net: nn.Module, image_size: int | None = None, in_channels: int | None = None) -> _Trace:
    """Run one forward with hooks: which convs run in which order, which norm eats each conv's output,
    which convs precede each feature tap."""
    names = {m: n for n, m in net.named_modules()}
    order: list[str] = []
    calls: dict[str, int] = {}
    outputs: dict[int, tuple[str, torch.Tensor]] = {}  # keeps outputs alive so ids are not reused
    norm_of: dict[str, str | None] = {}
    taps_after: dict[str, list[str]] = {}
    handles = []

    def conv_hook(m: nn.Module, args: tuple, out: torch.Tensor) -> None:
        name = names[m]
        calls[name] = calls.get(name, 0) + 1
        order.append(name)
        norm_of.setdefault(name, None)
        outputs[id(out)] = (name, out)

    def norm_pre(m: nn.Module, args: tuple) -> None:
        hit = outputs.get(id(args[0]))
        if hit is not None and norm_of.get(hit[0]) is None:
            norm_of[hit[0]] = names[m]

    def tap_hook(m: nn.Module, args: tuple, out: torch.Tensor) -> None:
        taps_after.setdefault(names[m], list(order))

    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, _NORM_TYPES):
            handles.append(m.register_forward_pre_hook(norm_pre))
        elif isinstance(m, FeatureTap):
            handles.append(m.register_forward_hook(tap_hook))
    was_training = net.training
    net.eval()
    err: Exception | None = None
    try:
        for x in _probe_input(net, image_size, in_channels):
            order.clear(); calls.clear(); outputs.clear(); norm_of.clear(); taps_after.clear()
            try:
                with torch.no_grad():
                    net(x)
                err = None
                break
            except RuntimeError as e:  # wrong probe size for this architecture: try the next one
                err = e
    finally:
        for h in handles:
            h.remove()
        net.train(was_training)
    if err is not None:
        raise ConfigError(f"could not run the network to find its layers ({err})", field="model.transform")
    shared = [n for n, c in calls.items() if c > 1]
    if shared:
        raise ConfigError(f"conv {shared[0]!r} runs {calls[shared[0]]} times per forward; a random gated block "
                          "needs each conv to run once", field="model.transform")
    return _Trace(order, norm_of, taps_after)


def _is_shortcut(name: str) -> bool:
    """Shortcut (projection) convs are named like it in every supported architecture (DVERGE/EIO
    resnet.py ``shortcut``, torchvision ``downsample``)."""
    return any(w in part for part in name.split(".") for w in _SHORTCUT_WORDS)


# --------------------------------------------------------------------------------------- the network
class RandomGatedNetwork(nn.Module):
    """A network whose gated convs are :class:`RandomGatedBlock` s; wraps the transformed net as ``net``.

    ``randomized`` is True unless ``gate_mode == 'fixed'``: evaluation then uses EOT (DESIGN.md).
    ``layer_gates[l-1]`` is how many gates feed feature layer l (the top-l constraint of Alg. 1 line 13
    compares these prefixes); ``max_layer`` bounds the distillation layer (all taps; preprint A.3: with
    only the top k layers augmented, l is drawn from [1, k]).
    """

    def __init__(self, net: nn.Module, blocks: list[str], layer_gates: list[int], max_layer: int,
                 options: RGNOptions) -> None:
        super().__init__()
        self.net = net
        self.block_names = list(blocks)
        self.layer_gates = list(layer_gates)
        self.max_layer = max_layer
        self.options = options
        self.n = options.augment_factor
        self.gate_mode: GateMode = options.gate_mode
        self.generator: torch.Generator | None = None  # None: the global torch RNG (seeded by evaluators)
        self._path: Path = tuple(0 for _ in blocks)
        self.set_path(self._path, mode=self.gate_mode)

    # ---- gates
    @property
    def blocks(self) -> list[RandomGatedBlock]:
        return [self.net.get_submodule(n) for n in self.block_names]  # type: ignore[misc]

    @property
    def num_gates(self) -> int:
        return len(self.block_names)

    @property
    def randomized(self) -> bool:
        return self.gate_mode != "fixed"

    @property
    def path(self) -> Path:
        return self._path

    def check_path(self, path: Sequence[int]) -> Path:
        p = tuple(int(g) for g in path)
        if len(p) != self.num_gates or any(not 0 <= g < self.n for g in p):
            raise ConfigError(f"path {','.join(map(str, p))} is not valid; allowed: {self.num_gates} gate indices "
                              f"in 0..{self.n - 1}", field="path")
        return p

    def set_path(self, path: Sequence[int], mode: GateMode = "fixed") -> None:
        """Open ``path`` in every block; ``mode`` 'fixed' keeps it until the next call."""
        p = self.check_path(path)
        for b, g in zip(self.blocks, p):
            b.active = g
        self._path = p
        self.gate_mode = mode

    def set_gate_mode(self, mode: GateMode, generator: torch.Generator | None = None) -> None:
        self.gate_mode = mode
        self.generator = generator
        if mode == "fixed":
            self.set_path(self._path)

    def reseed(self, seed: int) -> None:
        """Draw deployment paths from a private generator seeded with ``seed``."""
        self.generator = torch.Generator().manual_seed(int(seed))

    def sample_path(self, generator: torch.Generator | None = None) -> Path:
        """Every gate uniform over its n candidates (Eq. 1; released code: multinomial on zeroed logits)."""
        g = torch.randint(self.n, (self.num_gates,), generator=generator or self.generator)
        return tuple(int(v) for v in g)

    def sample_paths(self, count: int, layer: int, generator: torch.Generator | None = None) -> list[Path]:
        """``min(count, n**k)`` paths that pairwise differ within the first k = ``layer_gates[layer-1]``
        gates (Alg. 1 line 13), by rejection as in the released ``rgn_manager.py``."""
        k = self.gates_for_layer(layer)
        target = min(count, self.n ** k)
        paths: list[Path] = []
        seen: set[Path] = set()
        while len(paths) < target:
            p = self.sample_path(generator)
            if p[:k] in seen:
                continue
            seen.add(p[:k])
            paths.append(p)
        return paths

    def gates_for_layer(self, layer: int) -> int:
        if not 1 <= layer <= self.max_layer:
            raise ConfigError(f"distillation layer {layer} is out of range; allowed: 1..{self.max_layer}",
                              field="layer")
        return self.layer_gates[layer - 1]

    # ---- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_mode == "per_forward":
            self._open(self.sample_path())
        elif self.gate_mode == "per_input":
            gates = torch.randint(self.n, (x.shape[0], self.num_gates), generator=self.generator)
            gates = gates.to(x.device)
            for i, b in enumerate(self.blocks):
                b.active = gates[:, i]
        try:
            return self.net(x)
        finally:
            if self.gate_mode == "per_input":
                self._open(self._path)

    def _open(self, path: Path) -> None:
        for b, g in zip(self.blocks, path):
            b.active = g

    # ---- derivation
    def derive_state_dict(self, path: Sequence[int]) -> dict[str, torch.Tensor]:
        """The plain network's state dict (original module names) for one path (§3.4: "sampling a
        path and eliminating the other redundant modules")."""
        p = self.check_path(path)
        prefixes = tuple(n + "." for n in self.block_names)
        out = {k: v.detach().clone() for k, v in self.net.state_dict().items() if not k.startswith(prefixes)}
        for b, g in zip(self.blocks, p):
            for k, v in b.conv_of(g).state_dict().items():
                out[f"{b.conv_name}.{k}"] = v.detach().clone()
            if b.norm_name is not None:
                for k, v in b.norms[g].state_dict().items():
                    out[f"{b.norm_name}.{k}"] = v.detach().clone()
        return out

    def extra_repr(self) -> str:
        return (f"gates={self.num_gates}, n={self.n}, max_layer={self.max_layer}, share_conv={self.options.share_conv}, "
                f"gate_mode={self.gate_mode!r}")


def rgn_transform(net: nn.Module, options: RGNOptions | dict[str, Any] | None = None, *,
                  info: Any = None, rebuild: Callable[[], nn.Module] | None = None, **_: Any) -> RandomGatedNetwork:
    """Turn ``net`` (one member, normalization included) into a :class:`RandomGatedNetwork` in place.

    Every conv (optionally without the shortcut convs) with the norm layer that consumes its output
    becomes an RGB; with ``layers='topK'`` only the first K in forward order. ``info`` (a DatasetInfo)
    gives the probe input size; without it common sizes are tried. ``rebuild`` (a factory of the same
    plain network) lets ``path_init='reinit'`` take the extra paths from freshly built networks, i.e.
    the architecture's own init; without it they are drawn from the ResNet/VGG reference init
    normal(0, sqrt(2/(k*k*out))).
    """
    o = parse_rgn_options(options)
    trace = _trace(net, getattr(info, "image_size", None), getattr(info, "in_channels", None))
    candidates = [c for c in trace.convs
                  if o.include_shortcut or not _is_shortcut(c)]
    k = o.top_k
    if k is not None and k > len(candidates):
        raise ConfigError(f"{o.layers!r} asks for {k} gated layers but the network has {len(candidates)} "
                          f"(include_shortcut={str(o.include_shortcut).lower()}); allowed: top1..top{len(candidates)}",
                          field="model.transform_options.layers")
    gated = candidates if k is None else candidates[:k]
    gated_set = set(gated)
    # Feature layers in the architecture's tap order and how many gates feed each (the top-l prefix).
    taps = feature_layers(net)
    layer_gates = [sum(1 for c in trace.taps_after.get(t, []) if c in gated_set) for t in taps]
    # preprint A.3: "when only augmenting the top k layers ... l will be bounded within the range [1, k]"
    max_layer = len(taps) if k is None else min(k, len(taps))
    spares = ([rebuild() for _ in range(o.augment_factor - 1)]
              if rebuild is not None and o.path_init == "reinit" else None)
    for conv_name in gated:
        conv = net.get_submodule(conv_name)
        norm_name = trace.norm_of.get(conv_name)
        norm = net.get_submodule(norm_name) if norm_name else None
        fresh = None if spares is None else [
            (f.get_submodule(conv_name), f.get_submodule(norm_name) if norm_name else None) for f in spares]
        block = RandomGatedBlock(conv, norm, o.augment_factor, share_conv=o.share_conv, path_init=o.path_init,  # type: ignore[arg-type]
                                 conv_name=conv_name, norm_name=norm_name, fresh=fresh)
        _replace(net, conv_name, block)
        if norm_name:
            _replace(net, norm_name, nn.Identity())
    return RandomGatedNetwork(net, gated, layer_gates, max_layer, o)


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, new)


def find_rgn(model: nn.Module) -> RandomGatedNetwork:
    """The RGN inside ``model`` (an Ensemble member or the RGN itself)."""
    for m in model.modules():
        if isinstance(m, RandomGatedNetwork):
            return m
    raise ConfigError("this model has no random gated network; allowed: entries with model.transform = 'rgn'",
                      field="model.transform")



@torch.no_grad()
def path_draw_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, draws: int = 10, seed: int = 0,
                       mode: GateMode = "per_input", batch_size: int = 500) -> dict[str, Any]:
    """Clean accuracy of the random-path deployed RGN over ``draws`` independent path draws (§3.4:
    "the accuracy is unstable owing to the dynamic choice of inference path, where the fluctuation
    reaches 1-2 percentage"). Draw d uses a generator seeded with (seed, d); the model's gate mode and
    generator are restored afterwards. Returns mean, std (population) and the per-draw accuracies."""
    rgn = find_rgn(model)
    saved = (rgn.gate_mode, rgn.generator, rgn.path)
    was_training = model.training
    model.eval()
    accs: list[float] = []
    try:
        for d in range(draws):
            rgn.set_gate_mode(mode, torch.Generator().manual_seed(int(seed) * 1_000_003 + d))
            correct = 0
            for i in range(0, x.shape[0], batch_size):
                correct += int((model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum())
            accs.append(correct / max(1, x.shape[0]))
    finally:
        rgn.set_path(saved[2], mode=saved[0])
        rgn.generator = saved[1]
        model.train(was_training)
    t = torch.tensor(accs, dtype=torch.float64)
    return {"mean": float(t.mean()), "std": float(t.std(unbiased=False)), "per_draw": accs,
            "draws": draws, "mode": mode, "seed": seed}
