"""``gal``: Gradient Alignment Loss (Kariyappa & Qureshi 2019), as ported in DVERGE ``train/train_gal.py``.

g_i = ∂CE(f_i(x), y)/∂x on the [0, 1] input (double backprop, ``create_graph=True``);
coh = mean_batch log(Σ_{a<b} exp(cos(g_a, g_b)) + 1e-20); loss = Σ_i CE_i / M + λ·coh (+ Σ_i CE_adv,i / M
with ``plus_adv``). λ = 0.5 (DVERGE arguments.py gal_train_args --lambda 0.5). Members use
LeakyReLU(0.1) (set in the zoo entry's model table). The training data gets Gaussian noise, std 0.045,
per sample with probability 0.5 and no clamping (DVERGE utils.py ``AddGaussianNoise(0., 0.045)``, applied
after ToTensor). One joint Adam (lr 1e-3, wd 1e-4, eps 1e-7; train_gal.py), set in the zoo entry.

``clean_ce_second_forward``: the reference computes the CE term with a second forward on the detached
input (train_gal.py: ``self.criterion(m(inputs.clone().detach()), targets)``). That gives the same
parameter gradients as reusing the first forward; the only difference is one more BatchNorm running-
statistics update per member. Default True = reference; False saves one forward per member.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from robbench.config import opt
from robbench.registry import METHODS
from robbench.train.methods.base import Batch, Method
from robbench.train.methods.advt import AdvOptions, pgd

if TYPE_CHECKING:
    from robbench.train.loop import TrainContext

LOG_OFFSET = 1e-20  # train_gal.py self.log_offset


@dataclass
class GALOptions(AdvOptions):
    lam: float = opt(0.5, min=0.0, help="coherence weight lambda (DVERGE arguments.py --lambda 0.5)")
    noise_std: float = opt(0.045, min=0.0, help="Gaussian input noise std (DVERGE utils.py AddGaussianNoise)")
    noise_prob: float = opt(0.5, min=0.0, max=1.0, help="per-sample probability of the noise (AddGaussianNoise prob .5)")
    clean_ce_second_forward: bool = opt(True, help="CE from a second forward on the detached input (reference)")
    plus_adv: bool = opt(False, help="add mean CE on PGD examples against the ensemble (reference --plus-adv)")


def gal_coherence(grads: torch.Tensor) -> torch.Tensor:
    """mean_b log(Σ_{a<b} exp(cos(g_a, g_b)) + 1e-20) for input gradients ``grads`` [M, B, D]."""
    m = grads.shape[0]
    if m < 2:
        raise ValueError("GAL needs at least two members")
    sims = [F.cosine_similarity(grads[a], grads[b], dim=-1) for a in range(m) for b in range(a + 1, m)]
    cos = torch.stack(sims, dim=-1)  # [B, pairs]
    return torch.log(cos.exp().sum(dim=-1) + LOG_OFFSET).mean()


def add_gaussian_noise(x: torch.Tensor, std: float, prob: float) -> torch.Tensor:
    """x + N(0, std²) on each sample with probability ``prob`` (global torch RNG; no clamp, as the reference)."""
    if std == 0 or prob == 0:
        return x
    pick = (torch.rand(x.shape[0], device=x.device) < prob).to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
    return x + pick * torch.randn_like(x) * std


@METHODS.register("gal", params=GALOptions)
class GAL(Method):
    def step(self, ctx: "TrainContext", batch: Batch) -> dict[str, float]:
        o: GALOptions = self.options
        x = add_gaussian_noise(batch.x, o.noise_std, o.noise_prob)
        y = batch.y
        # Reference order: PGD first (train_gal.py), on the noisy input.
        x_adv = pgd(ctx.model, ctx.model, x, y, o) if o.plus_adv else None
        x_in = x.detach().clone().requires_grad_(True)
        grads, ces, advs = [], [], []
        for m in ctx.members:
            ce = F.cross_entropy(m(x_in), y)
            grads.append(torch.autograd.grad(ce, x_in, create_graph=True)[0].flatten(1))
            ces.append(F.cross_entropy(m(x.detach()), y) if o.clean_ce_second_forward else ce)
            if x_adv is not None:
                advs.append(F.cross_entropy(m(x_adv), y))
        coh = gal_coherence(torch.stack(grads))
        n = len(ctx.members)
        ce_sum = sum(ces)
        loss = ce_sum / n + o.lam * coh
        out = {"ce": float(ce_sum.detach()) / n, "coherence": float(coh.detach())}
        if advs:
            adv = sum(advs)
            loss = loss + adv / n
            out["adv_ce"] = float(adv.detach()) / n
        ctx.update(loss)
        out["loss"] = float(loss.detach())
        return out
