"""Nearest-neighbour sets on frozen features, mined once and cached next to the features.

Clustering methods that learn from (image, neighbour) pairs — TEMI (Adaloglou et al., BMVC
2023), ICCE stage 1 (section 3.1 of the ICCE paper), SCAN — need, for every image i, a set
N(i) of images that are close to it in the backbone's feature space. Closeness is cosine
similarity, s(i, j) = <x_i, x_j> / (|x_i| |x_j|), computed as an inner product of
L2-normalised rows.

Two kinds of sets:

* **fixed** — the k most similar images (TEMI: k = 50).
* **adaptive** (ICCE, sec. 3.1 "Adaptive Nearest Neighbors Selection") — every image within
  cosine distance ``threshold`` (1 - s(i, j) <= threshold, i.e. s >= 1 - threshold; the
  paper uses 0.3), and at least the k closest when fewer qualify:
  ``N(i) = {j : 1 - s(i, j) <= t}`` if ``|N(i)| >= k`` else the top-k.
  The search is capped at ``max_neighbors`` candidates per image (default 1000; the paper's
  ImageNet-100 sets average 940 at its threshold), so a set never exceeds that size.

  Note on the threshold's meaning: the text calls 0.3 a "distance threshold", and that is
  the default here (s >= 0.7). The paper's Table 11, however, reads like a threshold on
  the *similarity*: 1.0 means "top-50 only", sets grow as the threshold falls (71.9 at
  0.9, 940.7 at 0.3, 1284.6 at 0.1 on ImageNet-100 — the last equal to N / classes =
  128,545 / 100, the default number of neighbours TEMI's ``gen_embeds.py`` stores with
  their inner products, which it calls ``knn_dists``). That reading, s >= 0.3, is
  ``threshold=0.7`` here, with ``max_neighbors`` near N / K.

Optional centring (``center=True``, not in the papers): subtract the mean feature before
normalising. Features that are all non-negative (raw pixels, pooled post-ReLU CNN
activations such as EfficientNet's) have high cosine similarity between *any* two images,
so an absolute threshold admits hundreds of wrong neighbours (digits pixels: 768 per image
at distance 0.3, 20% of the same class); centred, the same threshold gives 33 neighbours,
98% of the same class. Self-supervised ViT features (DINOv2), for which ICCE tuned 0.3,
need it less.

Self is always excluded **by index**, never by similarity, so an exact duplicate of an
image (similarity 1) stays in its set. With N <= k, every set is simply all other images
(a single image gets an empty set; callers pair it with itself).

Search (faiss, inner product on L2-normalised float32 rows):

* N <= ``exact_max_rows`` (default 200,000): exact brute force, ``IndexFlatIP``.
* above: ``IndexIVFFlat`` (inner product) with ``nlist = 4 * sqrt(N)`` cells (4,000 at 1M)
  trained by 10 k-means iterations on a sample of ``32 * nlist`` rows, searched with
  ``nprobe = 16`` cells — approximate (each query scans ~16/nlist of the data; recall of
  the true top-k is typically > 0.9 on clustered features); at 1M x 384 it takes minutes
  on 2 cores where brute force would take hours. Its recall@k against exact search is measured
  on 256 sampled query rows and recorded in ``info`` (``recall_at_k``; methods copy ``info`` into
  run.json).
* from ``IVF_FAST_MIN_ROWS`` (4M) rows (issue 20): IVF with sqrt(N) lists, 4-bit PQ fast-scan codes and
  the best 4 x k candidates re-ranked on 8-bit scalar-quantised rows (``IndexRefine``), 16 probes: at
  10M x 384 about 1 hour of 2 cores and 4.3 GB (estimated from 200k and 1M; IVF-flat with 4 sqrt(N)
  lists: ~4.7 hours and the 15 GB of rows again). Recall measured and recorded as above; see
  :func:`_build_fast_index`.

Queries run in chunks, so memory stays at ``chunk x (cap + 1)`` candidates plus the result.
From ``RESUME_MIN_ROWS`` (1M) rows with a cache directory, the search resumes after a kill (issue 20:
about an hour at 10M rows): the filled index is written once, the fixed sets go to a memory-mapped
``N x k`` file, and ``done.json`` records how many rows are on disk (see :class:`_SearchLog`).
Sets are stored compactly as CSR arrays: the members of set i are
``indices[indptr[i]:indptr[i + 1]]``, sorted by decreasing similarity.

Cache: ``<work_dir>/neighbors-<key>.npz``, where the key hashes the feature bytes (so PCA or
a different subset gives a different key) and every parameter; written atomically and
reused on the next run. ``work_dir`` is the feature-cache entry (``FitContext.work_dir``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

from imgclust.errors import InputError
from imgclust.progress import progress_bar

NEIGHBORS_FORMAT = 1
MODES = ("fixed", "adaptive")
EXACT_MAX_ROWS = 200_000
IVF_NPROBE = 16
IVF_TRAIN_PER_LIST = 32
IVF_TRAIN_ITERS = 10
# --- issue 20: from IVF_FAST_MIN_ROWS rows (10M on 2 cores) the index is cheap to train, hold and search:
# IVF with sqrt(N) lists, 4-bit PQ fast-scan codes (d/4 sub-quantizers: 48 bytes per row), the best
# FAST_K_FACTOR x k candidates re-ranked on 8-bit scalar-quantised rows (1 byte per dimension); recall measured.
IVF_FAST_MIN_ROWS = 4_000_000
FAST_LISTS_PER_SQRT = 1.0
FAST_NPROBE = 16
FAST_K_FACTOR = 4
FAST_PQ_DIMS = 4  # dimensions per 4-bit PQ sub-quantizer (d / 4 sub-quantizers: 48 bytes per row at d = 384)


@dataclass
class NeighborSets:
    """Variable-size neighbour sets in CSR form: set i is ``indices[indptr[i]:indptr[i+1]]``."""

    indptr: np.ndarray  # (N + 1,) int64
    indices: np.ndarray  # (nnz,) int32 (int64 when N >= 2**31)
    info: dict[str, Any]

    def __len__(self) -> int:
        return len(self.indptr) - 1

    @property
    def sizes(self) -> np.ndarray:
        return np.diff(self.indptr)

    def neighbors_of(self, i: int) -> np.ndarray:
        return self.indices[self.indptr[i]:self.indptr[i + 1]]

    def torch_view(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(indptr, indices) as tensors sharing memory with the arrays, for :func:`sample_neighbors`."""
        return (torch.from_numpy(np.ascontiguousarray(self.indptr, dtype=np.int64)),
                torch.from_numpy(np.ascontiguousarray(self.indices)))


