"""EED end to end on digits at toy size through ``train_entry``: AT base -> pruned sub-models (two scores,
subsets) -> fine-tune -> RD selection -> joint team training -> DIE model; masks survive every step."""
from __future__ import annotations

import pytest
import torch

from robbench.checkpoint import load_trained
from robbench.errors import UserError
from robbench.pruning import footprint, masked_layers
from robbench.train.run import train_entry

TOY = ["model.width=0.25", "data.batch_size=512", "train.params.adv_steps=1"]


@pytest.fixture()
def runs(tmp_path, monkeypatch):
    monkeypatch.setenv("ROBBENCH_RUNS", str(tmp_path))  # methods that load other runs read it
    return tmp_path


@pytest.mark.slow  # 6 training runs: 231 s measured with the machine at load 11 (2 cores)
def test_pool_to_team(runs):
    kw = dict(runs_dir=runs, progress=False, device="cpu")
    with pytest.raises(UserError, match="robbench train zoo/demo_eed_at"):
        train_entry("demo_eed_nis_0_prune", TOY + ["train.epochs=1"], **kw)
    train_entry("demo_eed_at", TOY + ["train.epochs=1"], **kw)
    members = []
    for score in ("nis", "bnsf"):
        prune = f"demo_eed_{score}_0_prune"
        train_entry(prune, TOY + ["train.epochs=1"], **kw)
        ft = f"demo_eed_{score}_0"
        train_entry(ft, TOY + ["train.epochs=1"], **kw)
        pruned, _ = load_trained(prune, runs)
        tuned, man = load_trained(ft, runs)
        fp = footprint(tuned.members[0], (1, 8, 8))
        assert fp.sparsity == pytest.approx(0.8, abs=0.05)  # HARP rates move around the 80% target
        for (_, a), (_, b) in zip(masked_layers(pruned.members[0]), masked_layers(tuned.members[0])):
            assert torch.equal(a.mask, b.mask)  # fine-tuning keeps the pruned masks
        members.append(ft)
    m_nis = torch.cat([l.mask.flatten() for _, l in masked_layers(load_trained(members[0], runs)[0].members[0])])
    m_bn = torch.cat([l.mask.flatten() for _, l in masked_layers(load_trained(members[1], runs)[0].members[0])])
    assert (m_nis != m_bn).float().mean() > 0.01  # barely trained base: BN close to identity
    team = TOY + ["train.epochs=1", "model.options.size=2", f"train.params.team={members!r}".replace("'", '"')]
    train_entry("demo_eed_team", team, **kw)
    model, _ = load_trained("demo_eed_team", runs)
    net = model.members[0]
    src = load_trained(members[0], runs)[0].members[0]
    for (_, a), (_, b) in zip(masked_layers(src), masked_layers(net.nets[0])):
        assert torch.equal(a.mask, b.mask)  # team members keep their pool masks
    x = torch.rand(32, 1, 8, 8)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (32, 10) and torch.isfinite(out).all()
    assert net.last_members_used.min() >= 1 and net.last_members_used.max() <= 2
