"""PEDCC: predefined evenly-distributed class centroids on the unit hypersphere of R^d.

ICAE, ICBPC and ICBPL (Zhu, Hu et al.) fix the K cluster centres *before* training: K unit
vectors c_1..c_K in the latent space R^d, spread as evenly as possible, so that the network
only has to move the latent features z (L2-normalised) towards them. Classification is the
nearest centroid by cosine, ``argmax_j <z, c_j>``.

Two constructions:

* ``"simplex"`` — exact, for d >= K - 1. The K vertices of a regular simplex inscribed in
  the unit sphere: every pair has cosine exactly -1/(K-1), the most negative value K unit
  vectors can share (sum_i c_i = 0 forces sum_{i != j} <c_i, c_j> = -K). Built by the
  ICBPL paper's recursion (sec. 2.2): start from the two "basic points" (-1) and (+1) in
  R^1; to go from s - 1 points in R^{s-2} to s points in R^{s-1}, scale every old point by
  a = sqrt(s (s - 2)) / (s - 1), append the coordinate b = -1/(s - 1) to it, and add the new
  point (0, ..., 0, 1). Then <new, old> = b = -1/(s - 1) and
  <old_i, old_j> = a^2 (-1/(s - 2)) + b^2 = -1/(s - 1), so the s points stay regular. The
  K points use the last K - 1 coordinates of R^d (the paper pads with leading zeros);
  ``rotate=True`` (default) then applies a seeded Haar-random rotation of R^d, which keeps
  every inner product but spreads the targets over all d latent units, so no output unit
  of the projection is trained towards a constant 0.
* ``"repulsion"`` — for d < K - 1 (no regular simplex fits), and for any d when asked: the
  iteration of the reference code (PEDCC.py in ICBPC/CSAE): K points start as normalised
  Gaussian vectors (seeded) with zero velocity v; each step computes the Coulomb force
  F_i = sum_j (u_i - u_j) / |u_i - u_j|^3 (distances floored at 1e-2), keeps its part
  tangent to the sphere, F_t = F_i - <F_i, u_i> u_i, moves u_i <- normalise(u_i + v_i) and
  then v_i <- v_i + G F_t (G = 0.01). The reference runs 200 steps; the default here is
  ``iterations=1000``: 200 leave 12 points in R^3 at a largest pairwise cosine of 0.53,
  1000 reach the icosahedron's 1/sqrt(5) = 0.447 (the known optimum). An optional velocity
  damping (``damping`` < 1) is exposed but off: on K = 100, d = 60 it did not spread the
  points better than the reference's undamped update. Vectorised over all pairs in
  float64 (K^2 d per step; K = 100, d = 60 takes ~3 s once, then it is cached) instead of
  the reference's Python double loop.

Construction is deterministic for a given (K, d, method, seed, iterations). Results are
cached as ``<cache root>/pedcc/pedcc-K<K>-d<d>-<method>-<params>.npy`` (the cache root is the
feature cache's: ``$IMGCLUST_CACHE``, else ``~/.cache/imgclust``), written atomically; a
cached file that is not a finite (K, d) array of unit rows is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from imgclust.errors import InputError

PEDCC_FORMAT = 1
METHODS = ("auto", "simplex", "repulsion")


def simplex_points(k: int) -> np.ndarray:
    """K unit vectors in R^{K-1} with pairwise cosine -1/(K-1) (the paper's recursion), float64."""
    if k < 2:
        raise InputError(f"PEDCC needs at least 2 centroids, got {k}")
    pts = np.array([[-1.0], [1.0]])  # the negative and positive basic points of R^1
    for s in range(3, k + 1):  # s = number of points after this step
        a = np.sqrt(s * (s - 2.0)) / (s - 1.0)
        b = -1.0 / (s - 1.0)
        old = np.hstack([a * pts, np.full((len(pts), 1), b)])
        new = np.zeros((1, s - 1))
        new[0, -1] = 1.0
        pts = np.vstack([old, new])
    return pts


def random_rotation(d: int, rng: np.random.Generator) -> np.ndarray:
    """A Haar-distributed orthogonal d x d matrix (QR of a Gaussian matrix, signs fixed)."""
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.diag(r))[None, :]


def repulsion_points(k: int, d: int, seed: int = 0, iterations: int = 1000, step: float = 1e-2,
                     damping: float = 1.0) -> np.ndarray:
    """K unit vectors in R^d spread by the reference code's charged-particle iteration, float64.

    See the module docstring for the update. ``damping`` multiplies the velocity every step
    (1.0 = the reference's undamped update).
    """
    if k < 2 or d < 1:
        raise InputError(f"PEDCC needs K >= 2 and d >= 1, got K={k}, d={d}")
    rng = np.random.default_rng(seed)
    u = rng.standard_normal((k, d))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    v = np.zeros_like(u)
    for _ in range(iterations):
        diff = u[:, None, :] - u[None, :, :]  # (K, K, d): u_i - u_j
        dist = np.maximum(np.sqrt((diff**2).sum(-1)), 1e-2)
        force = (diff / dist[..., None] ** 3).sum(1)  # the i == j term is 0 / 1e-6 = 0
        tangent = force - (force * u).sum(1, keepdims=True) * u
        u = u + v
        u /= np.linalg.norm(u, axis=1, keepdims=True)
        v = damping * v + step * tangent
    return u


