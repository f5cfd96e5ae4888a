"""Score-mask pruning framework: HYDRA top-k masks, HARP rates, phases, the four scores, masks in the
checkpoint and measurements from the masks (hand-checkable nets; digits-size ResNet-20 at width 0.25)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from robbench.config import ModelSpec
from robbench.data import get_info
from robbench.models import build_network
from robbench.pruning import footprint, mask_network, masked_layers, set_phase
from robbench.pruning.masked import MaskedConv2d, MaskedLinear, TopKMask, keep_rate
from robbench.pruning.measure import bake_masks
from robbench.pruning.rates import global_keep, hardware_loss
from robbench.pruning.scores import ScoreData, initialise_scores, score_names
from robbench.pruning.scores.ase import ase_scores
from robbench.pruning.scores.bnsf import bnsf_scores
from robbench.pruning.scores.erm import erm_scores
from robbench.pruning.scores.nis import nis_scores


def test_topk_keeps_the_largest_fraction_and_is_straight_through():
    s = torch.tensor([0.1, 0.9, 0.5, 0.3, 0.7], requires_grad=True)
    # HYDRA GetSubnet, fixed k = 0.4: int((1 - 0.4) * 5) = 3 lowest zeroed, keeps 0.9 and 0.7
    assert TopKMask.apply(s, 0.4).tolist() == [0, 1, 0, 0, 1]
    # HARP: k is a float32 tensor; (1 - float32(0.4)) * 5 = 2.99.. -> int 2 zeroed (HARP's rounding too)
    k = torch.tensor(0.4, requires_grad=True)
    m = TopKMask.apply(s, k)
    assert m.tolist() == [0, 1, 1, 0, 1]
    g = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    m.backward(g)
    assert torch.equal(s.grad, g)          # straight through to the scores
    assert k.grad.item() == pytest.approx(15.0)  # HARP: sum(g)


def test_harp_rate_and_hardware_loss():
    assert keep_rate(torch.tensor(0.0), 0.02).item() == pytest.approx(0.5 * 0.98 + 0.02)
    lin = nn.Sequential(nn.Linear(10, 10), nn.Linear(10, 30))
    mask_network(lin, {"sparsity": 0.8, "learn_rates": True})
    # the default k_score starts every layer at the target keep rate: no compression loss
    assert global_keep(lin).item() == pytest.approx(0.2, rel=1e-5)
    assert hardware_loss(lin, 0.2).item() == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        lin[1].k_score.fill_(10.0)  # layer 2 keeps ~everything: (100*0.2 + 300*~1) / 400 / 0.2 - 1
    want = (100 * 0.2 + 300 * keep_rate(torch.tensor(10.0), 0.02).item()) / 400 / 0.2 - 1
    assert hardware_loss(lin, 0.2).item() == pytest.approx(want, rel=1e-5)


def _tiny_resnet(width: float = 0.25, sparsity: float = 0.8, **kw) -> nn.Module:
    torch.manual_seed(0)
    net = build_network(ModelSpec(arch="resnet20", width=width), get_info("digits"))
    with torch.no_grad():  # trained-looking BatchNorm statistics, so BN-dependent scores differ from |w|
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.2, 2.0)
                m.running_var.uniform_(0.1, 3.0)
    return mask_network(net, {"sparsity": sparsity, **kw})


def test_transform_masks_every_conv_and_linear_and_keeps_the_function():
    torch.manual_seed(0)
    dense = build_network(ModelSpec(arch="resnet20", width=0.25), get_info("digits")).eval()
    x = torch.rand(4, 1, 8, 8)
    ref = dense(x)
    net = mask_network(dense, {"sparsity": 0.8}).eval()
    assert len(masked_layers(net)) == 22  # 19 3x3 convs + 2 shortcut 1x1 convs + fc
    assert not any(type(m) in (nn.Conv2d, nn.Linear) for m in net.modules())
    assert torch.allclose(net(x), ref, atol=1e-6)  # masks start at all-ones
    initialise_scores(net, "erm")
    for _, layer in masked_layers(net):
        assert int(layer.mask.sum()) == layer.mask.numel() - int(0.8 * layer.mask.numel())


def test_phases_freeze_the_right_parameters():
    net = _tiny_resnet(learn_rates=True)
    set_phase(net, "prune")
    for _, layer in masked_layers(net):
        assert layer.scores.requires_grad and layer.k_score.requires_grad and not layer.weight.requires_grad
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(b.weight.requires_grad for b in bns)  # HYDRA: BN affine trains unless --freeze-bn
    set_phase(net, "prune", train_bn=False)
    assert not any(b.weight.requires_grad for b in bns)
    set_phase(net, "finetune")
    for _, layer in masked_layers(net):
        assert not layer.scores.requires_grad and not layer.k_score.requires_grad and layer.weight.requires_grad


def test_prune_phase_gradients_reach_scores_and_finetune_keeps_pruned_weights_zero_grad():
    net = _tiny_resnet()
    initialise_scores(net, "erm")
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))
    set_phase(net, "prune")
    nn.functional.cross_entropy(net(x), y).backward()
    layer = masked_layers(net)[3][1]
    assert layer.scores.grad is not None and layer.scores.grad.abs().sum() > 0 and layer.weight.grad is None
    net.zero_grad(set_to_none=True)
    set_phase(net, "finetune")
    mask_before = layer.mask.clone()
    nn.functional.cross_entropy(net(x), y).backward()
    assert torch.equal(layer.mask, mask_before)
    assert layer.weight.grad[layer.mask == 0].abs().max() == 0 and layer.weight.grad.abs().sum() > 0


def test_erm_is_hydra_scaled_magnitude():
    net = _tiny_resnet()
    name, layer = masked_layers(net)[1]
    w = layer.weight
    fan_in = w.shape[1] * w.shape[2] * w.shape[3]
    assert torch.allclose(erm_scores(net, ScoreData())[name], math.sqrt(6 / fan_in) * w / w.abs().max())


def test_bnsf_scales_each_output_channel_by_its_bn():
    net = _tiny_resnet()
    s = bnsf_scores(net, ScoreData())
    conv, bn = net.layer1[0].conv1, net.layer1[0].bn1
    name = next(n for n, m in masked_layers(net) if m is conv)
    want = (conv.weight * (bn.weight / torch.sqrt(bn.running_var + bn.eps)).reshape(-1, 1, 1, 1)).abs()
    assert torch.allclose(s[name], want)
    fc = next(n for n, m in masked_layers(net) if isinstance(m, MaskedLinear))
    assert torch.equal(s[fc], net.fc.weight.abs())  # no BN follows the classifier: |w|


def test_nis_on_a_linear_chain_is_the_nisp_recursion():
    torch.manual_seed(0)
    chain = mask_network(nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3)), {"sparsity": 0.5})
    w1, w2 = chain[0].weight.detach(), chain[2].weight.detach()
    s = nis_scores(chain, ScoreData())
    s_hidden = w2.abs().t() @ torch.ones(3)           # s_1 = |W_2|^T s_2, s_2 = 1 (uniform seed)
    assert torch.allclose(s["2"], w2.abs())           # last layer: s_out = 1
    assert torch.allclose(s["0"], s_hidden.reshape(-1, 1) * w1.abs(), atol=1e-6)


def test_ase_kfac_diagonal_on_one_linear_layer():
    torch.manual_seed(0)
    lin = mask_network(nn.Sequential(nn.Linear(3, 2)), {"sparsity": 0.5})
    x, y = torch.randn(5, 3), torch.randint(0, 2, (5,))
    s = ase_scores(lin, ScoreData(batches=[(x, y)]))["0"]
    with torch.no_grad():
        g = torch.softmax(lin(x), 1) - nn.functional.one_hot(y, 2)   # per-sample dCE/dz
    want = 0.5 * (g.pow(2).mean(0).reshape(-1, 1) * x.pow(2).mean(0).reshape(1, -1)) * lin[0].weight.detach().pow(2)
    assert torch.allclose(s, want, rtol=1e-4, atol=1e-9)


def test_the_four_scores_give_four_different_masks():
    net = _tiny_resnet()
    g = torch.Generator().manual_seed(0)
    data = ScoreData(batches=[(torch.rand(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g))])
    masks = {}
    for name in score_names():
        initialise_scores(net, name, data)
        masks[name] = torch.cat([layer.mask.flatten() for _, layer in masked_layers(net)])
    assert sorted(masks) == ["ase", "bnsf", "erm", "nis"]
    for a in masks:
        for b in masks:
            if a < b:
                assert (masks[a] != masks[b]).float().mean() > 0.02, (a, b)


def test_footprint_counts_kept_weights_and_macs_by_hand():
    conv = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, bias=False), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))
    net = mask_network(conv, {"sparsity": 0.5})
    with torch.no_grad():
        net[0].mask.zero_()
        net[0].mask.view(-1)[:5] = 1   # 5 of 18 conv weights kept
        net[2].mask.zero_()
        net[2].mask.view(-1)[:10] = 1  # 10 of 96 fc weights kept
    f = footprint(net, (1, 4, 4))
    assert (f.prunable, f.prunable_kept) == (18 + 96, 15)
    assert f.params_total == 18 + 96 + 3 and f.params_kept == 15 + 3   # fc bias kept, scores excluded
    assert (f.macs_dense, f.macs_kept) == (16 * 18 + 96, 16 * 5 + 10)
    assert f.sparsity == pytest.approx(1 - 15 / 114) and f.flops_speedup == pytest.approx((16 * 18 + 96) / 90)
    baked = bake_masks(net)
    assert "0.scores" not in baked and "0.mask" not in baked
    assert int(baked["0.weight"].count_nonzero()) <= 5


def test_masks_live_in_the_safetensors_checkpoint(tmp_path):
    from robbench.checkpoint import RunDir, load_trained
    from robbench.config import load_entry
    from robbench.data import get_info as info
    from robbench.models import build_model

    entry = load_entry("demo_eed_nis_0_prune", ["model.width=0.25"])
    torch.manual_seed(0)
    model = build_model(entry, info("digits"))
    initialise_scores(model.members[0], "erm")
    run = RunDir(tmp_path, entry.name)
    run.begin(entry)
    manifest = run.save_final(model, entry, epochs_done=0)
    assert "model.safetensors" in manifest["files"]  # sha256 of the weights file, masks included
    loaded, _ = load_trained(entry.name, tmp_path)
    a = dict(masked_layers(model.members[0]))
    for name, layer in masked_layers(loaded.members[0]):
        assert torch.equal(layer.mask, a[name].mask)
    fp = footprint(loaded.members[0], (1, 8, 8))
    assert fp.sparsity == pytest.approx(entry.model.transform_options["sparsity"], abs=0.01)


def test_selection_mask_is_bit_identical_to_the_sort_mask():
    from robbench.pruning.masked import topk_mask, topk_mask_sort

    g = torch.Generator().manual_seed(0)
    cases = [torch.rand(3, 4, 3, 3, generator=g), torch.randn(257, generator=g).abs(),
             torch.randint(0, 4, (6, 50), generator=g).float(),  # many ties, some at the cut
             torch.zeros(5, 5), torch.rand(64, 32, generator=g).double()]
    cases.append(cases[0].permute(1, 0, 2, 3))  # not contiguous: flatten() order
    splits = 0
    for s in cases:
        n = s.numel()
        for j in sorted({0, 1, n // 3, n // 2, int(0.8 * n), int(0.95 * n), n - 1, n}):
            want = topk_mask_sort(s, j)
            got = topk_mask(s, j)
            assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want), (s.shape, j)
            if 0 < j < n:
                v = s.flatten().sort().values[j]
                splits += int((s < v).sum() != j)
    assert splits > 0  # ties across the cut were exercised (the sort decides those)


@pytest.mark.parametrize("kw", [{}, {"learn_rates": True}])
def test_prune_phase_mask_cache_gives_the_masks_and_gradients_of_recomputing(kw):
    from robbench.pruning.masked import cut_index, topk_mask_sort

    torch.manual_seed(3)
    net = _tiny_resnet(**kw)
    initialise_scores(net, "erm")
    twin = _tiny_resnet(**kw)
    twin.load_state_dict(net.state_dict())
    set_phase(net, "prune")
    set_phase(twin, "prune")
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.5)
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))
    changed = 0
    for step in range(3):
        before = [l.mask.clone() for _, l in masked_layers(net)]
        for _ in range(3):  # the attack's forwards reuse the step's mask
            net(x)
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        twin.load_state_dict(net.state_dict())
        for _, b in masked_layers(twin):
            b._mask_key = None  # the twin recomputes its masks from the same scores
        twin.zero_grad()
        nn.functional.cross_entropy(twin(x), y).backward()
        for (_, a), (_, b), m0 in zip(masked_layers(net), masked_layers(twin), before):
            assert torch.equal(a.mask, b.mask)
            assert torch.equal(a.mask, topk_mask_sort(a.scores.detach().abs(), cut_index(a.rate(), a.scores.numel())))
            assert torch.equal(a.scores.grad, b.scores.grad)
            if a.k_score is not None:  # HARP: sum(g) to the rate, through the cached mask too
                assert a.k_score.grad is not None and torch.equal(a.k_score.grad, b.k_score.grad)
            changed += int(not torch.equal(a.mask, m0))
        opt.step()  # the scores change: the next forward recomputes
    assert changed > 0


def test_bracketed_selection_on_a_large_layer_is_exact():
    from robbench.pruning.masked import BRACKET_MIN, kth_smallest, topk_mask, topk_mask_sort

    g = torch.Generator().manual_seed(1)
    s = torch.randn(BRACKET_MIN + 4099, generator=g).abs()
    s[:2000] = 0.0  # a block of equal scores (as pruned weights' saliencies)
    srt = s.sort().values
    for j in (1, 1000, 2500, int(0.5 * s.numel()), int(0.95 * s.numel()), s.numel() - 1):
        assert kth_smallest(s, j) == srt[j]
    for j in (2500, int(0.95 * s.numel())):
        assert torch.equal(topk_mask(s, j), topk_mask_sort(s, j))


def test_subset_parts_sets_the_member_range_and_the_cut():
    """EED's d (supp. B.5) as ``train.params.subset_parts``: members 0..d-2, one shared part plus a private
    one each; a member past the range is one line naming train.params.subset_member."""
    from robbench.config import load_entry
    from robbench.eed.subsets import eed_subset
    from robbench.errors import ConfigError

    assert load_entry("demo_eed_nis_2_prune").method_params.subset_parts == 4  # the default: §5.1's quarters
    with pytest.raises(ConfigError) as ei:
        load_entry("demo_eed_nis_2_prune", ["train.params.subset_parts=3"])
    msg = str(ei.value)
    assert "train.params.subset_member" in msg and "allowed: 0..1" in msg and "\n" not in msg
    with pytest.raises(ConfigError, match="subset_parts"):
        load_entry("demo_eed_nis_0_prune", ["train.params.subset_parts=1"])
    p = load_entry("demo_eed_nis_2_prune", ["train.params.subset_parts=6", "train.params.subset_member=4"]).method_params
    assert (p.subset_parts, p.subset_member) == (6, 4)
    n = 60
    cuts = [set(eed_subset(n, m, key="nis", parts=6)) for m in range(5)]
    shared = set.intersection(*cuts)
    assert len(shared) == 10 and all(len(c) == 20 for c in cuts)
    assert len(set().union(*cuts)) == n  # every sample is in some sub-model's data
    assert cuts[0] != set(eed_subset(n, 0, key="erm", parts=6))  # reshuffled per score
    assert sorted(eed_subset(n, 2, key="nis")) == sorted(eed_subset(n, 2, key="nis", parts=4))
    with pytest.raises(ValueError):
        eed_subset(n, 5, key="nis", parts=6)


def test_pipeline_cli_subsets_option(monkeypatch, capsys):
    """``--subsets`` reaches run_pipeline (default: EED's d = 4 pool 0,1,2); a malformed list is exit 2."""
    import robbench.eed.pipeline as pipeline

    got = {}
    monkeypatch.setattr(pipeline, "run_pipeline", lambda *a, **kw: got.update(kw))
    assert pipeline.main(["--prefix", "eed_resnet18_cifar10_d6", "--subsets", "0,1,2,3,4"]) == 0
    assert got["subsets"] == (0, 1, 2, 3, 4)
    assert pipeline.main([]) == 0 and got["subsets"] == (0, 1, 2)
    for bad in ("0,x", "", "0,0", "-1"):
        with pytest.raises(SystemExit) as ei:
            pipeline.main(["--subsets", bad])
        assert ei.value.code == 2 and "--subsets" in capsys.readouterr().err
