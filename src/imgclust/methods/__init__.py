"""Clustering methods, one recipe per paper, registered by name (``get_method("kmeans")``)."""

from imgclust.methods import kmeans  # noqa: F401  (registers "kmeans")
from imgclust.methods import temi  # noqa: F401  (registers "temi", "icce-heads")
from imgclust.methods.base import (
    ClusteringMethod,
    FitContext,
    MethodConfig,
    available_methods,
    get_method,
    register_method,
)

__all__ = ["ClusteringMethod", "FitContext", "MethodConfig", "available_methods", "get_method", "register_method"]
