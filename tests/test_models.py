"""Architectures, feature taps, layers and ensembles (robbench.models)."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dverge_reference import RefResNet20, ref_state_as_ours  # tests/dverge_reference.py

from robbench.config import DataSpec, ModelSpec, ZooEntry
from robbench.data.info import CIFAR_MEAN, DVERGE_STD, INFOS
from robbench.errors import ConfigError
from robbench.models import (
    Ensemble,
    FeatureTap,
    MixtureBN,
    bn_route,
    build_model,
    build_network,
    combine_logits,
    count_parameters,
    feature_layers,
    get_features,
    grad_scale,
    set_bn_route,
)
from robbench.models.layers import group_count
from robbench.models.resnet import (
    BasicBlock,
    Bottleneck,
    DeepResNetOptions,
    ImageNetResNetOptions,
    deep_resnet_blocks,
    resnet_depth,
)
from robbench.registry import ARCHITECTURES, MODEL_TRANSFORMS

DIGITS = INFOS["digits"]    # 1x8x8, 10 classes
CIFAR = INFOS["cifar10"]    # 3x32x32
SYNTH = INFOS["synthetic"]  # 3x8x8

# Small but complete configurations for the expensive nets: the shape tests still run every arch.
SMALL = {
    "resnet50": ({"width": 0.125}, ImageNetResNetOptions()),
    "resnet101": ({"width": 0.125}, ImageNetResNetOptions()),
    "resnet152": ({"width": 0.125}, ImageNetResNetOptions()),
    "resnet_imagenet": ({"width": 0.125}, DeepResNetOptions(depth=50)),
    "resnet18": ({"width": 0.25}, None),
    "vgg16": ({"width": 0.25}, None),
    "resnet56": ({"width": 0.5}, None),
}
EXPECTED_TAPS = {"resnet20": 20, "resnet32": 32, "resnet56": 56, "resnet_cifar": 20, "resnet18": 18,
                 "vgg16": 14, "resnet50": 18, "resnet101": 35, "resnet152": 52, "resnet_imagenet": 18}


def _spec(arch: str, **kw) -> ModelSpec:
    return ModelSpec(arch=arch, **kw)


def _small(arch: str, info=CIFAR, **extra) -> nn.Module:
    kw, opts = SMALL.get(arch, ({}, None))
    return build_network(_spec(arch, **{**kw, **extra}), info, opts)


# ----------------------------------------------------------------------------------------------
# Shapes, taps, counts for every architecture
# ----------------------------------------------------------------------------------------------

# Architectures built from other trained runs (no taps of their own), tested in their own files.
COMPOSITE = {"eed_team": "tests/test_eed_team.py"}


def test_every_registered_arch_is_covered():
    assert set(ARCHITECTURES.names()) == set(EXPECTED_TAPS) | set(COMPOSITE)
    assert all((Path(__file__).parent.parent / f).is_file() for f in COMPOSITE.values())


@pytest.mark.parametrize("arch", sorted(EXPECTED_TAPS))
def test_output_shapes_and_taps_on_digits_and_cifar(arch):
    torch.manual_seed(0)
    for info in (DIGITS, CIFAR):
        net = _small(arch, info).eval()
        x = torch.rand(2, info.in_channels, info.image_size, info.image_size)
        out = net(x)
        assert out.shape == (2, info.num_classes)
        assert torch.isfinite(out).all()
        names = feature_layers(net)
        assert len(names) == EXPECTED_TAPS[arch]
        # the taps fire in the order feature_layers lists them, each exactly once
        fired: list[str] = []
        handles = [net.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: fired.append(n)) for n in names]
        net(x)
        for h in handles:
            h.remove()
        assert fired == names
        # last tap = logits
        assert torch.equal(get_features(net, x, len(names)), out)


def test_resnet20_parameter_count():
    net = build_network(_spec("resnet20"), CIFAR)
    assert count_parameters(net) == 272_474  # notes §3: 1x1-conv projection shortcuts
    # width multiplier scales channels; 1 input channel for digits changes only the stem conv
    assert count_parameters(build_network(_spec("resnet20"), DIGITS)) == 272_474 - 2 * 16 * 9
    assert count_parameters(build_network(_spec("resnet20", width=0.5), CIFAR)) < 272_474 / 3


def test_resnet20_tap_shapes():
    net = build_network(_spec("resnet20"), CIFAR).eval()
    x = torch.rand(2, 3, 32, 32)
    shapes = [tuple(get_features(net, x, layer).shape) for layer in range(1, 21)]
    assert shapes == [(2, 16, 32, 32)] * 7 + [(2, 32, 16, 16)] * 6 + [(2, 64, 8, 8)] * 6 + [(2, 10)]


# ----------------------------------------------------------------------------------------------
# ResNet-20 against DVERGE's models/resnet.py as written (tests/dverge_reference.py)
# ----------------------------------------------------------------------------------------------

def test_resnet20_matches_dverge_reference():
    torch.manual_seed(123)
    ref = RefResNet20()
    torch.manual_seed(123)
    net = build_network(_spec("resnet20", normalization="none"), CIFAR)
    ours = net.state_dict()
    theirs = ref_state_as_ours(ref)
    assert set(ours) == set(theirs)
    for k in ours:  # same seed -> identical initial weights (same RNG consumption order)
        assert torch.equal(ours[k], theirs[k]), k
    x = torch.rand(4, 3, 32, 32)
    for mode in ("eval", "train"):
        getattr(ref, mode)()
        getattr(net, mode)()
        assert torch.equal(net(x), ref(x))  # to the bit: same ops, same pooling (AvgPool2d(8))
        for layer in range(1, 21):
            for before in (True, False):
                a = get_features(net, x, layer, before_relu=before)
                b = ref.get_features(x.clone(), layer, before)
                assert a.shape == b.shape and torch.equal(a, b), (mode, layer, before)


def test_dverge_normalization_layer():
    net = build_network(_spec("resnet20", normalization="dverge"), CIFAR)
    assert torch.allclose(net.normalize.mean.flatten(), torch.tensor(CIFAR_MEAN))
    assert torch.allclose(net.normalize.std.flatten(), torch.tensor(DVERGE_STD))
    x = torch.rand(2, 3, 32, 32)
    bare = build_network(_spec("resnet20", normalization="none"), CIFAR)
    bare.load_state_dict({k: v for k, v in net.state_dict().items() if not k.startswith("normalize.")})
    net.eval(), bare.eval()
    xn = (x - torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)) / torch.tensor(DVERGE_STD).view(1, 3, 1, 1)
    assert torch.allclose(net(x), bare(xn), atol=1e-5)
    digits = build_network(_spec("resnet20"), DIGITS)
    assert torch.allclose(digits.normalize.mean.flatten(), torch.tensor(DIGITS.mean))


@pytest.mark.parametrize("bad,info,allowed", [("zscore", CIFAR, "'dataset'"), ("dverge", DIGITS, "'none'")])
def test_bad_normalization_is_config_error(bad, info, allowed):
    with pytest.raises(ConfigError, match="model.normalization") as e:
        build_network(_spec("resnet20", normalization=bad), info)
    assert allowed in str(e.value)


def test_unknown_arch_is_config_error():
    with pytest.raises(ConfigError, match="model.arch"):
        build_network(_spec("resnet21"), CIFAR)


# ----------------------------------------------------------------------------------------------
# get_features: early stop, train mode, before/after activation
# ----------------------------------------------------------------------------------------------

def test_get_features_stops_early_and_works_in_train_mode():
    torch.manual_seed(0)
    net = build_network(_spec("resnet20", width=0.5), SYNTH).train()
    later = []
    net.fc.register_forward_hook(lambda *a: later.append("fc"))
    net.layer3.register_forward_hook(lambda *a: later.append("layer3"))
    stem_before = net.bn1.running_mean.clone()
    l3_before = net.layer3[0].bn1.running_mean.clone()
    f = get_features(net, torch.rand(8, 3, 8, 8), 5)
    assert later == []                                   # nothing after tap 5 ran
    assert not torch.equal(net.bn1.running_mean, stem_before)   # train-mode BN before the tap moved
    assert torch.equal(net.layer3[0].bn1.running_mean, l3_before)  # BN after it did not
    assert f.requires_grad
    assert not any(m._forward_hooks for m in net.modules() if isinstance(m, FeatureTap))  # hook removed
    with pytest.raises(ConfigError, match="allowed: 1..20"):
        get_features(net, torch.rand(1, 3, 8, 8), 21)


@pytest.mark.parametrize("activation", ["relu", "leaky_relu"])
def test_before_and_after_relu(activation):
    torch.manual_seed(0)
    net = build_network(_spec("resnet20", width=0.5, activation=activation, leaky_slope=0.1), SYNTH).eval()
    x = torch.rand(4, 3, 8, 8)
    act = F.relu if activation == "relu" else (lambda t: F.leaky_relu(t, 0.1))
    for layer in (2, 3, 19):
        before = get_features(net, x, layer, before_relu=True)
        after = get_features(net, x, layer, before_relu=False)
        assert (before < 0).any()
        assert torch.allclose(after, act(before))
    # stem (layer 1) is always pre-activation, logits have none
    assert torch.equal(get_features(net, x, 1, before_relu=False), get_features(net, x, 1))
    assert torch.equal(get_features(net, x, 20, before_relu=False), net(x))
    kinds = {type(m) for m in net.modules()}
    assert (nn.LeakyReLU in kinds) == (activation == "leaky_relu")
    assert (nn.ReLU in kinds) == (activation == "relu")


def test_vgg16_digits_skips_pools_and_has_14_feature_layers():
    net = build_network(_spec("vgg16", width=0.25), DIGITS).eval()
    x = torch.rand(2, 1, 8, 8)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 13
    assert get_features(net, x, 13).shape[-2:] == (1, 1)   # pools 4 and 5 skipped at 1x1
    assert get_features(net, x, 2).shape[-2:] == (8, 8)
    assert get_features(net, x, 3).shape[-2:] == (4, 4)
    cifar = build_network(_spec("vgg16", width=0.25), CIFAR).eval()
    assert get_features(cifar, torch.rand(2, 3, 32, 32), 13).shape[-2:] == (2, 2)  # before the 5th pool


# ----------------------------------------------------------------------------------------------
# ImageNet ResNets
# ----------------------------------------------------------------------------------------------

def test_xie_yuille_depths_without_running_them():
    assert deep_resnet_blocks(200) == [3, 24, 36, 3]
    assert deep_resnet_blocks(152) == [3, 8, 36, 3]
    for depth in (200, 338, 518, 638):
        blocks = deep_resnet_blocks(depth)
        assert resnet_depth(blocks) == depth and blocks[0] == blocks[3] == 3
    for depth in (200, 338, 638):
        with torch.device("meta"):  # structure only, no memory, no compute
            net = build_network(_spec("resnet_imagenet"), INFOS["imagenet"], DeepResNetOptions(depth=depth))
        main_convs = [n for n, m in net.named_modules() if isinstance(m, nn.Conv2d) and "shortcut" not in n]
        linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
        assert len(main_convs) + len(linears) == depth
        assert len(feature_layers(net)) == 1 + sum(deep_resnet_blocks(depth)) + 1
        assert net.sgm_bottleneck is True
    with pytest.raises(ConfigError, match="model.options.depth"):
        deep_resnet_blocks(201)


def test_resnet_imagenet_options_validate():
    from robbench.config import parse_dataclass
    o = parse_dataclass(DeepResNetOptions, {"depth": 14, "blocks": [1, 1, 1, 1]}, file="x.toml", prefix="model.options")
    assert o.resolved_blocks() == [1, 1, 1, 1]
    with pytest.raises(ConfigError, match="model.options.blocks"):
        parse_dataclass(DeepResNetOptions, {"depth": 50, "blocks": [1, 1, 1, 1]}, file="x.toml", prefix="model.options")
    with pytest.raises(ConfigError, match="model.options.depth"):
        parse_dataclass(DeepResNetOptions, {"depth": 300}, file="x.toml", prefix="model.options")


def test_resnet50_cifar_stem_keeps_32x32_maps_for_the_last_stage():
    """``stem = 'cifar'`` (HARP / kuangliu ResNet-50 on 32x32): one 3x3 stride-1 conv, no max-pool, so the
    last stage sees 4x4 maps (the 7x7/2 stem + max-pool leaves 1x1); every other layer is the same."""
    cifar = build_network(_spec("resnet50", width=0.0625), SYNTH, ImageNetResNetOptions(stem="cifar"))
    tv = build_network(_spec("resnet50", width=0.0625), SYNTH)
    assert cifar.conv1.kernel_size == (3, 3) and cifar.conv1.stride == (1, 1)
    assert not any(isinstance(m, nn.MaxPool2d) for m in cifar.modules())
    assert any(isinstance(m, nn.MaxPool2d) for m in tv.modules())
    seen: list[tuple[int, int]] = []
    cifar.layer4.register_forward_hook(lambda m, a, out: seen.append(tuple(out.shape[-2:])))
    assert cifar(torch.rand(2, 3, 32, 32)).shape == (2, 10) and seen == [(4, 4)]
    rest = lambda net: [(n, p.shape) for n, p in net.named_parameters() if not n.startswith("conv1.")]
    assert rest(cifar) == rest(tv)
    from robbench.config import load_entry  # EED Table 4's CIFAR-100 chain runs this layout, ImageNet's not
    assert load_entry("eed_resnet50_cifar100_ase_1").model.options["stem"] == "cifar"
    assert load_entry("eed_resnet50_cifar100_team").model.options["base_options"]["stem"] == "cifar"
    assert load_entry("eed_resnet50_imagenet_ase_1").model.options.get("stem", "imagenet") == "imagenet"


def test_tiny_deep_resnet_forward_and_zero_init():
    net = build_network(_spec("resnet_imagenet", width=0.0625), SYNTH, DeepResNetOptions(depth=14, blocks=[1, 1, 1, 1]))
    assert net(torch.rand(2, 3, 8, 8)).shape == (2, 10)
    blocks = net.residual_blocks()
    assert len(blocks) == 4 and all(isinstance(b, Bottleneck) for b in blocks)
    assert all(torch.count_nonzero(b.bn3.weight) == 0 for b in blocks)   # Xie code: zero-init last BN
    assert net.fc.weight.std() < 0.02
    tv = build_network(_spec("resnet50", width=0.0625), SYNTH)
    assert all(torch.all(b.bn3.weight == 1) for b in tv.residual_blocks())  # torchvision default


# ----------------------------------------------------------------------------------------------
# Layers: grad_scale, MixtureBN, GroupNorm
# ----------------------------------------------------------------------------------------------

def test_grad_scale_backward():
    x = torch.randn(5, requires_grad=True)
    y = grad_scale(x, 0.3)
    assert torch.equal(y, x)
    (y * torch.arange(5.0)).sum().backward()
    assert torch.allclose(x.grad, 0.3 * torch.arange(5.0))
    assert grad_scale(x, 1.0) is x


def test_sgm_gamma_changes_input_gradient_not_output():
    torch.manual_seed(0)
    net = build_network(_spec("resnet20", width=0.5), SYNTH).eval()
    x = torch.rand(2, 3, 8, 8, requires_grad=True)
    out1 = net(x)
    g1, = torch.autograd.grad(out1[:, 0].sum(), x)
    blocks = [m for m in net.modules() if isinstance(m, BasicBlock)]
    assert len(blocks) == 9 and all(b.sgm_gamma == 1.0 for b in blocks) and net.sgm_bottleneck is False
    for b in blocks:
        b.sgm_gamma = 0.2
    out2 = net(x)
    g2, = torch.autograd.grad(out2[:, 0].sum(), x)
    assert torch.equal(out1, out2)
    assert not torch.allclose(g1, g2)
    # gamma = 0 leaves only the skip path: the gradient of a block's output wrt its input is identity
    blk = blocks[1]
    blk.sgm_gamma = 0.0
    h = torch.rand(1, 8, 8, 8, requires_grad=True)
    z = blk.tap_out  # output before the final activation
    pre = []
    hd = z.register_forward_hook(lambda m, a, o: pre.append(o))
    blk(h)
    hd.remove()
    gh, = torch.autograd.grad(pre[0].sum(), h)
    assert torch.allclose(gh, torch.ones_like(h))


def test_mixture_bn_routing():
    torch.manual_seed(0)
    net = build_network(_spec("resnet20", width=0.5, norm_layer="mbn"), SYNTH).train()
    mbns = [m for m in net.modules() if isinstance(m, MixtureBN)]
    assert mbns and not any(type(m) is nn.BatchNorm2d and not _inside_mbn(net, m) for m in net.modules())
    assert all(m.route == "clean" for m in mbns)  # default route
    net(torch.rand(16, 3, 8, 8))
    stem = net.bn1
    assert not torch.equal(stem.bn_clean.running_mean, torch.zeros_like(stem.bn_clean.running_mean))
    assert torch.equal(stem.bn_adv.running_mean, torch.zeros_like(stem.bn_adv.running_mean))  # untouched
    assert set_bn_route(net, "adv") == len(mbns)
    net(torch.rand(16, 3, 8, 8) * 0.2 + 0.8)
    assert not torch.allclose(stem.bn_clean.running_mean, stem.bn_adv.running_mean)
    with bn_route(net, "clean"):
        assert all(m.route == "clean" for m in mbns)
    assert all(m.route == "adv" for m in mbns)
    net.eval()
    x = torch.rand(2, 3, 8, 8)
    out_adv = net(x)
    set_bn_route(net, "clean")
    assert not torch.allclose(out_adv, net(x))
    with pytest.raises(ValueError):
        set_bn_route(net, "mixed")
    # state dict holds both sets
    assert any(k.endswith("bn1.bn_adv.running_var") for k in net.state_dict())


def _inside_mbn(net: nn.Module, bn: nn.Module) -> bool:
    return any(bn is m.bn_clean or bn is m.bn_adv for m in net.modules() if isinstance(m, MixtureBN))


def test_group_norm_option():
    assert [group_count(c) for c in (64, 32, 48, 16, 4, 1)] == [32, 32, 24, 16, 4, 1]
    net = build_network(_spec("resnet20", norm_layer="gn"), CIFAR)
    gns = [m for m in net.modules() if isinstance(m, nn.GroupNorm)]
    assert gns and not any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    assert {(m.num_channels, m.num_groups) for m in gns} == {(16, 16), (32, 32), (64, 32)}
    assert net(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    vgg = build_network(_spec("vgg16", norm_layer="gn", width=0.25), DIGITS)
    assert vgg(torch.rand(2, 1, 8, 8)).shape == (2, 10)


# ----------------------------------------------------------------------------------------------
# Ensembles
# ----------------------------------------------------------------------------------------------

class _Fixed(nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.register_buffer("logits", torch.tensor(logits, dtype=torch.float32))

    def forward(self, x):
        return self.logits.expand(x.shape[0], -1) + 0 * x.flatten(1)[:, :1]


def test_combination_math_on_hand_made_logits():
    z = [[2.0, 0.0, -1.0], [0.0, 3.0, 0.0], [1.0, 1.0, 1.0]]
    x = torch.zeros(2, 1)
    ens = Ensemble([_Fixed(r) for r in z], combine="log_mean_softmax")
    p = sum(torch.softmax(torch.tensor(r), 0) for r in z) / 3
    assert torch.allclose(ens(x), p.log().expand(2, 3), atol=1e-6)
    assert ens.member_logits(x).shape == (3, 2, 3)
    assert ens.num_forward_passes == 3 and len(ens) == 3 and ens.member(1) is ens.members[1]
    ens.combine = "mean_logits"
    assert torch.allclose(ens(x)[0], torch.tensor([1.0, 4 / 3, 0.0]))
    ens.combine = "vote"  # argmaxes 0, 1, 0 (tie 1,1,1 -> lowest index)
    v = ens(x)[0]
    assert torch.allclose(v[:2].exp(), torch.tensor([2 / 3, 1 / 3]))
    assert v.argmax() == 0 and torch.isclose(v[2], torch.log(torch.tensor(1e-40)))
    # clamp: a probability that underflows stays finite at log(1e-40), as DVERGE models/ensemble.py
    out = combine_logits(torch.tensor([[[0.0, -300.0]], [[0.0, -300.0]]]), "log_mean_softmax")
    assert torch.isfinite(out).all() and torch.isclose(out[0, 1], torch.log(torch.tensor(1e-40)))
    # one member: raw logits, no log-softmax
    single = Ensemble([_Fixed(z[0])])
    assert torch.equal(single(x)[0], torch.tensor(z[0]))
    with pytest.raises(ValueError):
        Ensemble([_Fixed(z[0])], combine="median")


def _members(n: int, **kw) -> list[nn.Module]:
    torch.manual_seed(1)
    return [build_network(_spec("resnet20", width=0.5, **kw), SYNTH) for _ in range(n)]


def test_vmap_equals_loop():
    loop = Ensemble(_members(3), batched=False).eval()
    vm = Ensemble(_members(3), batched=True).eval()
    assert vm.can_vmap()
    x = torch.rand(6, 3, 8, 8, requires_grad=True)
    a, b = loop.member_logits(x), vm.member_logits(x)
    assert torch.allclose(a, b, atol=1e-5)
    ga, = torch.autograd.grad(loop(x).logsumexp(1).sum(), x)
    gb, = torch.autograd.grad(vm(x).logsumexp(1).sum(), x)
    assert torch.allclose(ga, gb, atol=1e-5)
    # parameter gradients flow through the stacked state
    vm(x).sum().backward()
    assert vm.members[2].fc.weight.grad is not None and vm.members[2].fc.weight.grad.abs().sum() > 0


def test_vmap_honours_settings_and_frozen_cache():
    members = _members(3, norm_layer="mbn")
    vm = Ensemble(members, batched=True).eval()
    loop = Ensemble(_members(3, norm_layer="mbn"), batched=False).eval()
    for e in (vm, loop):
        e.requires_grad_(False)
        set_bn_route(e, "adv")
        for m in e.modules():
            if isinstance(m, BasicBlock):
                m.sgm_gamma = 0.5
    x = torch.rand(4, 3, 8, 8, requires_grad=True)
    assert torch.allclose(vm(x), loop(x), atol=1e-5)
    g1, = torch.autograd.grad(vm(x).sum(), x)
    g2, = torch.autograd.grad(loop(x).sum(), x)
    assert torch.allclose(g1, g2, atol=1e-5)
    # the cached stack sees an in-place weight change
    with torch.no_grad():
        vm.members[1].fc.bias.add_(1.0)
        loop.members[1].fc.bias.add_(1.0)
    assert torch.allclose(vm.member_logits(x), loop.member_logits(x), atol=1e-5)
    # members that disagree in settings, or training mode, fall back to the loop (same numbers)
    vm.members[0].layer1[0].sgm_gamma = 0.9
    assert not vm.can_vmap()
    vm.members[0].layer1[0].sgm_gamma = 0.5
    vm.train()
    assert not vm.can_vmap()


def test_batched_none_uses_loop_on_cpu():
    ens = Ensemble(_members(2)).eval()
    calls = []
    ens.members[0].register_forward_hook(lambda *a: calls.append(1))
    ens(torch.rand(2, 3, 8, 8))
    assert calls == [1]  # member 0 ran as a module (the loop), not through functional_call


# ----------------------------------------------------------------------------------------------
# build_model
# ----------------------------------------------------------------------------------------------

def _entry(**model) -> ZooEntry:
    return ZooEntry(name="t", model=ModelSpec(**{"arch": "resnet20", "width": 0.25, **model}),
                    data=DataSpec(dataset="digits"), source="zoo/t.toml")


def test_build_model_members_seeded_and_distinct():
    torch.manual_seed(7)
    a = build_model(_entry(members=3), DIGITS)
    torch.manual_seed(7)
    b = build_model(_entry(members=3), DIGITS)
    assert isinstance(a, Ensemble) and a.num_members == 3 and a.combine == "log_mean_softmax"
    assert all(k.startswith("members.") for k in a.state_dict())
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k])
    w = [m.conv1.weight for m in a.members]
    assert not torch.equal(w[0], w[1]) and not torch.equal(w[1], w[2])
    one = build_model(_entry(members=1), DIGITS)
    assert isinstance(one, Ensemble) and one.num_members == 1


def test_build_model_applies_transform_per_member(monkeypatch):
    seen = []

    def wrap(net, options, **kw):  # keywords: info, rebuild (added for EIO's transform)
        seen.append((type(net).__name__, options, kw.get("info")))
        net.tagged = True
        return net

    monkeypatch.setitem(MODEL_TRANSFORMS._items, "tag_for_test", wrap)
    monkeypatch.setitem(MODEL_TRANSFORMS._params, "tag_for_test", None)
    ens = build_model(_entry(members=2, transform="tag_for_test", transform_options={"n": 2}), DIGITS)
    assert seen == [("ResNet", {"n": 2}, DIGITS)] * 2
    assert all(getattr(m, "tagged", False) for m in ens.members)
    with pytest.raises(ConfigError, match="model.transform"):
        build_model(_entry(transform="no_such_transform"), DIGITS)
