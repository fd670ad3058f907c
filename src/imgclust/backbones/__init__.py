"""Feature extractors: a registry of frozen backbones, each with its preprocessing."""

from imgclust.backbones.base import Backbone, BackboneInfo, Preprocess
from imgclust.backbones.registry import (
    available_backbones,
    build_backbone,
    get_backbone_info,
    register_backbone,
)
from imgclust.backbones.weights import load_state_dict

__all__ = [
    "Backbone",
    "BackboneInfo",
    "Preprocess",
    "available_backbones",
    "build_backbone",
    "get_backbone_info",
    "load_state_dict",
    "register_backbone",
]
