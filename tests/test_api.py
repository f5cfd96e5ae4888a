"""The Python API in a few lines: a module object evaluated with demo-whitebox and demo-autoattack, ranked
by robbench.leaderboard, reloaded with robbench.load_model; attacks on any nn.Module."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import robbench


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1) - 0.3)


def _trained() -> TinyNet:
    from robbench.data import load_split

    torch.manual_seed(0)
    net = TinyNet()
    data = load_split("digits", "train")
    x, y = data.get(list(range(len(data))))
    opt = torch.optim.Adam(net.parameters(), 5e-2)
    for _ in range(60):
        loss = nn.functional.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


def test_api_route(tmp_path: Path) -> None:
    where = dict(runs_dir=tmp_path / "runs", db=tmp_path / "r.db", quiet=True, memory_format="contiguous")
    net = _trained()
    wb = robbench.evaluate(net, protocol="demo-whitebox", n=20, name="my_net", **where)
    aa = robbench.evaluate(net, protocol="demo-autoattack", n=20, name="my_net", **where)
    for res, proto in ((wb, "demo-whitebox"), (aa, "demo-autoattack")):
        assert set(res["protocol"]) == {proto} and set(res["entry"]) == {"my_net"}
        clean = res[res["attack"] == "clean"]["accuracy"].iloc[0]
        robust = res[(res["attack"] == "all") & (res["eps"] > 0)]["accuracy"]
        assert clean > 0.5 and (robust <= clean).all()
    board = robbench.leaderboard("demo-autoattack", db=where["db"], runs_dir=where["runs_dir"])
    assert list(board["entry"]) == ["my_net"] and int(board["rank"].iloc[0]) == 1
    assert board["robust"].iloc[0] == pytest.approx(100 * aa[(aa["attack"] == "all") & (aa["eps"] > 0)]["accuracy"].iloc[0])

    # the second call reused the imported run (same weights): no copy moved aside
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["my_net"]
    # the run is an imported one; the module comes back from the store with the same outputs
    loaded = robbench.load_model("my_net", runs_dir=where["runs_dir"])
    x = torch.rand(5, 1, 8, 8)
    assert torch.allclose(loaded(x), net(x), atol=1e-6)
    from robbench.store import Store

    with Store(where["db"]) as st:
        assert {r["origin"] for r in st.runs()["meta"]} == {"imported"}

    # the engine names runs; a module object handed to it says where to take it
    from robbench.errors import UserError
    from robbench.evaluate.engine import evaluate_protocol

    with pytest.raises(UserError) as e:
        evaluate_protocol("demo-whitebox", [net], runs_dir=where["runs_dir"], db=where["db"])
    assert "robbench.evaluate(model" in str(e.value)

    # robbench.attack works on any module: PGD at eps 0.2 fools more than at eps 0
    y = net(x).argmax(1)
    res = robbench.attack("pgd", steps=10, rel_step=0.25)(net, x, y, 0.3)
    assert res.x_adv.shape == x.shape and (res.x_adv - x).abs().max() <= 0.3 + 1e-6 and res.fooled.any()


def test_api_factory_route_is_rebuildable_and_memory_route_is_not(tmp_path: Path) -> None:
    """With factory= the run can be rebuilt by any process; a memory: run says how to evaluate it."""
    from robbench.errors import ConfigError
    from robbench.models import user_code

    src = tmp_path / "tiny.py"
    src.write_text("from torch import nn\nclass Tiny(nn.Module):\n    def __init__(self, k: int = 10):\n"
                   "        super().__init__()\n        self.fc = nn.Linear(64, k)\n"
                   "    def forward(self, x):\n        return self.fc(x.flatten(1))\n")
    ns: dict = {}
    exec(src.read_text(), ns)
    net = ns["Tiny"]()
    where = dict(runs_dir=tmp_path / "runs", db=tmp_path / "r.db", quiet=True, memory_format="contiguous")
    robbench.evaluate(net, "demo-whitebox", n=10, name="tiny_file", factory=f"file:{src}:Tiny", **where)
    robbench.evaluate(net, "demo-whitebox", n=10, name="tiny_mem", **where)
    # changed weights under the same name replace the run (the old one is kept aside)
    import copy

    original = copy.deepcopy(net)
    with torch.no_grad():
        net.fc.bias.add_(1.0)
    robbench.evaluate(net, "demo-whitebox", n=10, name="tiny_mem", **where)
    assert len([p for p in (tmp_path / "runs").iterdir() if p.name.startswith("tiny_mem.stale-")]) == 1
    user_code._LIVE.clear()  # as in a fresh process
    from robbench.registry import ARCHITECTURES

    ARCHITECTURES.forget("memory:tiny_mem")
    x = torch.rand(3, 1, 8, 8)
    assert torch.allclose(robbench.load_model("tiny_file", runs_dir=where["runs_dir"])(x), original(x), atol=1e-6)
    with pytest.raises(ConfigError) as e:
        robbench.load_model("tiny_mem", runs_dir=where["runs_dir"])
    assert "robbench.evaluate" in str(e.value)