def sample_neighbors(indptr: torch.Tensor, indices: torch.Tensor, rows: torch.Tensor,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """One uniformly random member of each row's set (vectorised); an empty set yields the row itself.

    ``j = indices[indptr[i] + floor(u * |N(i)|)]`` with ``u ~ U[0, 1)``, as TEMI's loader draws
    a fresh neighbour for every image in every epoch.
    """
    start = indptr[rows]
    size = indptr[rows + 1] - start
    u = torch.rand(rows.shape, generator=generator, dtype=torch.float64)
    if len(indices) == 0:
        return rows.clone()
    off = torch.minimum((u * size).long(), (size - 1).clamp(min=0))
    pos = (start + off).clamp(max=len(indices) - 1)  # empty sets at the end point past the array
    return torch.where(size > 0, indices[pos].long(), rows)


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows scaled to unit L2 norm (float32, C-contiguous); the one helper every layer above uses."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), eps)


class _NormalizedRows:
    """Rows of ``x`` (optionally minus ``mu``) L2-normalised on access, block by block (issue 20):
    above ``exact_max_rows`` the N x D normalised copy is never materialised, so a memory-mapped
    feature file stays on disk apart from the block being read."""

    def __init__(self, x: np.ndarray, mu: np.ndarray | None) -> None:
        self.x, self.mu = x, mu
        self.shape = x.shape

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, rows: Any) -> np.ndarray:
        b = np.asarray(self.x[rows], dtype=np.float32)
        out = l2_normalize(b - self.mu if self.mu is not None else b)
        if not np.isfinite(out).all():
            raise InputError("features contain NaN or infinite values")
        return out

    def blocks(self, block: int = 65_536):
        for s in range(0, len(self), block):
            yield s, self[s:s + block]


def _fast_index(n: int, exact_max_rows: int) -> str | None:
    """The descriptor of the large-N index (issue 20) when it applies to ``n`` rows, else None."""
    if n <= exact_max_rows or n < IVF_FAST_MIN_ROWS:
        return None
    return (f"IVF{max(1, int(FAST_LISTS_PER_SQRT * math.sqrt(n)))},PQ(d/{FAST_PQ_DIMS})x4fs,RefineSQ8,"
            f"nprobe{FAST_NPROBE},kf{FAST_K_FACTOR}")


