"""``model.transform = 'xie'``: how a Xie & Yuille (ICLR 2020) network is deployed.

Two plain settings of the built network, fixed by the zoo entry (so they are part of the resolved
config recorded in every run's manifest, and every evaluation rebuilds the same deployment):

- ``deploy_route``: with ``model.norm_layer = 'mbn'`` (mixture BN, paper §4.2), which BatchNorm set
  runs at test time -- "we measure the performance of networks by applying either MBN_adv or
  MBN_clean separately" (Table 1). Every MixtureBN is routed to it after building, so evaluation
  (clean accuracy and every attack) runs, and attacks, the deployed branch. Training switches routes
  per image type and restores this one after each step. Deploying the other branch of the same
  weights is its own entry: ``train.init_from`` the trained entry with ``train.epochs = 0``.
- ``input_normalization``: 'reference' replaces the model's input normalization by
  (x - 0.5) / 0.5, i.e. pixels in [-1, 1] as ImageNet-Adversarial-Training ``adv_model.py``
  ``image_preprocess`` (``image * 2/255 - 1``, no per-channel mean/std); 'keep' leaves
  ``model.normalization`` as configured.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

from robbench.config import opt
from robbench.errors import ConfigError
from robbench.models.layers import MixtureBN, Normalize, set_bn_route
from robbench.registry import MODEL_TRANSFORMS


@dataclass
class XieModelOptions:
    # Paper §4.2 / Tables 1-2: MBN_adv is the robust deployment the paper reports ("report MBN_adv").
    deploy_route: Literal["adv", "clean"] = opt(
        "adv", help="mixture BN: the BatchNorm set used at test time (paper Table 1: MBN_adv or MBN_clean)")
    # adv_model.py AdvImageNetModel.image_preprocess: image * IMAGE_SCALE - 1.0 with IMAGE_SCALE = 2/255.
    input_normalization: Literal["reference", "keep"] = opt(
        "reference", help="'reference': (x - 0.5) / 0.5, inputs in [-1, 1] (adv_model.py); 'keep': model.normalization")


def deployed_route(net: nn.Module) -> str | None:
    """The route every MixtureBN of ``net`` is on (None without MixtureBN); mixed routes are an error."""
    routes = {m.route for m in net.modules() if isinstance(m, MixtureBN)}
    if len(routes) > 1:
        raise ValueError(f"MixtureBN layers are on different routes: {sorted(routes)}")
    return routes.pop() if routes else None


@MODEL_TRANSFORMS.register("xie", params=XieModelOptions)
def xie_transform(net: nn.Module, options: XieModelOptions | None = None, info: Any = None,
                  **_: Any) -> nn.Module:
    """Apply :class:`XieModelOptions` to one freshly built member (in place; returns it)."""
    o = options or XieModelOptions()
    if o.input_normalization == "reference":
        if not isinstance(getattr(net, "normalize", None), (Normalize, nn.Identity)):
            raise ConfigError("input_normalization = 'reference' needs an architecture with an input "
                              "normalization layer ('normalize'); allowed here: 'keep'",
                              field="model.transform_options.input_normalization")
        channels = int(info.in_channels) if info is not None else 3
        net.normalize = Normalize([0.5] * channels, [0.5] * channels)
    set_bn_route(net, o.deploy_route)  # no-op (0 layers) for BN/GN models
    return net
