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
    same = rgn_transform(copy.deepcopy(net), {}).blocks[4]  # default 'copy': identical at init
    assert torch.equal(same.convs[0].weight, same.convs[1].weight)
    assert same.convs[0].weight.data_ptr() != same.convs[1].weight.data_ptr()  # separate parameters
    rgn = rgn_transform(copy.deepcopy(net), {"gate_mode": "fixed", "path_init": "reinit"}).eval()
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
    rgn = rgn_transform(resnet(), {"path_init": "reinit"})  # paths differ; default gate_mode: per_input
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


# ------------------------------------------------------------------------------- training and derive
SMALL = ["model.width=0.25", "data.dataset=synthetic", "data.options.n_train=128", "data.options.n_test=64",
         "data.batch_size=64", "data.test_batch_size=64", "train.epochs=2", "train.schedule.milestones=[1]",
         "train.save_every_steps=1"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """demo_eio_pretrain then demo_eio (diversification), 2 epochs of 2 batches each, tiny synthetic data."""
    from robbench.train.run import train_entry

    root = tmp_path_factory.mktemp("eio_runs")
    train_entry("demo_eio_pretrain", overrides=SMALL, runs_dir=root, progress=False)
    train_entry("demo_eio", overrides=SMALL, runs_dir=root, progress=False)
    return root


def test_both_phases_follow_the_paper_schedule(runs):
    from robbench.checkpoint import RunDir

    for name in ("demo_eio_pretrain", "demo_eio"):
        log = RunDir(runs, name).read_log()
        # each phase starts at the initial lr and decays at its own milestone (no carried-over lr)
        assert [r["lr"] for r in log] == pytest.approx([0.1, 0.1 * 0.1])
    div = RunDir(runs, "demo_eio").read_log()[0]["losses"]
    assert div["div_loss"] > 0 and 1 <= div["layer"] <= 20 and 2 <= div["paths"] <= 3
    m = RunDir(runs, "demo_eio").read_manifest()
    assert m["extra"]["init_from"]["entry"] == "demo_eio_pretrain"


def test_diversification_step_accumulates_over_paths_and_adv_train_runs():
    """One step by hand: distilled sets differ per path, every sampled path's gates get gradients, and
    the EIO+AdvT objective adds its PGD term."""
    from robbench.config import load_entry
    from robbench.data import get_info
    from robbench.models import build_model
    from robbench.train.loop import DistEnv, TrainContext, build_optimizers
    from robbench.train.methods import Batch
    from robbench.train.methods.eio import EnsembleInOne

    for adv in (False, True):
        e = load_entry("demo_eio", [*SMALL, "train.params.from_scratch=true", f"train.params.adv_train={str(adv).lower()}",
                                    "train.params.adv_steps=2", "train.params.distill_steps=2", "train.params.layer=3"])
        torch.manual_seed(0)
        model = build_model(e, get_info("synthetic"))
        model.train()
        ctx = TrainContext(entry=e, model=model, optimizers=build_optimizers(model, list(model.members), e.train.optimizer),
                           device=torch.device("cpu"), dist=DistEnv(),
                           seed=0, num_classes=10)
        method = EnsembleInOne(e.method_params)
        method.setup(ctx)
        rgn = find_rgn(model)
        seen: list[tuple[int, ...]] = []
        real_step = ctx.step_optimizers

        def spy() -> None:
            for i, blk in enumerate(rgn.blocks[:3]):  # the first 3 gates feed layer 3
                used = {p[i] for p in seen}
                for k in range(rgn.n):
                    has = blk.convs[k].weight.grad is not None
                    assert has == (k in used)
            real_step()

        ctx.step_optimizers = spy  # type: ignore[method-assign]
        orig = rgn.sample_paths
        rgn.sample_paths = lambda *a, **kw: seen.extend(orig(*a, **kw)) or list(seen)  # type: ignore[method-assign]
        x = torch.rand(8, 3, 8, 8)
        out = method.step(ctx, Batch(x, torch.arange(8) % 10, ((torch.rand(8, 3, 8, 8), torch.zeros(8, dtype=torch.long)),)))
        assert out["layer"] == 3 and out["paths"] == 3
        if adv:
            assert out["adv_loss"] > 0 and out["loss"] == pytest.approx(out["div_loss"] + out["adv_loss"])
        else:
            assert "adv_loss" not in out and out["loss"] == out["div_loss"] > 0
        assert rgn.gate_mode == "per_input"  # back to deployment gates for evaluation



@pytest.mark.parametrize("scale", ["reference", "paper"])
def test_diversification_gradient_is_the_reference_objective(scale):
    """The accumulated gradient equals that of s * sum_i sum_{j != i} CE(f_{P_i}(x'_j), y_s) with
    s = 1/p (rgn_manager.py ``loss / distill_batch_cur``) or 1 (Alg. 1 line 21), taken in one step."""
    from robbench.config import load_entry
    from robbench.data import get_info
    from robbench.models import build_model
    from robbench.train.loop import DistEnv, TrainContext, build_optimizers
    from robbench.train.methods import Batch
    from robbench.train.methods.eio import EnsembleInOne

    e = load_entry("demo_eio", [*SMALL, "train.params.from_scratch=true", "train.params.layer=3",
                                f"train.params.loss_scale={scale}"])
    torch.manual_seed(0)
    model = build_model(e, get_info("synthetic"))
    model.train()
    ctx = TrainContext(entry=e, model=model, optimizers=build_optimizers(model, list(model.members), e.train.optimizer),
                       device=torch.device("cpu"), dist=DistEnv(), seed=0, num_classes=10)
    method = EnsembleInOne(e.method_params)
    method.setup(ctx)
    rgn = find_rgn(model)
    paths = [(0,) * rgn.num_gates, (1,) + (0,) * (rgn.num_gates - 1), (0, 1) + (1,) * (rgn.num_gates - 2)]
    xs = [torch.rand(8, 3, 8, 8) for _ in paths]
    y = torch.arange(8) % 10
    rgn.sample_paths = lambda *a, **kw: list(paths)  # type: ignore[method-assign]
    method.distill_paths = lambda *a, **kw: list(xs)  # type: ignore[method-assign]
    steps: list[dict[str, torch.Tensor]] = []

    def capture() -> None:  # one optimizer step per batch, after every path's backward
        steps.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})

    ctx.step_optimizers = capture  # type: ignore[method-assign]
    method.step(ctx, Batch(torch.rand(8, 3, 8, 8), y, ((torch.rand(8, 3, 8, 8), y),)))
    assert len(steps) == 1
    model.zero_grad()
    s = 1 / len(paths) if scale == "reference" else 1.0
    total = 0.0
    for i, p in enumerate(paths):
        rgn.set_path(p)
        total = total + s * sum(torch.nn.functional.cross_entropy(rgn.net(x), y) for j, x in enumerate(xs) if j != i)
    total.backward()
    want = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert want.keys() == steps[0].keys()
    for n, g in want.items():
        torch.testing.assert_close(steps[0][n], g, rtol=1e-5, atol=1e-7)