def _pq_subquantizers(d: int) -> int:
    """Sub-quantizers for ``d`` dimensions: d / FAST_PQ_DIMS when that divides d, else the divisor of d
    nearest to it (PQ needs equal sub-vectors)."""
    return min((m for m in range(1, d + 1) if d % m == 0), key=lambda m: (abs(d / m - FAST_PQ_DIMS), m))


def _train_sample(xn: Any, n: int, size: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return xn[np.sort(rng.choice(n, size=min(n, size), replace=False))]


def _build_index(xn: Any, exact_max_rows: int, seed: int) -> tuple[faiss.Index, dict[str, Any]]:
    n, d = xn.shape
    if n <= exact_max_rows:
        index = faiss.IndexFlatIP(d)
        index.add(xn)
        return index, {"index": "flat-ip"}
    if _fast_index(n, exact_max_rows) is not None:
        return _build_fast_index(xn, seed)
    nlist = int(4 * math.sqrt(n))
    quantizer = faiss.IndexFlatIP(d)
    index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
    train = _train_sample(xn, n, IVF_TRAIN_PER_LIST * nlist, seed)
    index.cp.seed = int(seed) + 1
    index.cp.niter = IVF_TRAIN_ITERS
    index.cp.min_points_per_centroid = 1  # small tests: no faiss warning on stderr
    index.train(train)
    for _, block in (xn.blocks() if isinstance(xn, _NormalizedRows) else [(0, xn)]):
        index.add(block)
    index.nprobe = IVF_NPROBE
    return index, {"index": "ivf-flat-ip", "nlist": nlist, "nprobe": IVF_NPROBE}


def _build_fast_index(xn: Any, seed: int) -> tuple[faiss.Index, dict[str, Any]]:
    """Issue 20, 10M rows on 2 cores: faiss's ``IVF<sqrt N>,PQ<d/4>x4fs`` (fast-scan: the 4-bit codes are
    compared 32 at a time with SIMD table look-ups instead of float dot products) wrapped in ``IndexRefine``
    over an 8-bit scalar quantizer, which re-ranks the best ``k_factor x k`` candidates on 1-byte-per-dimension
    rows. sqrt(N) lists instead of IVF-flat's 4 sqrt(N): training (32 rows per list, 10 iterations) and the
    coarse assignment of every row cost 16x and 4x less; the longer lists are what fast-scan scans cheaply.
    Memory at 10M x 384: 0.5 GB of codes + 3.8 GB SQ8 (IVF-flat: 15 GB).

    Measured (benchmarks/neighbors_index.py, 1 thread, CPU ms per query): CIFAR-10 train EfficientNet-Lite0
    (50k x 1280) 0.38 ms at recall@50 0.90 vs IVF-flat 0.70 ms at 0.77; synthetic 100-Gaussian 384-d
    (scale.py) 0.22 ms at 200k and 0.31 ms at 1M (IVF-flat 0.42 ms at 200k, growing with sqrt N), recall@50
    0.54 / 0.32 there but every neighbour in the query's own mixture component (exact top-50s are
    near-ties in isotropic noise; PQ re-orders them). Estimated at 10M: ~0.65 ms per query, ~2.1 CPU-hours
    in all (build ~0.3) against ~9.4 for IVF-flat. Deviations tried and rejected: an HNSW coarse
    quantizer (slower at these list counts: 15.2 vs 5.9 CPU s to build at 200k, 0.26 vs 0.21 ms per query, same recall); 2 dimensions
    per sub-quantizer or k_factor 16 (recall on real data unchanged at 8 probes, 2-3x the time)."""
    n, d = xn.shape
    nlist = max(1, int(FAST_LISTS_PER_SQRT * math.sqrt(n)))
    m = _pq_subquantizers(d)
    train = _train_sample(xn, n, IVF_TRAIN_PER_LIST * nlist, seed)
    # exact (flat) coarse assignment: an HNSW graph over the centroids was slower at these list counts
    # (200k rows, 447 lists: 15.2 vs 5.9 CPU s to build, 0.26 vs 0.21 CPU ms per query, same recall)
    quantizer = faiss.IndexFlatIP(d)
    base = faiss.IndexIVFPQFastScan(quantizer, d, nlist, m, 4, faiss.METRIC_INNER_PRODUCT)
    base.cp.seed = int(seed) + 1
    base.cp.niter = IVF_TRAIN_ITERS
    base.cp.min_points_per_centroid = 1
    refine = faiss.IndexScalarQuantizer(d, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)
    index = faiss.IndexRefine(base, refine)
    index.k_factor = FAST_K_FACTOR
    index.train(train)
    for _, block in (xn.blocks() if isinstance(xn, _NormalizedRows) else [(0, xn)]):
        index.add(block)
    base.nprobe = FAST_NPROBE
    return index, {"index": "ivf-pq4fs-sq8refine-ip", "nlist": nlist, "nprobe": FAST_NPROBE, "pq_m": m,
                   "k_factor": FAST_K_FACTOR}


RESUME_FLUSH_ROWS = 65_536  # a killed search loses at most this many rows (about a minute at 10M on 2 cores)
# From this many rows load_or_mine_neighbors searches resumably (the search takes ~15 min at 1M x 384 on 2 cores;
# below, a kill loses minutes, and the index is not worth writing to disk: 1.5 GB for IVF-flat at 1M x 384)
RESUME_MIN_ROWS = 1_000_000


def _set_search_params(index: faiss.Index, info: dict[str, Any]) -> None:
    """Probes (and re-ranking factor) of an index read back from disk, as :func:`_build_index` set them."""
    if info.get("index") == "ivf-flat-ip":
        faiss.downcast_index(index).nprobe = int(info["nprobe"])
    elif "k_factor" in info:
        ref = faiss.downcast_index(index)
        ref.k_factor = int(info["k_factor"])
        faiss.downcast_index(ref.base_index).nprobe = int(info["nprobe"])


class _SearchLog:
    """A resumable approximate search of fixed-size sets (issue 20; written by hand: faiss has no resumable
    batch search). Files in ``path``: ``index.faiss`` (the trained, filled index, written once, atomically),
    ``ids.npy`` (N x cap memory-mapped ids, -1 where the index returned fewer) and ``sizes.npy``, and
    ``done.json``: rows ``[0, done)`` are on disk. ``done.json`` is rewritten (atomically) only after both
    memory maps are flushed, so after kill -9 it never claims rows that were not written."""

    def __init__(self, path: Path, n: int, cap: int, idx_dtype: Any, params: dict[str, Any]) -> None:
        self.path, self.n, self.cap, self.dtype = path, n, cap, np.dtype(idx_dtype)
        self.params = {**params, "n": n, "cap": cap, "dtype": self.dtype.name}
        self.done, self.index_info = 0, None
        path.mkdir(parents=True, exist_ok=True)
        try:
            state = json.loads((path / "done.json").read_text())
        except (OSError, ValueError):
            state = None
        # the directory is the caller's (load_or_mine_neighbors: named by the cache key, which hashes the
        # features and every parameter); these params only guard against a directory reused by hand
        if state and state.get("params") == self.params and (path / "index.faiss").is_file() \
                and (int(state.get("done", 0)) == 0 or (path / "ids.npy").is_file()):
            self.done, self.index_info = int(state["done"]), state["index_info"]

    def load_index(self) -> faiss.Index | None:
        if self.index_info is None:
            return None
        try:
            index = faiss.read_index(str(self.path / "index.faiss"))
        except RuntimeError:  # unreadable: build again
            self.done, self.index_info = 0, None
            return None
        _set_search_params(index, self.index_info)
        return index

    def save_index(self, index: faiss.Index, info: dict[str, Any]) -> None:
        tmp = self.path / "index.faiss.tmp"
        faiss.write_index(index, str(tmp))
        os.replace(tmp, self.path / "index.faiss")
        self.index_info, self.done = dict(info), 0
        self._write_done()

    def open(self) -> tuple[np.ndarray, np.ndarray]:
        from numpy.lib.format import open_memmap

        mode = "r+" if self.done else "w+"
        ids = open_memmap(self.path / "ids.npy", mode=mode, dtype=self.dtype, shape=(self.n, self.cap))
        sizes = open_memmap(self.path / "sizes.npy", mode=mode, dtype=np.int64, shape=(self.n,))
        return ids, sizes

    def commit(self, ids: np.ndarray, sizes: np.ndarray, done: int) -> None:
        ids.flush()
        sizes.flush()
        self.done = done
        self._write_done()

    def _write_done(self) -> None:
        from imgclust.rundir import atomic_open

        with atomic_open(self.path / "done.json", "w") as f:
            f.write(json.dumps({"params": self.params, "done": self.done, "index_info": self.index_info}))


def _compact(ids: np.ndarray, total: int, dtype: Any, block: int = 1 << 20) -> np.ndarray:
    """The valid (>= 0) ids of an N x cap matrix in row-major order, read block by block."""
    out = np.empty(total, dtype)
    pos = 0
    for s in range(0, len(ids), block):
        b = np.asarray(ids[s:s + block]).reshape(-1)
        kept = b[b >= 0]
        out[pos:pos + len(kept)] = kept
        pos += len(kept)
    return out


def _drop_self(ids: np.ndarray, sims: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Remove each row's own index from its (c, m) candidate list, keeping m - 1 columns.

    Exclusion is by index, so a duplicate with similarity 1 is kept. When the index did not
    return the row itself (possible with ties or an approximate index) the last, least
    similar candidate is dropped instead.
    """
    is_self = ids == rows[:, None]
    no_self = ~is_self.any(axis=1)
    is_self[no_self, -1] = True
    # Some rows may list self twice only if the index returned duplicates; keep exactly m - 1.
    first = np.argmax(is_self, axis=1)
    keep = np.ones_like(is_self)
    keep[np.arange(len(rows)), first] = False
    m = ids.shape[1] - 1
    return ids[keep].reshape(-1, m), sims[keep].reshape(-1, m)


RECALL_SAMPLE = 256  # query rows whose approximate top-k is checked against exact search


def _sampled_recall(index: faiss.Index, xn: Any, cap: int, seed: int) -> dict[str, Any]:
    """recall@k of the approximate index: |approx top-k & exact top-k| / k over a seeded sample of rows.

    Exact search of ``RECALL_SAMPLE`` queries against all N rows (``faiss.knn``, brute force) costs
    256 x N x D multiply-adds, about 1 TFLOP at 10M x 384 (a minute on 2 cores), a small share of
    the IVF search itself; the standard error of the estimate is below 0.01 at k = 50.
    """
    n = len(xn)
    rng = np.random.default_rng(seed + 7)
    rows = np.sort(rng.choice(n, size=min(n, RECALL_SAMPLE), replace=False))
    q = xn[rows]
    _, approx = index.search(q, cap + 1)
    sims, ids = [], []
    for s, block in xn.blocks() if isinstance(xn, _NormalizedRows) else [(0, xn)]:  # exact, block by block
        d_b, i_b = faiss.knn(q, block, min(cap + 1, len(block)), metric=faiss.METRIC_INNER_PRODUCT)
        sims.append(d_b)
        ids.append(i_b + s)
    sims_all, ids_all = np.concatenate(sims, axis=1), np.concatenate(ids, axis=1)
    order = np.argsort(-sims_all, axis=1, kind="stable")[:, :cap + 1]
    exact = np.take_along_axis(ids_all, order, axis=1)
    approx, _ = _drop_self(approx, np.zeros(approx.shape, np.float32), rows)
    exact, _ = _drop_self(exact, np.zeros(exact.shape, np.float32), rows)
    hits = sum(len(np.intersect1d(a[a >= 0], e)) for a, e in zip(approx, exact))
    return {"recall_at_k": float(hits / exact.size), "recall_k": int(cap), "recall_sample": int(len(rows))}


def mine_neighbors(
    features: np.ndarray,
    mode: str = "fixed",
    k: int = 50,
    threshold: float = 0.3,
    max_neighbors: int = 1000,
    exact_max_rows: int = EXACT_MAX_ROWS,
    chunk: int = 4096,
    seed: int = 0,
    progress: bool = True,
    center: bool = False,
    resume_dir: str | Path | None = None,
) -> NeighborSets:
    """Neighbour sets of every row of ``features`` (N, D); see the module docstring.

    ``mode="fixed"``: the ``k`` most similar rows. ``mode="adaptive"``: all rows with cosine
    distance ``<= threshold`` (up to ``max_neighbors``), or the ``k`` most similar when
    fewer qualify. Self excluded by index; with N - 1 < k, every other row. ``center``
    subtracts the mean feature before the cosine (see the module docstring). ``resume_dir``:
    fixed sets above ``exact_max_rows`` rows are searched resumably there (:class:`_SearchLog`);
    the same call after a kill goes on from the last committed row.
    """
    if mode not in MODES:
        raise InputError(f"unknown neighbour mode {mode!r}; allowed: {', '.join(MODES)}")
    if k < 1:
        raise InputError(f"k (neighbours per image) must be >= 1, got {k}")
    if not 0.0 <= threshold <= 2.0:
        raise InputError(f"threshold is a cosine distance in [0, 2], got {threshold}")
    if mode == "adaptive" and max_neighbors < k:
        raise InputError(f"max_neighbors ({max_neighbors}) must be >= k ({k})")
    x = np.asarray(features)
    if x.ndim != 2 or len(x) == 0:
        raise InputError(f"features must be a non-empty (N, D) array, got shape {x.shape}")
    n = len(x)
    mu = x.mean(axis=0, dtype=np.float64).astype(np.float32) if center else None
    xn: Any = _NormalizedRows(x, mu)  # issue 20: normalised block by block above exact_max_rows
    if n <= exact_max_rows:
        xn = l2_normalize(x - mu if center else x)
        if not np.isfinite(xn).all():
            raise InputError("features contain NaN or infinite values")
    cap = min(k if mode == "fixed" else max_neighbors, n - 1)
    k_eff = min(k, n - 1)
    min_sim = 1.0 - threshold
    idx_dtype = np.int32 if n < 2**31 else np.int64
    info: dict[str, Any] = {"mode": mode, "k": k, "k_effective": k_eff, "n": n, "center": bool(center)}
    if mode == "adaptive":
        info.update(threshold=threshold, min_similarity=min_sim, max_neighbors=max_neighbors)
    if cap <= 0:  # a single image: one empty set
        return NeighborSets(np.zeros(n + 1, np.int64), np.zeros(0, idx_dtype), {**info, "index": "none"})
    log = None
    if resume_dir is not None and mode == "fixed" and n > exact_max_rows:
        log = _SearchLog(Path(resume_dir), n, cap, idx_dtype, {"k": k, "seed": seed, "center": bool(center),
                                                               "exact_max_rows": exact_max_rows})
    t_build = time.perf_counter()
    index = log.load_index() if log is not None else None
    if index is not None:
        index_info = dict(log.index_info)
        info.update(resumed_from_row=log.done)
    else:
        index, index_info = _build_index(xn, exact_max_rows, seed)
        if log is not None:
            log.save_index(index, index_info)
    info.update(index_info)
    t_search = time.perf_counter()
    if log is not None:
        ids_mm, sizes_mm = _search_logged(index, xn, log, chunk, progress)
    else:
        sizes, indices = _search_in_memory(index, xn, mode, cap, k_eff, min_sim, idx_dtype, chunk, progress)
    t_recall = time.perf_counter()
    if info["index"] != "flat-ip":  # --- issue 20: how good is the approximate index on this data?
        info.update(_sampled_recall(index, xn, cap, seed))
    info.update(build_s=round(t_search - t_build, 3), search_s=round(t_recall - t_search, 3),  # issue 20: where
                recall_s=round(time.perf_counter() - t_recall, 3))  # the time goes at scale
    del index  # issue 20: the large-N index is 4.3 GB at 10M x 384; free it before the sets are finished
    if log is not None:  # read back from the memory maps once the index is gone
        sizes = np.array(sizes_mm)
        indices = _compact(ids_mm, int(sizes.sum()), idx_dtype)
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(sizes, out=indptr[1:])
    info.update(mean_size=float(sizes.mean()), min_size=int(sizes.min()), max_size=int(sizes.max()))
    if mode == "adaptive":
        info["capped_fraction"] = float((sizes >= cap).mean())
    return NeighborSets(indptr, indices, info)


def _search_in_memory(index: faiss.Index, xn: Any, mode: str, cap: int, k_eff: int, min_sim: float, idx_dtype: Any,
                      chunk: int, progress: bool) -> tuple[np.ndarray, np.ndarray]:
    """The search of :func:`mine_neighbors` held in memory: (N,) set sizes and the sets' members in row order."""
    n = len(xn)
    sizes = np.zeros(n, dtype=np.int64)
    # issue 20: fixed sets fill one preallocated (N x cap) buffer (at 10M x 50 a list of parts plus
    # their concatenation held 2 x 2 GB); adaptive sets vary in size and stay a list of parts.
    buf = np.empty(n * cap, idx_dtype) if mode == "fixed" else None
    pos = 0
    parts: list[np.ndarray] = []
    bar = progress_bar(n, "neighbours", unit="img", enable=progress and n >= 20_000)
    for s in range(0, n, chunk):
        rows = np.arange(s, min(s + chunk, n))
        sims, ids = index.search(xn[rows], cap + 1)
        ids, sims = _drop_self(ids, sims, rows)
        valid = ids >= 0  # an approximate index may return fewer than asked (-1 padding)
        if mode == "fixed":
            take = valid
        else:
            rank = np.arange(cap)[None, :]
            take = valid & ((sims >= min_sim) | (rank < k_eff))
        sizes[rows] = take.sum(axis=1)
        kept = ids[take].astype(idx_dtype)  # row-major: rows stay in order, best first
        if buf is not None:
            buf[pos:pos + len(kept)] = kept
            pos += len(kept)
        else:
            parts.append(kept)
        bar.update(len(rows))
    bar.close()
    if buf is not None:
        return sizes, buf if pos == len(buf) else buf[:pos].copy()  # a copy only when the index returned fewer
    return sizes, np.concatenate(parts) if parts else np.zeros(0, idx_dtype)


def _search_logged(index: faiss.Index, xn: Any, log: _SearchLog, chunk: int,
                   progress: bool) -> tuple[np.ndarray, np.ndarray]:
    """The fixed-set search of :func:`mine_neighbors`, resumable through ``log``: the (N, cap) ids (-1 padded)
    and (N,) sizes, memory-mapped; :func:`mine_neighbors` measures recall and builds the CSR sets from them."""
    n, cap = log.n, log.cap
    ids_mm, sizes_mm = log.open()
    bar = progress_bar(n, "neighbours", unit="img", enable=progress and n >= 20_000)
    bar.update(log.done)
    committed = log.done
    for s in range(log.done, n, chunk):
        rows = np.arange(s, min(s + chunk, n))
        sims, ids = index.search(xn[rows], cap + 1)
        ids, _ = _drop_self(ids, sims, rows)
        ids_mm[rows[0]:rows[-1] + 1] = ids  # -1 where an approximate index returned fewer (dropped below)
        sizes_mm[rows[0]:rows[-1] + 1] = (ids >= 0).sum(axis=1)
        end = int(rows[-1]) + 1
        if end - committed >= RESUME_FLUSH_ROWS or end == n:
            log.commit(ids_mm, sizes_mm, end)
            committed = end
        bar.update(len(rows))
    bar.close()
    return ids_mm, sizes_mm


def features_digest(features: np.ndarray) -> str:
    """Content hash of a float32 feature matrix (shape + bytes), streamed in row blocks."""
    x = np.asarray(features)
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{x.shape}|float32".encode())
    step = max(1, (64 << 20) // max(1, x.shape[1] * 4))
    for s in range(0, len(x), step):
        h.update(np.ascontiguousarray(x[s:s + step], dtype=np.float32).tobytes())
    return h.hexdigest()


def neighbor_cache_key(features: np.ndarray, **params: Any) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"format": NEIGHBORS_FORMAT, **params}, sort_keys=True).encode())
    h.update(features_digest(features).encode())
    return h.hexdigest()[:24]