def build_pedcc(k: int, d: int, method: str = "auto", seed: int = 0, rotate: bool = True,
                iterations: int = 1000) -> np.ndarray:
    """(K, d) float32 unit rows: the PEDCC (see the module docstring).

    ``method="auto"``: ``"simplex"`` when d >= K - 1, else ``"repulsion"``.
    """
    if method not in METHODS:
        raise InputError(f"PEDCC method must be one of {', '.join(METHODS)}; got {method!r}")
    if k < 2 or d < 1:
        raise InputError(f"PEDCC needs K >= 2 and a latent dimension >= 1, got K={k}, d={d}")
    if method == "auto":
        method = "simplex" if d >= k - 1 else "repulsion"
    if method == "simplex":
        if d < k - 1:
            raise InputError(f"a regular simplex of K={k} points needs d >= {k - 1}, got d={d}; use method=repulsion")
        pts = np.zeros((k, d))
        pts[:, d - (k - 1):] = simplex_points(k)
        if rotate:
            pts = pts @ random_rotation(d, np.random.default_rng(seed)).T
    else:
        pts = repulsion_points(k, d, seed=seed, iterations=iterations)
    pts /= np.linalg.norm(pts, axis=1, keepdims=True)
    return pts.astype(np.float32)


def _cache_name(k: int, d: int, method: str, seed: int, rotate: bool, iterations: int) -> str:
    resolved = method if method != "auto" else ("simplex" if d >= k - 1 else "repulsion")
    params = {"format": PEDCC_FORMAT, "seed": int(seed),
              "rotate": bool(rotate) if resolved == "simplex" else None,
              "iterations": int(iterations) if resolved == "repulsion" else None}
    tag = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    return f"pedcc-K{k}-d{d}-{resolved}-{tag}.npy"


def _valid(c: np.ndarray, k: int, d: int) -> bool:
    return (c.shape == (k, d) and c.dtype == np.float32 and bool(np.isfinite(c).all())
            and bool(np.allclose(np.linalg.norm(c, axis=1), 1.0, atol=1e-4)))


def load_or_build_pedcc(k: int, d: int, method: str = "auto", seed: int = 0, rotate: bool = True,
                        iterations: int = 1000, cache_dir: str | Path | None = None,
                        use_cache: bool = True) -> np.ndarray:
    """:func:`build_pedcc`, cached per (K, d, method, params) under ``<cache root>/pedcc/``.

    ``cache_dir`` is the cache root (as ``--cache-dir``); None means the feature cache's
    default. A cache that cannot be written only disables caching.
    """
    if method not in METHODS:
        raise InputError(f"PEDCC method must be one of {', '.join(METHODS)}; got {method!r}")
    if not use_cache:
        return build_pedcc(k, d, method, seed, rotate, iterations)
    from imgclust.features import default_cache_dir

    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = root / "pedcc" / _cache_name(k, d, method, seed, rotate, iterations)
    if path.is_file():
        try:
            c = np.load(path, allow_pickle=False)
            if _valid(c, k, d):
                return c
        except (OSError, ValueError):
            pass  # unreadable: rebuild and overwrite
    c = build_pedcc(k, d, method, seed, rotate, iterations)
    try:
        from imgclust.rundir import atomic_open

        with atomic_open(path, "wb") as f:
            np.save(f, c)
    except OSError:
        pass  # read-only cache: the centroids are cheap to rebuild
    return c


def pedcc_stats(c: np.ndarray) -> dict[str, float]:
    """Spread of a centroid set: max / mean off-diagonal cosine and the simplex bound -1/(K-1)."""
    c = np.asarray(c, dtype=np.float64)
    g = c @ c.T
    off = g[~np.eye(len(c), dtype=bool)]
    return {"max_cos": float(off.max()), "mean_cos": float(off.mean()), "min_cos": float(off.min()),
            "simplex_cos": -1.0 / (len(c) - 1)}


def load_centroids(state: dict, k: int, d: int, name: str = "icbpl"):
    """The saved PEDCC points ``state["centroids"]`` as a float32 (K, d) tensor; InputError when they
    are missing or do not fit K = ``k`` and the latent dimension ``d``."""
    import torch

    c = state.get("centroids")
    if not isinstance(c, torch.Tensor) or c.ndim != 2 or not c.is_floating_point():
        raise InputError(f"not an {name} state: 'centroids' (K x d floats) missing")
    if c.shape[0] != k:
        raise InputError(f"saved model has K={c.shape[0]} centroids, expected {k}")
    if c.shape[1] != d:
        raise InputError(f"saved centroids are {c.shape[1]}-d, the config says latent_dim={d}")
    return c.float()
