"""The released-checkpoint converters on files built with the reference code's own key layout: Ensemble-in-One's
random gated network (cai-y13/Ensemble-in-One augment_op.py RGB + resnet.py, in the checkpoint's
``{'state_dict': {'net.normalizer.*', 'net.model.*'}}`` wrapper) and DVERGE's ensembles
(``{'model_<i>': ModelWrapper state dict}``); the converted runs' outputs equal the reference models'."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from dverge_reference import RefResNet20
from robbench.cli import main
from robbench.errors import CheckpointError

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)  # DVERGE / EIO normaliser (notes §A, §2)


class RefNormalizer(nn.Module):
    """advertorch NormalizeByChannelMeanStd: buffers ``mean`` and ``std`` of shape [3]."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(MEAN))
        self.register_buffer("std", torch.tensor(STD))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean[None, :, None, None]) / self.std[None, :, None, None]


class RefWrapper(nn.Module):
    """DVERGE utils.py ModelWrapper / the EIO checkpoint's ``net``: normalise, then the model."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.normalizer = RefNormalizer()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.normalizer(x))


# ---------------------------------------------------------------------- EIO reference (augment_op.py, resnet.py)

class RefRGB(nn.Module):
    """augment_op.py RGB: n candidates Sequential(op, BatchNorm2d) all holding the SAME op object."""

    def __init__(self, op: nn.Conv2d, npath: int = 2) -> None:
        super().__init__()
        self.candidate_ops = nn.ModuleList([nn.Sequential(op, nn.BatchNorm2d(op.out_channels)) for _ in range(npath)])
        self.AP_path_alpha = nn.Parameter(torch.zeros(npath))
        self.AP_path_wb = nn.Parameter(torch.zeros(npath))
        self.active_index = [0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.candidate_ops[self.active_index[0]](x)


class RefRGBBlock(nn.Module):
    def __init__(self, cin: int, planes: int, stride: int, downsample: nn.Module | None, n: int) -> None:
        super().__init__()
        self.conv1 = RefRGB(nn.Conv2d(cin, planes, 3, stride, 1, bias=False), n)
        self.relu = nn.ReLU()
        self.conv2 = RefRGB(nn.Conv2d(planes, planes, 3, 1, 1, bias=False), n)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(self.relu(self.conv1(x)))
        return self.relu(out + (self.downsample(x) if self.downsample is not None else x))


class RefRGBResNet20(nn.Module):
    def __init__(self, n: int = 2) -> None:
        super().__init__()
        self.conv1 = RefRGB(nn.Conv2d(3, 16, 3, padding=1, bias=False), n)
        self.relu = nn.ReLU()
        cin, stages = 16, []
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            ds = None if (stride == 1 and cin == planes) else nn.Sequential(
                nn.Conv2d(cin, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
            stages.append(nn.Sequential(RefRGBBlock(cin, planes, stride, ds, n), RefRGBBlock(planes, planes, 1, None, n),
                                        RefRGBBlock(planes, planes, 1, None, n)))
            cin = planes
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AvgPool2d(8)
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.relu(self.conv1(x)))))
        return self.fc(self.avgpool(x).flatten(1))

    def gates(self) -> list[RefRGB]:
        return [m for m in self.modules() if isinstance(m, RefRGB)]  # modules() order = the reference's gates


class RefEIOCheckpoint(nn.Module):
    def __init__(self, n: int = 2) -> None:
        super().__init__()
        self.net = RefWrapper(RefRGBResNet20(n))


def _randomize(model: nn.Module, seed: int) -> None:
    """Distinct weights and BatchNorm statistics everywhere, so every path and member differs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
            elif isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / m.weight[0].numel()) ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))