def load_or_mine_neighbors(
    features: np.ndarray,
    work_dir: str | Path | None,
    mode: str = "fixed",
    k: int = 50,
    threshold: float = 0.3,
    max_neighbors: int = 1000,
    exact_max_rows: int = EXACT_MAX_ROWS,
    seed: int = 0,
    progress: bool = True,
    center: bool = False,
) -> NeighborSets:
    """:func:`mine_neighbors`, cached as ``<work_dir>/neighbors-<key>.npz`` (no cache if None).

    The file is written atomically (temporary name, then rename), so a crash never leaves a
    truncated file that a later run would trust. A cache directory that cannot be written
    (read-only) only disables caching; ``info["cache"]`` says what happened.

    Under torchrun (issue 20) with a ``work_dir``, rank 0 mines and writes the cache while the
    other ranks wait on a barrier, then read it (a cache hit) instead of mining the same sets
    again. Across nodes the work dir must be on a shared filesystem; where it is not (or rank 0
    could not write), the other ranks mine for themselves — the same sets, only slower.
    """
    from imgclust.train import dist

    kw = {"mode": mode, "k": k, "threshold": threshold, "max_neighbors": max_neighbors,
          "exact_max_rows": exact_max_rows, "seed": seed, "progress": progress, "center": center}
    if work_dir is None or dist.world_size() == 1:
        return _load_or_mine(features, work_dir, **kw)
    if dist.is_main():
        sets = _load_or_mine(features, work_dir, **kw)
        dist.barrier()
        return sets
    dist.barrier()
    return _load_or_mine(features, work_dir, **{**kw, "progress": False})


