"""SGM as an explicit residual gradient scale == the backward-hook formulation of
csdongxian/skip-connections-matter utils_sgm.py, up to one positive factor per batch."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robbench.attacks import iterative_attack, make_attack, sgm_blocks, skip_gradient
from robbench.errors import ConfigError

torch.set_num_threads(1)
# the reference formulation uses legacy module backward hooks on purpose
pytestmark = pytest.mark.filterwarnings("ignore:Using a non-full backward hook")


class _Scale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gamma):  # type: ignore[override]
        ctx.gamma = gamma
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        return g * ctx.gamma, None


class Basic(nn.Module):
    """ResNet-18 BasicBlock shape: one ``self.relu`` used after conv1 and after the addition."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1)
        self.relu = nn.ReLU()
        self.shortcut = nn.Identity() if stride == 1 and cin == cout else nn.Conv2d(cin, cout, 1, stride)
        self.sgm_gamma = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(self.relu(self.conv1(x)))
        return self.relu(_Scale.apply(out, self.sgm_gamma) + self.shortcut(x))


class Bottle(nn.Module):
    """torchvision Bottleneck shape: one ``self.relu`` used three times."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        mid = cout // 2
        self.conv1 = nn.Conv2d(cin, mid, 1)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1)
        self.conv3 = nn.Conv2d(mid, cout, 1)
        self.relu = nn.ReLU()
        self.shortcut = nn.Identity() if stride == 1 and cin == cout else nn.Conv2d(cin, cout, 1, stride)
        self.sgm_gamma = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv3(self.relu(self.conv2(self.relu(self.conv1(x)))))
        return self.relu(_Scale.apply(out, self.sgm_gamma) + self.shortcut(x))


class Net(nn.Module):
    def __init__(self, block: type[nn.Module]) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 1, 1)
        self.relu = nn.ReLU()  # the reference hooks the stem ReLU too
        self.layer1 = nn.Sequential(block(8, 8, 1), block(8, 8, 1))
        self.layer2 = nn.Sequential(block(8, 16, 2), block(16, 16, 1), block(16, 16, 1))
        self.fc = nn.Linear(16, 10)
        self.sgm_bottleneck = block is Bottle

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(self.relu(self.conv1(x))))
        return self.fc(x.mean(dim=(2, 3)))


def reference_hooks(model: nn.Module, gamma: float, bottleneck: bool) -> list:
    """utils_sgm.py register_hook_for_resnet (latest version), legacy backward hooks."""
    if bottleneck:
        gamma = gamma ** 0.5

    def sgm_hook(module, grad_in, grad_out):
        if isinstance(module, nn.ReLU):
            return (gamma * grad_in[0],)

    def norm_hook(module, grad_in, grad_out):
        return (grad_in[0] / torch.std(grad_in[0]),)

    handles = []
    for name, module in model.named_modules():
        if "relu" in name and "0.relu" not in name:
            handles.append(module.register_backward_hook(sgm_hook))
        if len(name.split(".")) >= 2 and "layer" in name.split(".")[-2]:
            handles.append(module.register_backward_hook(norm_hook))
    return handles


def input_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    xi = x.clone().requires_grad_(True)
    return torch.autograd.grad(F.cross_entropy(model(xi), y, reduction="sum"), xi)[0]


def same_up_to_a_factor(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-9) -> bool:
    c = (a * b).sum() / (b * b).sum()
    return bool(c > 0) and bool(torch.allclose(a, c * b, rtol=tol, atol=tol * a.abs().max().item()))


def _data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(6, 3, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 10, (6,), generator=g)


@pytest.mark.parametrize("block", [Basic, Bottle])
def test_explicit_sgm_equals_reference_hooks(block):
    torch.manual_seed(0)
    model = Net(block).double().eval()
    x, y = _data()
    gamma = 0.2
    plain = input_grad(model, x, y)
    handles = reference_hooks(model, gamma, bottleneck=block is Bottle)
    try:
        ref = input_grad(model, x, y)
    finally:
        for h in handles:
            h.remove()
    with skip_gradient(model, gamma, blocks="reference"):
        ours = input_grad(model, x, y)
    assert same_up_to_a_factor(ref, ours)
    assert torch.equal(ref.sign(), ours.sign())
    assert not same_up_to_a_factor(plain, ours, tol=1e-3)  # SGM changes the direction
    # gamma on all blocks is a different (paper-wide) choice: not the reference's name rule
    with skip_gradient(model, gamma, blocks="all"):
        assert not same_up_to_a_factor(ref, input_grad(model, x, y), tol=1e-3)
    if block is Bottle:  # sqrt(gamma) belongs to the hook formulation only (its ReLU count)
        with skip_gradient(model, gamma ** 0.5, blocks="reference"):
            assert not same_up_to_a_factor(ref, input_grad(model, x, y), tol=1e-3)


def test_skip_gradient_restores_and_validates():
    model = Net(Basic)
    model.layer1[1].sgm_gamma = 0.7
    with skip_gradient(model, 0.2):
        assert all(m.sgm_gamma == 0.2 for _, m in sgm_blocks(model))
    assert model.layer1[1].sgm_gamma == 0.7 and model.layer2[0].sgm_gamma == 1.0
    with pytest.raises(RuntimeError):
        with skip_gradient(model, 0.2):
            raise RuntimeError("boom")
    assert model.layer2[2].sgm_gamma == 1.0
    names = [n for n, _ in sgm_blocks(model, "reference")]
    assert names == ["layer1.1", "layer2.1", "layer2.2"]
    with pytest.raises(ConfigError, match="residual blocks"):
        with skip_gradient(nn.Sequential(nn.Flatten(), nn.Linear(192, 10)), 0.2):
            pass
    with pytest.raises(ConfigError, match="sgm_gamma"):
        with skip_gradient(model, 0.0):
            pass


def test_robbench_resnet20_sgm_equals_reference_hooks():
    """The same check on the project's ResNet-20 (its blocks reuse one ReLU like ResNet-18)."""
    from robbench.config import ModelSpec
    from robbench.data.info import INFOS
    from robbench.models.build import build_network

    torch.manual_seed(0)
    model = build_network(ModelSpec(arch="resnet20", width=0.5), INFOS["cifar10"]).double().eval()
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(4, 3, 32, 32, generator=g, dtype=torch.float64), torch.randint(0, 10, (4,), generator=g)
    handles = reference_hooks(model, 0.2, bottleneck=False)
    try:
        ref = input_grad(model, x, y)
    finally:
        for h in handles:
            h.remove()
    with skip_gradient(model, 0.2, blocks="reference"):
        ours = input_grad(model, x, y)
    assert same_up_to_a_factor(ref, ours, tol=1e-7)


def test_registered_sgm_attack_uses_and_restores_gamma():
    torch.manual_seed(0)
    model = Net(Basic).eval()
    x, y = torch.rand(8, 3, 8, 8), torch.randint(0, 10, (8,))
    seen = []
    orig = model.forward

    def spy(t: torch.Tensor) -> torch.Tensor:
        seen.append(model.layer1[1].sgm_gamma)
        return orig(t)

    model.forward = spy  # type: ignore[method-assign]
    res = make_attack("pgd", steps=3, sgm_gamma=0.2, init="none")(model, x, y, 0.05)
    assert seen and all(s == 0.2 for s in seen[:3])
    assert model.layer1[1].sgm_gamma == 1.0
    plain = iterative_attack(model, x, y, 0.05, steps=3, step_size=0.01, init="none")
    assert not torch.equal(res.x_adv, plain.x_adv)
    with pytest.raises(ConfigError, match="nn.Module"):
        make_attack("pgd", steps=1, sgm_gamma=0.2)(lambda t: model(t), x, y, 0.05)