def test_eio_released_rgn_converts_to_the_share_conv_rgn(tmp_path: Path) -> None:
    torch.manual_seed(0)
    ref = RefEIOCheckpoint(2)
    _randomize(ref, 1)
    sd = ref.state_dict()
    gates = ref.net.model.gates()
    assert len(gates) == 19  # 19 RGBs: every 3x3 conv, stem included
    assert sd["net.model.conv1.candidate_ops.0.0.weight"].data_ptr() == sd["net.model.conv1.candidate_ops.1.0.weight"].data_ptr()
    f = tmp_path / "model.pth.tar"
    torch.save({"state_dict": sd, "epoch": 200}, f)  # the released file's wrapper

    res = CliRunner().invoke(main, ["convert", "eio-rgn", str(f), "--name", "eio_released",
                                    "--runs-dir", str(tmp_path / "runs")], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    manifest = json.loads((tmp_path / "runs" / "eio_released" / "manifest.json").read_text())
    assert manifest["origin"] == "imported" and manifest["imported"]["share_conv"] is True
    assert manifest["config"]["model"]["transform_options"]["share_conv"] is True
    assert "train" not in manifest["config"]

    from robbench.api import load_model

    model = load_model("eio_released", runs_dir=tmp_path / "runs")
    rgn = model.members[0]
    assert rgn.num_gates == 19
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    ref.eval()
    g = torch.Generator().manual_seed(3)
    for path in ([0] * 19, [1] * 19, torch.randint(0, 2, (19,), generator=g).tolist()):
        for gate, k in zip(gates, path):
            gate.active_index = [k]
        rgn.set_path(path, mode="fixed")
        with torch.no_grad():
            assert torch.allclose(model(x), ref.net(x), atol=1e-5, rtol=1e-5), path


def test_eio_converter_refuses_a_file_of_another_layout(tmp_path: Path) -> None:
    f = tmp_path / "plain.pth"
    torch.save({"state_dict": RefWrapper(RefResNet20()).state_dict()}, f)
    with pytest.raises(CheckpointError) as e:
        from robbench.imported.converters import convert_eio_rgn

        convert_eio_rgn(f, "x", runs_dir=tmp_path / "runs")
    assert "candidate_ops" in str(e.value)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def _dverge_file(tmp_path: Path, members: int, leaky: bool) -> tuple[Path, list[nn.Module]]:
    refs = []
    for i in range(members):
        torch.manual_seed(10 + i)
        net = RefResNet20()
        if leaky:  # GAL: models/resnet.py leaky_relu=True -> nn.LeakyReLU(0.1)
            for m in net.modules():
                if hasattr(m, "relu"):
                    m.relu = nn.LeakyReLU(0.1)
        _randomize(net, 20 + i)
        refs.append(RefWrapper(net).eval())
    f = tmp_path / "epoch_200.pth"
    torch.save({f"model_{i}": r.state_dict() for i, r in enumerate(refs)}, f)
    return f, refs


@pytest.mark.parametrize("leaky,like", [(False, "baseline_resnet20_x3"), (True, "gal_resnet20_x3")])
def test_dverge_released_ensemble_equals_the_reference(tmp_path: Path, leaky: bool, like: str) -> None:
    f, refs = _dverge_file(tmp_path, 3, leaky)
    res = CliRunner().invoke(main, ["convert", "dverge-ensemble", str(f), "--name", "dverge_released", "--like", like,
                                    "--runs-dir", str(tmp_path / "runs")], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    from robbench.api import load_model

    model = load_model("dverge_released", runs_dir=tmp_path / "runs")
    assert len(model.members) == 3
    x = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        for i, r in enumerate(refs):
            assert torch.allclose(model.members[i](x), r(x), atol=1e-5, rtol=1e-5), i
        # DVERGE models/ensemble.py: log of the mean softmax over the members
        ref_ens = torch.log(torch.stack([r(x).softmax(1) for r in refs]).mean(0).clamp_min(1e-40))
        assert torch.allclose(model(x), ref_ens, atol=1e-5, rtol=1e-5)


def test_dverge_gal_file_with_a_relu_entry_differs(tmp_path: Path) -> None:
    """The activation comes from --like: a GAL file read as ReLU gives other outputs (so --like matters)."""
    f, refs = _dverge_file(tmp_path, 2, leaky=True)
    from robbench.api import load_model
    from robbench.imported.converters import convert_dverge_ensemble

    convert_dverge_ensemble(f, "as_relu", like="baseline_resnet20_x3", runs_dir=tmp_path / "runs")
    model = load_model("as_relu", runs_dir=tmp_path / "runs")
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert not torch.allclose(model.members[0](x), refs[0](x), atol=1e-4)


def test_dverge_converter_names_missing_keys(tmp_path: Path) -> None:
    f, refs = _dverge_file(tmp_path, 2, leaky=False)
    sd = torch.load(f, weights_only=True)
    del sd["model_1"]["model.fc.bias"]
    torch.save(sd, f)
    res = CliRunner().invoke(main, ["convert", "dverge-ensemble", str(f), "--name", "broken", "--runs-dir",
                                    str(tmp_path / "runs")])
    assert res.exit_code == 2 and "missing keys model_1.model.fc.bias" in res.output, res.output
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_dverge_released_transfer_sets_feed_the_blackbox_protocol(tmp_path: Path) -> None:
    """A folder in eval_bbox.py's layout (digits-sized here) -> cached sets the black-box protocol reads in
    place of surrogate models; each stored row equals the file's; wrong labels are refused."""
    from robbench.data import load_split
    from robbench.data.subsets import make_subset
    from robbench.evaluate import transfer
    from robbench.evaluate.engine import evaluate_protocol
    from robbench.imported.add import add_module
    from robbench.imported.transfer_sets import import_dverge_transfer
    from robbench.store import Store

    n, eps_list = 12, (0.05, 0.1, 0.15, 0.2)
    ids = list(make_subset("dverge", "digits", "test", n, 0).indices)
    x, y = load_split("digits", "test").get(ids)
    folder = tmp_path / "transfer_adv_examples"
    g = torch.Generator().manual_seed(0)
    names = [f"from_baseline3_{loss}_mpgd_steps_100_{s}" for loss in ("xent", "cw") for s in (0, 1)] + [
        f"from_baseline3_{loss}_{a}_steps_100" for loss in ("xent", "cw") for a in ("mdi2_0.5", "sgm_0.2")]
    files = {}
    for e in eps_list:
        for nm in names:
            d = folder / f"eps_{e}" / nm
            d.mkdir(parents=True)
            xa = (x + e * torch.sign(torch.randn(x.shape, generator=g))).clamp(0, 1)
            torch.save(xa, d / "inputs.pt")
            torch.save(y.clone(), d / "labels.pt")
            files[(nm, e)] = xa
    # CIFAR-10 (the default) is refused by shape, one line
    res = CliRunner().invoke(main, ["convert", "dverge-transfer", str(folder), "--name", "rel", "--cache-dir",
                                    str(tmp_path / "cache")])
    assert res.exit_code == 2 and "expected N×3×32×32 cifar10 images" in res.output, res.output
    assert not (tmp_path / "cache").exists()
    res = CliRunner().invoke(main, ["convert", "dverge-transfer", str(folder), "--name", "rel", "--dataset", "digits",
                                    "--cache-dir", str(tmp_path / "cache")], catch_exceptions=False)
    assert res.exit_code == 0 and "32 transfer sets" in res.output and '"rel_baseline3"' in res.output, res.output
    index = transfer.released_index("rel_baseline3", tmp_path / "cache")
    assert index is not None and len(index["sets"]) == 8
    key = index["sets"]["sgm-cw"]["0.1"]
    ts = transfer.load_set(key, root=tmp_path / "cache", expect_ids=ids)
    assert torch.equal(ts.x_adv, files[("from_baseline3_cw_sgm_0.2_steps_100", 0.1)])

    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    add_module(net, "victim", "digits", runs_dir=tmp_path / "runs")
    runs = evaluate_protocol("demo-blackbox", ["victim"], n=n, overrides=['sources=["rel_baseline3"]'],
                             runs_dir=tmp_path / "runs", db=tmp_path / "r.db", cache_root=tmp_path / "cache",
                             quiet=True, memory_format="contiguous")
    with Store(tmp_path / "r.db") as st:
        df = st.outcomes(runs["victim"])
    row = df[(df["attack"] == "sgm-cw") & (df["eps"] == 0.1)].sort_values("sample")
    expect = (net(files[("from_baseline3_cw_sgm_0.2_steps_100", 0.1)]).argmax(1) == y).long()
    by_id = dict(zip(ids, expect.tolist()))
    assert list(row["correct"]) == [by_id[i] for i in row["sample"]]
    assert set(df["source"]) >= {"rel_baseline3"}

    # labels of other samples: refused, one line
    torch.save(torch.roll(y, 1), folder / "eps_0.1" / names[0] / "labels.pt")
    with pytest.raises(Exception) as e:
        import_dverge_transfer(folder, "rel2", dataset="digits", cache_root=tmp_path / "cache2")
    assert "labels differ" in str(e.value)
    assert not (tmp_path / "cache2").exists()
