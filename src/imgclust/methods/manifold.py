"""Manifold-then-cluster baselines: ``umap-kmeans`` (N2D) and ``spectral-kmeans``.

N2D (McConville et al., "N2D: (Not Too) Deep Clustering via Clustering the Local Manifold
of an Autoencoded Embedding", ICPR 2020, sec. 3): embed with UMAP (min_dist 0, a few
dimensions = number of clusters), then cluster the embedding with a GMM (or k-means). Here
on frozen backbone features instead of an autoencoder's codes; the issue's notebook
baseline (UMAP 10-d, cosine, n_neighbors 30, min_dist 0, k-means) is ``umap-kmeans`` with
its defaults. ``spectral-kmeans`` swaps UMAP for the cheaper kNN-graph Laplacian
eigenmap (:mod:`imgclust.reduce`), which is spectral clustering (Ng, Jordan & Weiss 2001).

Additions (each an option, all label-free):

* ``runs=R`` — R embeddings with seeds seed..seed+R-1 (UMAP's layout is stochastic: the
  issue measured 0.571 vs 0.532 ACC for two seeds), each clustered; the R labellings are
  combined by the cluster-ensemble consensus of :mod:`imgclust.consensus` (ICCE stage 2,
  candidate with the best ANMI wins).
* ``power=0.5&centre=true`` — the embedding's input: signed square root of the features, mean
  removed (:func:`embedding_input`); the embedding alone sees it.
* ``self_train`` (default on) — ICCE stage 3: a linear classifier on the *original*
  features learns the (consensus) labels (:func:`imgclust.refine.selftrain.self_train`,
  its setting chosen on held-out pseudo-labels); its predictions are the final clustering
  and classify new images (features -> K probabilities, no embedding needed), so a saved
  model is a linear layer. With ``self_train=false`` the fitted images keep the
  embedding's clustering and new images go to the nearest cluster mean (cosine, softmax
  at temperature 0.05 as ``kmeans``) in the original feature space.

Every run's reduced features are cached beside the feature cache (``FitContext.work_dir``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from annotated_types import Ge, Gt, Interval, MinLen

from imgclust.configcheck import OneOf, option
from imgclust.consensus import METHODS as CONSENSUS_METHODS
from imgclust.errors import InputError
from imgclust.methods.base import ClusteringMethod, FitContext, MethodConfig, l2_normalize, register_method, softmax
from imgclust.reduce import ReduceSpec, reduce_features
from imgclust.refine.selftrain import DEFAULT_LRS, DEFAULT_WDS, LinearClassifier, self_train


@dataclass
class ManifoldConfig(MethodConfig):
    reduce: str = "umap:10"  # umap:D | spectral:D
    pca: int = option(0, Ge(0))  # > 0: PCA (seeded, fixed) to this many dims before the embedding (UMAP's cost ~ N x D)
    n_neighbors: int = option(30, Ge(1))  # UMAP neighbourhood
    min_dist: float = option(0.0, Interval(ge=0, le=1))  # UMAP (N2D: 0; UMAP needs min_dist <= spread = 1)
    # The embedding's input (issue 18, session 6): signed power normalisation sign(x)|x|^power, then the mean
    # removed when ``centre``. Only the embedding sees it; self-training and new images use the features as
    # they are. See embedding_input.
    power: float = option(1.0, Interval(gt=0, le=1))
    centre: bool = False
    graph_k: int = option(15, Ge(1))  # spectral: kNN graph degree
    clusterer: str = option("kmeans", OneOf(("kmeans", "gmm")))  # kmeans | gmm (N2D's choice)
    n_init: int = option(10, Ge(1))  # k-means restarts / GMM initialisations
    runs: int = option(1, Ge(1))  # embeddings (seeds) combined by consensus when > 1
    consensus: list[str] = option(["hbgf", "mcla"], MinLen(1), each=OneOf(CONSENSUS_METHODS))
    self_train: bool = True  # linear classifier on the original features: final labels + new images
    st_epochs: int = option(30, Ge(1))
    # runs > 1: self-train only on the images where every run agrees with the consensus
    # (imgclust.refine.confident; issue 18 session 3, chosen on CIFAR-10 train)
    st_confident: bool = False
    st_lrs: list[float] = option(list(DEFAULT_LRS), MinLen(1), each=Gt(0))
    st_weight_decays: list[float] = option(list(DEFAULT_WDS), MinLen(1), each=Ge(0))

    def __post_init__(self) -> None:
        super().__post_init__()  # the ranges declared above (imgclust.configcheck)
        spec = ReduceSpec.parse(self.reduce)
        if spec.kind == "none":
            raise InputError("this method needs reduce=umap:D or spectral:D")

    def spec(self) -> ReduceSpec:
        s = ReduceSpec.parse(self.reduce)
        return ReduceSpec(s.kind, s.dim, n_neighbors=self.n_neighbors, min_dist=float(self.min_dist),
                          graph_k=self.graph_k)


def cluster_embedding(z: np.ndarray, k: int, clusterer: str, n_init: int, seed: int) -> np.ndarray:
    """k-means (scikit-learn, ``n_init`` restarts) or a full-covariance GMM on the embedding."""
    if clusterer == "gmm":
        from sklearn.mixture import GaussianMixture

        return GaussianMixture(k, covariance_type="full", n_init=n_init, random_state=seed).fit(z).predict(z)
    from sklearn.cluster import KMeans

    return KMeans(k, n_init=n_init, random_state=seed).fit_predict(z)


def embedding_input(x: np.ndarray, power: float = 1.0, centre: bool = False) -> np.ndarray:
    """``sign(x) |x|^power``, minus its mean when ``centre`` (float32; ``x`` itself when neither applies).

    Pooled CNN features are non-negative and share a large common direction: on CIFAR-10 train
    (EfficientNet-Lite0) the mean cosine of an image to the mean feature is 0.68, so cosine
    neighbourhoods are measured mostly along a direction every image has. The square root (power
    normalisation, Perronnin et al. ECCV 2010; RootSIFT's Hellinger map) damps the few dominant
    activations and centring removes the common part. 10-NN label agreement on 15k train images:
    CIFAR-10 0.622 -> 0.645, Fashion-MNIST 0.822 -> 0.828 (``docs/notes/issue-18.md``, session 6).
    """
    if power == 1.0 and not centre:
        return x
    z = np.asarray(x, dtype=np.float32)
    if power != 1.0:
        z = np.sign(z) * np.abs(z) ** np.float32(power)
    if centre:
        z = z - z.mean(0, dtype=np.float64).astype(np.float32)
    return np.ascontiguousarray(z, dtype=np.float32)


def pca_project(x: np.ndarray, dim: int) -> np.ndarray:
    """Top-``dim`` principal components of L2-normalised ``x`` (fixed seed: same input -> same
    output, so the reduce cache hits across the method's seeds). Cosine geometry is kept
    approximately; the UMAP layout then costs ~dim/D of the full-width kNN search."""
    from sklearn.decomposition import PCA

    from imgclust.neighbors import l2_normalize

    z = PCA(dim, svd_solver="randomized", random_state=0).fit_transform(l2_normalize(x).astype(np.float64))
    return np.ascontiguousarray(z, dtype=np.float32)


@register_method
class UMAPKMeans(ClusteringMethod):
    """Embed (UMAP / spectral), cluster (k-means / GMM), optionally ensemble + self-train."""

    name = "umap-kmeans"
    Config = ManifoldConfig
    config: ManifoldConfig

    def __init__(self, n_clusters: int, config: ManifoldConfig | dict | None = None) -> None:
        super().__init__(n_clusters, config)
        self.classifier_: LinearClassifier | None = None
        self.run_labels_: np.ndarray | None = None  # (R, N) clustering of every embedding
        self.cluster_labels_: np.ndarray | None = None
        self.embedding_: np.ndarray | None = None  # the first run's embedding (for the selector / report)
        self.centroids_: np.ndarray | None = None  # self_train=false: cluster means (L2-normalised features)
        self._fit_digest: str | None = None

    def fit(self, features: np.ndarray, ctx: FitContext) -> UMAPKMeans:
        cfg, k = self.config, self.n_clusters
        x = np.ascontiguousarray(features, dtype=np.float32)
        if len(x) < max(k, 4):
            raise InputError(f"K={k} needs at least {max(k, 4)} images for {self.name}; got {len(x)}")
        spec = cfg.spec()
        self.history_ = {}
        xr = embedding_input(x, cfg.power, cfg.centre)
        if xr is not x:
            self.history_["embedding_input"] = {"power": cfg.power, "centre": cfg.centre}
        if 0 < cfg.pca < min(x.shape):
            xr = pca_project(xr, cfg.pca)
            self.history_["pca"] = cfg.pca
        if spec.dim >= xr.shape[1]:
            spec = ReduceSpec(spec.kind, max(1, xr.shape[1] - 1), spec.n_neighbors, spec.min_dist, spec.metric,
                              spec.graph_k)
        t0 = time.perf_counter()
        runs, infos = [], []
        for r in range(cfg.runs):
            z, info = reduce_features(xr, spec, seed=int(ctx.seed) + r, cache_dir=ctx.work_dir, progress=ctx.progress)
            if r == 0:
                self.embedding_ = z
            runs.append(cluster_embedding(z, k, cfg.clusterer, cfg.n_init, int(ctx.seed) + r))
            infos.append(info)
        self.run_labels_ = np.stack(runs).astype(np.int32)
        self.history_.update({"reduce": infos, "reduce_cluster_s": round(time.perf_counter() - t0, 3)})
        if cfg.runs > 1:
            from imgclust.consensus import consensus

            res = consensus(self.run_labels_, k, methods=cfg.consensus, seed=ctx.seed, progress=ctx.progress)
            labels = res.labels.astype(np.int64)
            self.history_["consensus"] = res.summary()
        else:
            labels = self.run_labels_[0].astype(np.int64)
        self.cluster_labels_ = labels
        self.labels_ = labels
        if cfg.self_train and cfg.st_confident and cfg.runs > 1:
            from imgclust.refine.confident import confident_self_train

            cr = confident_self_train(x, self.run_labels_, labels, k, epochs=cfg.st_epochs, lrs=tuple(cfg.st_lrs),
                                      weight_decays=tuple(cfg.st_weight_decays), seed=ctx.seed, progress=ctx.progress)
            self.classifier_ = cr.classifier
            self.history_["self_training"] = {"confident_share": round(cr.confident_share, 4),
                                              "fallback_to_all": cr.fallback,
                                              "agreement_with_clustering": float((cr.labels == labels).mean())}
            self.labels_ = cr.labels
        elif cfg.self_train:
            st = self_train(x, labels, k, lrs=tuple(cfg.st_lrs), weight_decays=tuple(cfg.st_weight_decays),
                            epochs=cfg.st_epochs, seed=ctx.seed, progress=ctx.progress)
            self.classifier_ = st.classifier
            pred = self.classifier_.predict_proba(x).argmax(1)
            self.history_["self_training"] = {"lr": st.lr, "weight_decay": st.weight_decay,
                                              "seconds": round(st.seconds, 3),
                                              "agreement_with_clustering": float((pred == labels).mean())}
            self.labels_ = pred.astype(np.int64)
        else:
            from imgclust.neighbors import features_digest

            xn = l2_normalize(x)
            c = np.stack([xn[labels == j].mean(0) if (labels == j).any() else np.zeros(x.shape[1], np.float32)
                          for j in range(k)])
            self.centroids_ = l2_normalize(c)
            self._fit_digest = features_digest(x)
        return self

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        x = np.asarray(features, dtype=np.float32)
        if self.classifier_ is not None:
            return self.classifier_.predict_proba(x).astype(np.float32)
        if self.centroids_ is None:
            raise InputError(f"this {self.name} model is not fitted yet")
        if self._fit_digest is not None and self.labels_ is not None and len(x) == len(self.labels_):
            from imgclust.neighbors import features_digest

            if features_digest(x) == self._fit_digest:  # the fitted images keep their clustering
                return np.eye(self.n_clusters, dtype=np.float32)[self.labels_]
        return softmax((l2_normalize(x) @ self.centroids_.T / 0.05).astype(np.float64)).astype(np.float32)

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.classifier_ is None:
            return {"centroids": torch.from_numpy(np.asarray(self.centroids_, dtype=np.float32))}
        return self.classifier_.state_dict("clf.")

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if "clf.weight" not in state:
            c = state.get("centroids")
            if not isinstance(c, torch.Tensor) or c.ndim != 2 or c.shape[0] != self.n_clusters:
                raise InputError(f"not a {self.name} state: clf.weight or centroids (K, D) missing")
            self.centroids_ = c.numpy().astype(np.float32)
            return
        clf = LinearClassifier.from_state_dict(state, "clf.")
        if clf.weight.shape[1] != self.n_clusters:
            raise InputError(f"saved classifier has {clf.weight.shape[1]} classes, expected {self.n_clusters}")
        self.classifier_ = clf


@dataclass
class SpectralConfig(ManifoldConfig):
    reduce: str = "spectral:10"


@register_method
class SpectralKMeans(UMAPKMeans):
    """Spectral clustering: Laplacian eigenmap of the cosine kNN graph, then k-means."""

    name = "spectral-kmeans"
    Config = SpectralConfig
    config: SpectralConfig
