"""Architectures, ensembles, feature taps and shared layers. Importing this registers every architecture."""
from robbench.models import resnet, user_code, vgg  # noqa: F401  (registers the architectures and the user-factory schemes)
from robbench.models.build import build_model, build_network, count_parameters
from robbench.models.ensemble import COMBINES, Ensemble, combine_logits
from robbench.models.features import FeatureTap, feature_layers, get_features, num_feature_layers
from robbench.models.layers import (
    GlobalAvgPool,
    MixtureBN,
    Normalize,
    bn_route,
    grad_scale,
    make_activation,
    make_norm,
    set_bn_route,
)

__all__ = [
    "COMBINES", "Ensemble", "FeatureTap", "GlobalAvgPool", "MixtureBN", "Normalize", "bn_route",
    "build_model", "build_network", "combine_logits", "count_parameters", "feature_layers",
    "get_features", "grad_scale", "make_activation", "make_norm", "num_feature_layers", "set_bn_route",
]