def _load_or_mine(features: np.ndarray, work_dir: str | Path | None, *, mode: str, k: int, threshold: float,
                  max_neighbors: int, exact_max_rows: int, seed: int, progress: bool, center: bool) -> NeighborSets:
    params = {"mode": mode, "k": int(k), "max_neighbors": int(max_neighbors),
              "threshold": float(threshold) if mode == "adaptive" else None,
              "exact_max_rows": int(exact_max_rows), "nprobe": IVF_NPROBE, "train": IVF_TRAIN_PER_LIST,
              "seed": int(seed) if len(features) > exact_max_rows else None, "center": bool(center)}
    fast = _fast_index(len(features), exact_max_rows)
    if fast is not None:  # issue 20: only above the threshold, so the keys of every smaller cache stay
        params["fast"] = fast
    path = partial = None
    if work_dir is not None:
        path = Path(work_dir) / f"neighbors-{neighbor_cache_key(features, **params)}.npz"
        partial = path.with_suffix(".partial")  # the resumable search's files (large N), removed when done
        if path.is_file():
            try:
                with np.load(path, allow_pickle=False) as z:
                    info = json.loads(str(z["info"]))
                    sets = NeighborSets(z["indptr"], z["indices"], {**info, "cache": "hit"})
                if len(sets) == len(features):
                    _remove_partial(partial)  # left by a run killed between writing the cache and cleaning up
                    return sets
            except (OSError, ValueError, KeyError):
                pass  # unreadable: recompute and overwrite
    resume = None
    if partial is not None and len(features) >= RESUME_MIN_ROWS and os.access(partial.parent, os.W_OK):
        resume = partial
    sets = mine_neighbors(features, mode=mode, k=k, threshold=threshold, max_neighbors=max_neighbors,
                          exact_max_rows=exact_max_rows, seed=seed, progress=progress, center=center,
                          resume_dir=resume)
    if path is not None:
        from imgclust.rundir import atomic_open

        try:
            with atomic_open(path, "wb") as f:
                np.savez(f, indptr=sets.indptr, indices=sets.indices, info=np.array(json.dumps(sets.info)))
            sets.info["cache"] = "written"
            _remove_partial(partial)
        except OSError as e:
            sets.info["cache"] = f"not written: {e.strerror or e}"
    else:
        sets.info["cache"] = "none"
    return sets