def test_configuration_errors_name_the_field(tmp_path):
    from robbench.train.run import train_entry

    with pytest.raises(ConfigError, match="train.init_from"):
        train_entry("demo_eio_pretrain", overrides=[*SMALL, "train.params.phase=diversify"], runs_dir=tmp_path,
                    progress=False)
    with pytest.raises(ConfigError, match="model.transform"):
        train_entry("demo_eio_pretrain", overrides=[*SMALL, "model.members=2"], runs_dir=tmp_path / "b",
                    progress=False)


def test_resume_after_interrupt_gives_identical_weights(runs, tmp_path, monkeypatch):
    import shutil

    from robbench.checkpoint import RunDir
    from robbench.train.methods.eio import EnsembleInOne
    from robbench.train.run import train_entry

    shutil.copytree(runs / "demo_eio_pretrain", tmp_path / "demo_eio_pretrain")
    real = EnsembleInOne.step

    def flaky(self, ctx, batch):
        if ctx.global_step == 3:
            raise KeyboardInterrupt
        return real(self, ctx, batch)

    monkeypatch.setattr(EnsembleInOne, "step", flaky)
    with pytest.raises(KeyboardInterrupt):
        train_entry("demo_eio", overrides=SMALL, runs_dir=tmp_path, progress=False)
    assert RunDir(tmp_path, "demo_eio").read_manifest()["status"] == "training"
    monkeypatch.setattr(EnsembleInOne, "step", real)
    m = train_entry("demo_eio", overrides=SMALL, runs_dir=tmp_path, progress=False)
    ref = RunDir(runs, "demo_eio").read_manifest()
    assert m["status"] == "complete"
    assert m["extra"]["rank_weights_sha256"] == ref["extra"]["rank_weights_sha256"]


