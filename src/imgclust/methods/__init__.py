"""Clustering methods, one recipe per paper, registered by name (``get_method("kmeans")``)."""

from imgclust.methods import (
    auto,  # noqa: F401  (registers "auto"; imports the others on first use)
    icbpl,  # noqa: F401  (registers "icbpl")
    icce,  # noqa: F401  (registers "icce")
    icsr,  # noqa: F401  (registers "icsr")
    kmeans,  # noqa: F401  (registers "kmeans")
    manifold,  # noqa: F401  (registers "umap-kmeans", "spectral-kmeans")
    pici,  # noqa: F401  (registers "pici", "cc")
    reviewed,  # noqa: F401  (registers "reviewed": apply-edits' model, issue 21)
    spice,  # noqa: F401  (registers "spice-self", "spice")
    temi,  # noqa: F401  (registers "temi", "icce-heads")
)
from imgclust.methods.base import (
    ClusteringMethod,
    FitContext,
    MethodConfig,
    available_methods,
    get_method,
    register_method,
)

__all__ = ["ClusteringMethod", "FitContext", "MethodConfig", "available_methods", "get_method", "register_method"]
