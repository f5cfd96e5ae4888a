"""Ensemble-in-One: RGN transform, path sampling, gradients, derivation, random-path deployment,
the training method (both phases, schedule, resume) and derive runs. Tiny nets on 8x8 inputs."""
from __future__ import annotations

import copy
import itertools
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from robbench.data.info import INFOS
from robbench.eio.rgn import RandomGatedNetwork, find_rgn, path_draw_accuracy, rgn_transform
from robbench.errors import ConfigError
from robbench.models.resnet import resnet_cifar
from robbench.models.vgg import vgg16

INFO = INFOS["digits"]
SPEC = SimpleNamespace(arch="resnet20", width=0.25, norm_layer="bn", activation="relu", leaky_slope=0.1,
                       normalization="dataset", options={})


def resnet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return resnet_cifar(20, SPEC, INFO)


def vgg(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return vgg16(SimpleNamespace(**{**vars(SPEC), "width": 0.0625}), INFO)


def x_batch(n: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def all_convs_once(net: nn.Module) -> int:
    return sum(1 for m in net.modules() if isinstance(m, nn.Conv2d))


# ------------------------------------------------------------------------------------------- transform
@pytest.mark.parametrize("make,shortcut,gates,layers", [(resnet, False, 19, 20), (resnet, True, 21, 20),
                                                        (vgg, False, 13, 14)])
def test_transform_keeps_function_when_paths_are_copies(make, shortcut, gates, layers):
    net = make()
    ref = copy.deepcopy(net).eval()
    rgn = rgn_transform(net, {"path_init": "copy", "include_shortcut": shortcut, "gate_mode": "fixed"})
    rgn.eval()
    assert rgn.num_gates == gates and rgn.max_layer == layers
    x = x_batch()
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        rgn.set_path(rgn.sample_path(gen))
        torch.testing.assert_close(rgn(x), ref(x), rtol=0, atol=0)


def test_reinit_paths_differ_and_share_conv_stores_one_conv():
    net = resnet()
    plain = sum(p.numel() for p in net.parameters())
    conv_params = sum(m.weight.numel() for m in net.modules() if isinstance(m, nn.Conv2d)
                      and "shortcut" not in str(m))
    rgn = rgn_transform(copy.deepcopy(net), {"gate_mode": "fixed"}).eval()
    x = x_batch()
    rgn.set_path([0] * rgn.num_gates)
    a = rgn(x)
    rgn.set_path([1] * rgn.num_gates)
    assert not torch.allclose(a, rgn(x))  # independent weights (paper §3.2)
    shared = rgn_transform(copy.deepcopy(net), {"share_conv": True})
    blk = shared.blocks[3]
    assert len(blk.convs) == 1 and len(blk.norms) == 2  # released augment_op.py: shared conv, BN per path
    n_shared = sum(p.numel() for p in shared.parameters())
    n_indep = sum(p.numel() for p in rgn.parameters())
    assert n_shared < n_indep and n_indep - plain > conv_params * 0.9


def test_topk_layers_bound_distillation_layer():
    rgn = rgn_transform(resnet(), {"layers": "top7"})
    assert rgn.num_gates == 7 and rgn.max_layer == 7
    assert rgn.layer_gates[:7] == [1, 2, 3, 4, 5, 6, 7]
    with pytest.raises(ConfigError, match="out of range"):
        rgn.gates_for_layer(8)
    with pytest.raises(ConfigError, match="top1..top19"):
        rgn_transform(resnet(), {"layers": "top21"})
    with pytest.raises(ConfigError, match="layers"):
        rgn_transform(resnet(), {"layers": "first7"})
    assert rgn_transform(resnet(), {"layers": "top21", "include_shortcut": True}).max_layer == 20


def test_path_sampling_respects_top_l_constraint():
    rgn = rgn_transform(resnet(), {})
    gen = torch.Generator().manual_seed(0)
    for layer in [1, 2, 3, 5, 12, 20]:
        k = rgn.gates_for_layer(layer)
        for _ in range(20):
            paths = rgn.sample_paths(3, layer, gen)
            assert len(paths) == min(3, 2 ** k)
            for a, b in itertools.combinations(paths, 2):
                assert a[:k] != b[:k]
    # layer 1 feeds on one binary gate: only 2 paths can differ there (p_cur = min(p, n**l))
    assert len(rgn.sample_paths(3, 1, gen)) == 2
    seeded = [rgn.sample_paths(3, 9, torch.Generator().manual_seed(5)) for _ in range(2)]
    assert seeded[0] == seeded[1]
    with pytest.raises(ConfigError, match="path"):
        rgn.set_path([0, 1])


def test_only_the_active_path_gets_gradients_and_bn_updates():
    rgn = rgn_transform(resnet(), {}).train()
    path = tuple(i % 2 for i in range(rgn.num_gates))
    rgn.set_path(path)
    before = {k: v.clone() for k, v in rgn.state_dict().items() if "running_mean" in k}
    nn.functional.cross_entropy(rgn(x_batch()), torch.arange(6) % 10).backward()
    for blk, g in zip(rgn.blocks, path):
        for k in range(rgn.n):
            grads = [p.grad for p in (*blk.convs[k].parameters(), *blk.norms[k].parameters())]
            if k == g:
                assert all(gr is not None and gr.abs().sum() > 0 for gr in grads)
            else:
                assert all(gr is None for gr in grads)
    after = rgn.state_dict()
    for blk, g, name in zip(rgn.blocks, path, rgn.block_names):
        for k in range(rgn.n):
            key = f"net.{name}.norms.{k}.running_mean"
            moved = not torch.equal(before[key], after[key])
            assert moved == (k == g)


@pytest.mark.parametrize("share_conv,shortcut,make", [(False, True, resnet), (True, False, resnet),
                                                       (False, False, vgg)])
def test_derived_state_dict_equals_rgn_on_that_path(share_conv, shortcut, make):
    rgn = rgn_transform(make(), {"share_conv": share_conv, "include_shortcut": shortcut}).train()
    # move every path's BN statistics and weights away from their init
    gen = torch.Generator().manual_seed(3)
    opt = torch.optim.SGD(rgn.parameters(), lr=0.05)
    for _ in range(4):
        rgn.set_path(rgn.sample_path(gen))
        opt.zero_grad()
        nn.functional.cross_entropy(rgn(x_batch(8, 2)), torch.arange(8) % 10).backward()
        opt.step()
    rgn.eval()
    path = rgn.sample_path(gen)
    plain = make(seed=9).eval()
    plain.load_state_dict(rgn.derive_state_dict(path), strict=True)
    rgn.set_path(path)
    x = x_batch()
    torch.testing.assert_close(plain(x), rgn(x), rtol=0, atol=0)


def test_random_path_deployment_varies_and_is_seeded():
    rgn = rgn_transform(resnet(), {})  # default gate_mode: per_input
    assert rgn.randomized
    rgn.eval()
    x = x_batch(16)
    torch.manual_seed(0)
    a = rgn(x)
    b = rgn(x)
    assert not torch.allclose(a, b)          # a new path per input on every call
    torch.manual_seed(0)
    torch.testing.assert_close(rgn(x), a)    # global RNG seeded -> same draws
    rgn.reseed(4)
    c = rgn(x)
    rgn.reseed(4)
    torch.testing.assert_close(rgn(x), c)    # private generator seeded -> same draws
    # per input: sample i's output equals the fixed path it drew
    gates = torch.randint(2, (16, rgn.num_gates), generator=torch.Generator().manual_seed(4))
    for i in (0, 7):
        rgn.set_path(gates[i].tolist())
        torch.testing.assert_close(rgn(x[i:i + 1]), c[i:i + 1], rtol=1e-5, atol=1e-6)
    assert not rgn.randomized
    rgn.set_gate_mode("per_forward")
    assert rgn.randomized
    y = torch.arange(16) % 10
    r1 = path_draw_accuracy(rgn, x, y, draws=4, seed=1)
    r2 = path_draw_accuracy(rgn, x, y, draws=4, seed=1)
    assert r1 == r2 and len(r1["per_draw"]) == 4 and rgn.gate_mode == "per_forward"
    assert isinstance(find_rgn(nn.Sequential(rgn)), RandomGatedNetwork)
