"""Self-training: a linear classifier on frozen features, trained on pseudo-labels.

ICCE stage 3 (ICCE paper, sec. 3.3): the consensus labels of the training images become
targets for a supervised classifier, which then labels the training images again and
classifies new ones. ICCE follows DINOv2's linear-evaluation protocol — SGD, a grid of
learning rates, the best setting kept — but picks the setting on *ground truth*; here the
setting is chosen without labels, on a held-out share of the pseudo-labels.

How it runs:

* Features are standardised with the training mean/std (frozen, stored with the model).
* The whole grid (every learning rate x weight decay) trains at once as G linear heads in
  one batched tensor program (``einsum`` over (G, D, K) weights), with SGD + momentum 0.9
  and a cosine learning-rate decay; each head has its own learning rate, applied in the
  hand-written update (``torch.optim.SGD`` takes one learning rate per parameter tensor,
  and one tensor holds all heads).
* ``holdout`` (default 10 %) of the pseudo-labelled samples, stratified per pseudo-class,
  never train the grid; the setting with the best held-out pseudo-label accuracy (ties:
  the lower loss) is retrained on every sample. The labels of the data never enter.
* Optional per-sample ``weights`` (e.g. ICSR's ranking groups) scale each sample's
  cross-entropy.
* Streaming (issue 20): the standardised features are never materialised — each batch is
  gathered from ``features`` (a memory map is read in place) and standardised on the fly
  (elementwise the same operations, so the same numbers as standardising everything first);
  the held-out share is an index, not a copy; held-out logits are computed in blocks of
  ``chunk`` rows above it. At 10M x 384 the former standardised copy alone was 15 GB.
* Data-parallel under ``torchrun`` (issue 20): every rank draws the same permutation and
  holdout (same seed) and trains on its slice of each global batch; the batch's total sample
  weight and the gradients are summed over ranks, so every rank applies the single-process
  update (up to float summation order).
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from imgclust.errors import InputError
from imgclust.heads.wrap import features_tensor
from imgclust.progress import progress_bar
from imgclust.train import dist

DEFAULT_LRS = (0.001, 0.01, 0.1, 1.0)
DEFAULT_WDS = (0.0, 1e-4)


@dataclass
class LinearClassifier:
    """softmax(((x - mean) / std) @ weight + bias): the self-trained model."""

    weight: torch.Tensor  # (D, K)
    bias: torch.Tensor  # (K,)
    mean: torch.Tensor  # (D,)
    std: torch.Tensor  # (D,)

    @torch.no_grad()
    def logits(self, x: np.ndarray | torch.Tensor, chunk: int = 65536) -> np.ndarray:
        xt = torch.as_tensor(np.asarray(x, dtype=np.float32))
        out = [torch.addmm(self.bias, (xt[s:s + chunk] - self.mean) / self.std, self.weight)
               for s in range(0, len(xt), chunk)]
        return (torch.cat(out) if out else torch.zeros(0, self.weight.shape[1])).numpy()

    def predict(self, x: np.ndarray, chunk: int = 65536) -> np.ndarray:
        """Class of every row (N,) int64, computed block by block (never N x K logits at once)."""
        out = np.empty(len(x), dtype=np.int64)
        for s in range(0, len(x), chunk):
            out[s:s + chunk] = self.logits(x[s:s + chunk], chunk).argmax(1)
        return out

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        z = torch.from_numpy(self.logits(x))
        return torch.softmax(z, dim=1).numpy()

    def state_dict(self, prefix: str = "clf.") -> dict[str, torch.Tensor]:
        return {f"{prefix}{k}": v.detach().clone() for k, v in
                (("weight", self.weight), ("bias", self.bias), ("mean", self.mean), ("std", self.std))}

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], prefix: str = "clf.") -> LinearClassifier:
        try:
            w, b, m, s = (state[f"{prefix}{k}"].float() for k in ("weight", "bias", "mean", "std"))
        except KeyError as e:
            raise InputError(f"classifier tensor {e} missing from the saved state") from e
        if w.ndim != 2 or b.shape != (w.shape[1],) or m.shape != (w.shape[0],) or s.shape != (w.shape[0],):
            raise InputError(f"inconsistent classifier shapes: weight {tuple(w.shape)}, bias {tuple(b.shape)}")
        return cls(w, b, m, s)


@dataclass
class SelfTrainResult:
    classifier: LinearClassifier
    lr: float
    weight_decay: float
    grid: list[dict] = field(default_factory=list)  # per setting: lr, weight_decay, holdout_acc, holdout_loss
    seconds: float = 0.0


def _train_grid(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, k: int, lrs: torch.Tensor, wds: torch.Tensor,
                epochs: int, batch_size: int, gen: torch.Generator, progress: bool, desc: str,
                mean: torch.Tensor, std: torch.Tensor, subset: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Train G = len(lrs) linear heads at once; returns weights (G, D, K) and biases (G, K).

    Trains on the rows ``subset`` of x (all when None), standardised batch by batch.
    """
    n, d = (len(subset) if subset is not None else x.shape[0]), x.shape[1]
    g = len(lrs)
    bound = 1.0 / math.sqrt(d)
    weight = (torch.rand(g, d, k, generator=gen) * 2 - 1) * bound
    bias = torch.zeros(g, k)
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    mom_w, mom_b = torch.zeros_like(weight), torch.zeros_like(bias)
    bs = min(batch_size, n)
    steps = max(n // bs, 1)
    total = steps * epochs
    bar = progress_bar(epochs, desc, unit="epoch", enable=progress)
    step = 0
    lr_col = lrs[:, None, None]
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        for it in range(steps):
            rows = perm[it * bs:(it + 1) * bs]
            if subset is not None:
                rows = subset[rows]
            # issue 20: under torchrun each rank takes its slice of the global batch; the weighted
            # mean's denominator (the batch's total weight) and the gradients are summed over ranks
            part = dist.shard(len(rows))
            rows = rows[part.start:part.stop]
            xb = (x[rows] - mean) / std  # issue 20: standardised per batch (same values as a standardised copy)
            logits = torch.einsum("bd,gdk->gbk", xb, weight) + bias[:, None, :]
            ce = F.cross_entropy(logits.reshape(-1, k), y[rows].repeat(g), reduction="none").reshape(g, -1)
            total_w = dist.all_reduce_sum(w[rows].sum())
            loss = (ce * w[rows]).sum(1) / total_w.clamp(min=1e-12)  # (G,) weighted mean per head
            gw, gb = torch.autograd.grad(loss.sum(), (weight, bias))
            dist.all_reduce_sum(gw)
            dist.all_reduce_sum(gb)
            scale = 0.5 * (1 + math.cos(math.pi * step / total))  # cosine decay to 0
            with torch.no_grad():
                mom_w.mul_(0.9).add_(gw + wds[:, None, None] * weight)
                mom_b.mul_(0.9).add_(gb)
                weight.sub_(scale * lr_col * mom_w)
                bias.sub_(scale * lrs[:, None] * mom_b)
            step += 1
        bar.update(1)
    bar.close()
    return weight.detach(), bias.detach()


def self_train(
    features: np.ndarray,
    pseudo_labels: np.ndarray,
    n_clusters: int,
    *,
    weights: np.ndarray | None = None,
    lrs: tuple[float, ...] = DEFAULT_LRS,
    weight_decays: tuple[float, ...] = DEFAULT_WDS,
    epochs: int = 30,
    batch_size: int = 256,
    holdout: float = 0.1,
    seed: int = 0,
    progress: bool = False,
    chunk: int = 65536,
) -> SelfTrainResult:
    """Fit a linear classifier to ``pseudo_labels`` (N,) on ``features`` (N, D); see the module doc."""
    t0 = time.perf_counter()
    x_np = np.ascontiguousarray(features, dtype=np.float32)
    y_np = np.asarray(pseudo_labels, dtype=np.int64)
    n = len(x_np)
    if x_np.ndim != 2 or len(y_np) != n or n < 2:
        raise InputError(f"self-training needs features (N, D) and N pseudo-labels, N >= 2; got {x_np.shape}, {y_np.shape}")
    if y_np.min() < 0 or y_np.max() >= n_clusters:
        raise InputError(f"pseudo-labels must lie in 0..{n_clusters - 1}")
    if not 0.0 <= holdout < 1.0:
        raise InputError(f"holdout must be in [0, 1), got {holdout}")
    if not lrs or not weight_decays or min(lrs) <= 0 or min(weight_decays) < 0 or epochs < 1:
        raise InputError("self-training needs positive learning rates, weight decays >= 0 and epochs >= 1")
    w_np = np.ones(n, np.float32) if weights is None else np.asarray(weights, dtype=np.float32)
    if w_np.shape != (n,) or (w_np < 0).any() or not np.isfinite(w_np).all():
        raise InputError("sample weights must be N finite values >= 0")
    gen = torch.Generator().manual_seed(int(seed))
    x = features_tensor(x_np)  # the memory-mapped cache itself on the streaming path: no copy
    mean, std = x.mean(0), x.std(0).clamp(min=1e-6)
    y, w = torch.from_numpy(y_np), torch.from_numpy(w_np)
    grid = list(itertools.product(lrs, weight_decays))
    lr_t = torch.tensor([a for a, _ in grid], dtype=torch.float32)
    wd_t = torch.tensor([b for _, b in grid], dtype=torch.float32)

    rng = np.random.default_rng(seed)
    held = np.zeros(n, bool)
    if holdout > 0 and len(grid) > 1:
        for c in range(n_clusters):  # stratified: every pseudo-class is represented in both parts
            idx = np.flatnonzero(y_np == c)
            take = int(round(holdout * len(idx))) if len(idx) >= 2 else 0
            held[rng.choice(idx, size=take, replace=False)] = True
    report = []
    best = 0
    if held.any():
        tr = torch.from_numpy(np.flatnonzero(~held))
        ho = torch.from_numpy(np.flatnonzero(held))
        wg, bg = _train_grid(x, y, w, n_clusters, lr_t, wd_t, epochs, batch_size, gen, progress,
                             "self-training grid", mean, std, subset=tr)

        @torch.no_grad()
        def held_out(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            logits = torch.einsum("bd,gdk->gbk", (x[rows] - mean) / std, wg) + bg[:, None, :]
            hits = (logits.argmax(-1) == y[rows]).float()
            ce = F.cross_entropy(logits.reshape(-1, n_clusters), y[rows].repeat(len(grid)),
                                 reduction="none").reshape(len(grid), -1)
            return hits, ce

        if len(ho) <= chunk:  # one block, as before issue 20
            hits, ce = held_out(ho)
            acc, loss = hits.mean(1), ce.mean(1)
        else:  # blocks of held-out rows: sums in float64, then the means
            acc, loss = torch.zeros(len(grid), dtype=torch.float64), torch.zeros(len(grid), dtype=torch.float64)
            for s in range(0, len(ho), chunk):
                hits, ce = held_out(ho[s:s + chunk])
                acc += hits.double().sum(1)
                loss += ce.double().sum(1)
            acc, loss = (acc / len(ho)).float(), (loss / len(ho)).float()
        loss = torch.nan_to_num(loss, nan=float("inf"))
        report = [{"lr": a, "weight_decay": b, "holdout_acc": float(acc[i]), "holdout_loss": float(loss[i])}
                  for i, (a, b) in enumerate(grid)]
        best = min(range(len(grid)), key=lambda i: (-float(acc[i]), float(loss[i])))
    lr, wd = grid[best]
    wf, bf = _train_grid(x, y, w, n_clusters, lr_t[best:best + 1], wd_t[best:best + 1], epochs, batch_size, gen,
                         progress, "self-training", mean, std)
    if not torch.isfinite(wf).all():
        raise InputError(f"self-training diverged at lr={lr}; give smaller learning rates")
    clf = LinearClassifier(wf[0].contiguous(), bf[0].contiguous(), mean, std)
    return SelfTrainResult(clf, lr, wd, report, time.perf_counter() - t0)