def test_derive_writes_plain_runs_equal_to_the_rgn_paths_and_finetunes(runs, tmp_path):
    from robbench.checkpoint import RunDir, load_trained
    from robbench.eio.derive import derive_paths

    names = derive_paths("demo_eio", count=2, seed=0, runs_dir=runs)
    assert names == ["demo_eio_path0", "demo_eio_path1", "demo_eio_ens2"]
    rgn_model, _ = load_trained("demo_eio", runs)
    rgn = find_rgn(rgn_model)
    assert rgn.randomized  # loaded for evaluation: random-path deployment
    x = torch.rand(5, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    ens, man = load_trained("demo_eio_ens2", runs)
    assert not any(isinstance(m, RandomGatedNetwork) for m in ens.modules())
    assert "rgn" not in man["config"]["tags"] and "eio-derived" in man["config"]["tags"]
    for i in range(2):
        plain, m = load_trained(f"demo_eio_path{i}", runs)
        path = m["extra"]["eio_paths"][0]
        assert path == man["extra"]["eio_paths"][i]
        rgn.set_path(path)
        with torch.no_grad():
            torch.testing.assert_close(plain(x), rgn(x), rtol=0, atol=0)
            torch.testing.assert_close(ens.members[i](x), rgn(x), rtol=0, atol=0)
    assert derive_paths("demo_eio", count=2, seed=0, runs_dir=runs) == names  # same seed, same paths
    assert load_trained("demo_eio_path1", runs)[1]["extra"]["eio_paths"] == man["extra"]["eio_paths"][1:]
    one = derive_paths("demo_eio", path=",".join("1" * rgn.num_gates), runs_dir=runs)
    assert one == ["demo_eio_path-" + "1" * rgn.num_gates]
    with pytest.raises(ConfigError, match="path"):
        derive_paths("demo_eio", path="0,1", runs_dir=runs)
    # fine-tuning entry: derived paths then trained with its recipe, plus the assembled ensemble
    ft = tmp_path / "ft_test.toml"
    ft.write_text('extends = "demo_eio_ft"\n[model]\nwidth = 0.25\n[data]\ndataset = "synthetic"\nbatch_size = 64\n'
                  'test_batch_size = 64\n[data.options]\nn_train = 128\nn_test = 64\n[train]\nepochs = 1\n')
    names = derive_paths(str(ft), count=2, seed=0, runs_dir=runs)
    assert names[-3:] == ["ft_test_path0", "ft_test_path1", "ft_test_ens2"]
    tuned = RunDir(runs, "ft_test_path0").read_manifest()
    assert tuned["extra"]["init_from"]["entry"] == "demo_eio_path0" and tuned["epochs_done"] == 1
    assert load_trained("ft_test_ens2", runs)[0].num_members == 2
    # a fine-tuned run made from other derived weights (RGN retrained) is not silently reused
    rd = RunDir(runs, "ft_test_path1")
    mf = rd.read_manifest()
    mf["extra"]["init_from"]["weights_sha256"] = "0" * 64
    rd.write_manifest(mf)
    from robbench.errors import CheckpointError
    with pytest.raises(CheckpointError, match="older weights"):
        derive_paths(str(ft), count=2, seed=0, runs_dir=runs)
    bad = tmp_path / "ft_bad.toml"
    bad.write_text('extends = "demo_eio_ft"\n[data]\ndataset = "synthetic"\n')
    with pytest.raises(ConfigError, match="model.width"):
        derive_paths(str(bad), runs_dir=runs)


def test_random_path_model_eot_evaluation_is_seeded(monkeypatch):
    """The engine attacks a randomized model through EOT; the adversarial examples and verdicts must not
    depend on the global RNG state before the call (a resumed evaluation must redo a batch exactly)."""
    import dataclasses

    from robbench.evaluate import execute
    from robbench.evaluate.plan import plan_attacks
    from robbench.evaluate.protocol import load_protocol
    from robbench.models import Ensemble
    from robbench.models.eot import is_randomized

    model = Ensemble([rgn_transform(resnet(), {"path_init": "reinit"})]).eval()
    assert is_randomized(model)
    proto = load_protocol("demo-whitebox")
    proto.attacks[0].params_parsed = dataclasses.replace(proto.attacks[0].params_parsed, steps=3)
    spec = plan_attacks(proto)[0]
    x, y = x_batch(12), torch.arange(12) % 10
    eps = torch.full((12,), 0.1)
    advs: list[torch.Tensor] = []
    real = execute.make_attack

    def recording(*a, **kw):
        attack = real(*a, **kw)

        def run(*args, **kwargs):
            res = attack(*args, **kwargs)
            advs.append(res.x_adv.detach().clone())
            return res
        return run

    monkeypatch.setattr(execute, "make_attack", recording)
    outs = []
    for noise in (1, 2):
        torch.manual_seed(noise)  # whatever state the global RNG is in before the attack
        outs.append(execute.run_attack(spec, model, x, y, eps, randomized=True, eot_samples=2,
                                       seed_parts=(0, "t", 0)).fooled)
    assert len(advs) == 2 * spec.caps.restarts
    half = len(advs) // 2
    for a, b in zip(advs[:half], advs[half:]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert torch.equal(outs[0], outs[1])


def test_reinit_paths_use_the_architecture_init_through_build_model():
    """VGG-16 keeps torch's default conv init (EIO vgg.py); extra independent paths must be drawn like a
    freshly built network's, not from the ResNet init."""
    from robbench.config import load_entry
    from robbench.data import get_info
    from robbench.models import build_model

    e = load_entry("demo_eio_pretrain", ["model.arch=vgg16", "model.width=1.0",
                                         "model.transform_options.path_init=reinit"])
    torch.manual_seed(0)
    rgn = find_rgn(build_model(e, get_info("digits")))
    blk = rgn.blocks[5]
    w0, w1 = blk.convs[0].weight.detach(), blk.convs[1].weight.detach()
    assert not torch.equal(w0, w1)
    bound = (1.0 / (w0.shape[1] * 9)) ** 0.5  # kaiming_uniform(a=sqrt(5)) bound = 1/sqrt(fan_in)
    assert w1.abs().max() <= bound and w0.abs().max() <= bound
    assert abs(float(w1.std()) - float(w0.std())) < 0.1 * float(w0.std())


def test_random_path_accuracy_of_a_trained_rgn_run(runs):
    from robbench.eio.deploy import random_path_accuracy

    a = random_path_accuracy("demo_eio", runs, draws=3, seed=0)
    b = random_path_accuracy("demo_eio", runs, draws=3, seed=0)
    assert a == b and a["samples"] == 64 and len(a["per_draw"]) == 3
    assert 0.0 <= a["mean"] <= 1.0 and a["std"] >= 0.0
    c = random_path_accuracy("demo_eio", runs, draws=3, seed=0, mode="per_forward")
    assert c["mode"] == "per_forward" and len(c["per_draw"]) == 3


def test_cli_derive_errors_are_one_line(tmp_path):
    import subprocess
    import sys

    from robbench.eio.derive import derive_paths

    r = subprocess.run([sys.executable, "-m", "robbench", "derive", "zoo/demo_eio", "--runs-dir", str(tmp_path)],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "robbench train zoo/demo_eio" in r.stderr
    with pytest.raises(ConfigError, match="model.transform"):
        derive_paths("demo_baseline_x3", runs_dir=tmp_path)