def _remove_partial(partial: Path | None) -> None:
    if partial is not None and partial.is_dir():
        import shutil

        shutil.rmtree(partial, ignore_errors=True)


def fixed_neighbors(features: np.ndarray, k: int, work_dir: Path | None = None, seed: int = 0, progress: bool = False,
                    cached: bool = True) -> np.ndarray:
    """(N, k') int64 indices of each row's k nearest rows by cosine (k' = min(k, N - 1)); a single
    row is its own neighbour. ``cached``: through :func:`load_or_mine_neighbors` (``work_dir``),
    else mined afresh (ICBPL's re-mining with the current encoder)."""
    if cached:
        nb = load_or_mine_neighbors(features, work_dir, mode="fixed", k=k, seed=seed, progress=progress)
    else:
        nb = mine_neighbors(features, mode="fixed", k=k, seed=seed, progress=False)
    n = len(features)
    kk = int(nb.info.get("k_effective", min(k, n - 1)))
    if kk <= 0:
        return np.arange(n, dtype=np.int64)[:, None]
    return np.asarray(nb.indices, dtype=np.int64).reshape(n, kk)


def neighbor_overlap(a: np.ndarray, b: np.ndarray) -> float:
    """Mean fraction of each row's neighbour set that two (N, k) index arrays share.

    Example::

        >>> neighbor_overlap(np.array([[1, 2], [0, 2]]), np.array([[2, 3], [0, 2]]))
        0.75
    """
    hits = sum(len(np.intersect1d(x, y, assume_unique=True)) for x, y in zip(a, b, strict=True))
    return hits / max(a.size, 1)
