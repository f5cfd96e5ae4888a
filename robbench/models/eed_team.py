"""``eed_team``: an EED team as one network -- ``size`` sub-networks of ``base_arch`` (the pruned
sub-models, masks included once the entry sets ``model.transform = 'masked'``) and one of two
inference rules (EED §4.4):

- ``inference = 'mean'``: the full team, log of the mean member probability (EED's average combiner
  h = mean of the members' probabilities, §4.2);
- ``inference = 'die'``: the Dynamic Inference Ensemble (Eqs. 20-22). Members are added in order; after
  member t the running mean y^t of the probabilities gives the early-stop decision q_t, and the sample's
  output is the mean of its first z members. EED leaves q_t's form unspecified; the reading used here
  (notes §B) is binary: q_t = 1[max y^t >= tau_conf and (t = 1 or KL(y^t || y^{t-1}) <= tau_kl)], the
  last member always stops, so z = the first t that passes (a Wisdom-of-Committees cascade, WoC ref [41]).

The combiner (``combiner``) is how the members' outputs become the team's: ``'mean'`` (default; §4.2
"the final output is calculated using the average combiner", the mean of member probabilities) or
``'max'`` (supp. B.4 / Table 7 "the maximum combiner"). The extracted text loses B.4's formula; the
reading is the per-class max (Kuncheva's maximum rule) over the same member outputs the average combines,
i.e. probabilities: m_j = max_i p_i^j, renormalised to a distribution (``max_of = 'probs'``, default);
``max_of = 'logits'`` is the per-class max of the logits, then softmax. The renormalisation changes no
prediction and is what a cross-entropy on the output computes anyway; it makes DIE's confidence and KL
read a distribution. DIE uses the same combiner for y^t (the running combination of the first t members).

DIE runs member t only on the samples still undecided, so its cost per sample is the number of members
it evaluated (``last_members_used``). Gradients flow through each sample's chosen prefix; the stopping
decision is computed without gradient (treated as fixed), which is what an attack on the deployed model
sees. The thresholds are robbench's defaults (the paper gives none).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from robbench.config import opt
from robbench.data.info import DatasetInfo
from robbench.errors import ConfigError
from robbench.registry import ARCHITECTURES

LOG_CLAMP = 1e-40  # as robbench.models.ensemble (DVERGE models/ensemble.py)


@dataclass
class TeamOptions:
    base_arch: str = opt("resnet18", registry="architectures", help="architecture of every sub-model "
                                                                     "(EED §5.1: ResNet-18 / VGG-16)")
    base_options: dict[str, Any] = opt({}, help="the base architecture's model.options")
    size: int = opt(2, min=1, max=64, help="team size (the RD selection's team)")
    inference: Literal["mean", "die"] = opt("die", help="'mean': full team; 'die': dynamic inference (§4.4)")
    tau_conf: float = opt(0.9, min=0.0, max=1.0, help="DIE: stop when max mean probability >= tau_conf "
                                                      "(robbench default; EED gives no value)")
    tau_kl: float = opt(0.1, min=0.0, help="DIE: and KL(y^t || y^{t-1}) <= tau_kl (robbench default; EED gives none)")
    combiner: Literal["mean", "max"] = opt("mean", help="'mean': average of member probabilities (EED §4.2); "
                                                        "'max': per-class max (supp. B.4, Table 7)")
    max_of: Literal["probs", "logits"] = opt("probs", help="max combiner: per-class max of probabilities "
                                                           "(default reading) or of logits; renormalised")

    def validate(self, file: str) -> None:
        if self.base_arch == "eed_team":
            raise ConfigError("a team cannot be made of teams", file=file, field="model.options.base_arch")


class TeamNet(nn.Module):
    def __init__(self, nets: list[nn.Module], options: TeamOptions) -> None:
        super().__init__()
        self.nets = nn.ModuleList(nets)
        self.options = options
        self.last_members_used: torch.Tensor | None = None

    @property
    def inference(self) -> str:
        return self.options.inference

    def member_logits(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [net(x) for net in self.nets]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.options.inference == "mean":
            logits = self.member_logits(x)
            self.last_members_used = torch.full((x.shape[0],), len(self.nets), device=x.device)
            if self.options.combiner == "max":
                return combine_max(logits, self.options.max_of)
            probs = torch.stack([F.softmax(z, dim=1) for z in logits]).mean(0)
            return torch.log(probs.clamp_min(LOG_CLAMP))
        return self.dynamic(x)

    def dynamic(self, x: torch.Tensor) -> torch.Tensor:
        """DIE: per-sample prefix of the team (see the module docstring)."""
        o = self.options
        n, last = x.shape[0], len(self.nets) - 1
        active = torch.arange(n, device=x.device)
        out: torch.Tensor | None = None
        used = torch.zeros(n, dtype=torch.long, device=x.device)
        # running state of the active samples: the sum of probabilities (mean combiner) or the per-class
        # max of probabilities / logits (max combiner)
        carry: torch.Tensor | None = None
        prev: torch.Tensor | None = None   # previous running combination (no grad)
        use_max, of_logits = o.combiner == "max", o.max_of == "logits"
        for t, net in enumerate(self.nets):
            z = net(x[active])
            if use_max:
                p = z if of_logits else F.softmax(z, dim=1)
                total = p if carry is None else torch.maximum(carry, p)
                mean = F.softmax(total, dim=1) if of_logits else total / total.sum(1, keepdim=True)
            else:
                p = F.softmax(z, dim=1)
                total = p if carry is None else carry + p
                mean = total / (t + 1)
            if t == last:
                stop = torch.ones(len(active), dtype=torch.bool, device=x.device)
            else:
                with torch.no_grad():
                    md = mean.detach()
                    stop = md.max(dim=1).values >= o.tau_conf
                    if prev is not None:
                        kl = (md * (md.clamp_min(1e-12).log() - prev.clamp_min(1e-12).log())).sum(1)
                        stop &= kl <= o.tau_kl
            if out is None:
                out = mean.new_zeros((n, mean.shape[1]))
            rows = active[stop]
            out = out.index_put((rows,), mean[stop])
            used[rows] = t + 1
            keep = ~stop
            active, carry, prev = active[keep], total[keep], mean.detach()[keep]
            if active.numel() == 0:
                break
        self.last_members_used = used
        assert out is not None
        return torch.log(out.clamp_min(LOG_CLAMP))


def combine_max(logits: list[torch.Tensor], max_of: str = "probs") -> torch.Tensor:
    """The max combiner as log-probabilities: per-class max over members of the probabilities
    (``'probs'``) or of the logits (``'logits'``), renormalised (module docstring)."""
    stacked = torch.stack(logits)
    if max_of == "logits":
        return F.log_softmax(stacked.amax(0), dim=1)
    m = F.softmax(stacked, dim=2).amax(0)
    return torch.log((m / m.sum(1, keepdim=True)).clamp_min(LOG_CLAMP))


@ARCHITECTURES.register("eed_team", params=TeamOptions)
def eed_team(spec: Any, info: DatasetInfo, options: TeamOptions | None = None) -> nn.Module:
    """``size`` networks of ``base_arch`` (same ModelSpec otherwise) in one :class:`TeamNet`."""
    from robbench.config import parse_dataclass
    from robbench.models.build import build_network

    o = options or TeamOptions()
    base_spec = dataclasses.replace(spec, arch=o.base_arch, options=dict(o.base_options), transform=None,
                                    transform_options={})
    params_cls = ARCHITECTURES.params(o.base_arch)
    base_params = (parse_dataclass(params_cls, dict(o.base_options), file="model.options.base_options",
                                   prefix="model.options.base_options") if params_cls is not None else None)
    return TeamNet([build_network(base_spec, info, base_params) for _ in range(o.size)], o)


def find_team(model: nn.Module) -> TeamNet:
    for m in model.modules():
        if isinstance(m, TeamNet):
            return m
    raise ConfigError("the model is not an EED team; allowed: model.arch = 'eed_team'", field="model.arch")
