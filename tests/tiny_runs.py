"""Tiny trained runs for engine-level tests: a CIFAR ResNet-8 (width 0.25) ensemble on digits, a few Adam
steps, saved as a run (shared by the engine and measurement tests)."""
from __future__ import annotations

from pathlib import Path

import torch

from robbench.checkpoint import RunDir
from robbench.config import load_entry
from robbench.data import get_info, load_split
from robbench.models import build_model


def train_tiny_run(root: Path, zoo: Path, name: str, members: int, seed: int, steps: int = 25, tags=(),
                   entry_spec: str | None = None) -> None:
    """Write ``zoo/<name>.toml`` (or use the zoo entry ``entry_spec``), train it ``steps`` Adam steps on
    the members' summed CE, and save it as run ``root/<name>``."""
    if entry_spec is None:
        f = zoo / f"{name}.toml"
        f.write_text(f'paper = "demo"\ntags = {list(tags)!r}\n[model]\narch = "resnet_cifar"\noptions = {{depth = 8}}\n'
                     f'members = {members}\nwidth = 0.25\n[data]\ndataset = "digits"\n[train]\nepochs = 1\nseed = {seed}\n')
        entry_spec = str(f)
    entry = load_entry(entry_spec)
    torch.manual_seed(seed)
    model = build_model(entry, get_info("digits"))
    data = load_split("digits", "train")
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = data.get(torch.randint(0, len(data), (64,), generator=g))
        loss = sum(torch.nn.functional.cross_entropy(m(x), y) for m in model.members)
        opt.zero_grad()
        loss.backward()
        opt.step()
    RunDir(root, name).save_final(model.eval(), entry)
