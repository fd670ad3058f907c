"""One backbone + head wrapper: images -> backbone features -> head -> logits (or latents).

Every method that trains a backbone together with a head on images uses :class:`BackboneHead`
(SPICE-Semi's end-to-end FixMatch, ICSR's end-to-end stage, ICBPL's fine-tuning); the
trainable backbone itself comes from :func:`imgclust.backbones.finetune.trainable_copy`.
It lives in ``heads/`` (a lower layer: refine/ and methods/ both import it) rather than in
``backbones/`` because what it adds to a backbone is the head. Its state-dict keys are
``backbone.*`` and ``head.*``, the keys of the wrappers it replaced (``refine.fixmatch.
BackboneClassifier``, ``refine.icsr.ImageClassifier``, ICBPL's ``ModuleDict``), so checkpoints
written before the change still resume. PICI / CC's :class:`~imgclust.heads.pici.ClusteringNet`
is not one of these: it has two heads on one encoder and its keys (``encoder.*``) are in saved
model files.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn


class BackboneHead(nn.Module):
    """``head(backbone(x))``; ``embed`` (the backbone's features, float32) and ``classify`` (the head)
    separately for callers that rank or re-label on the embeddings (ICSR)."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x).float()

    def classify(self, z: torch.Tensor) -> torch.Tensor:
        return self.head(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


def features_tensor(x: np.ndarray) -> torch.Tensor:
    """The frozen features as a tensor without a copy, also when ``x`` is the read-only memory-mapped cache.

    torch warns on every read-only array ("not writable ... undefined behavior"): the methods only
    read their features (no in-place op touches this tensor), so the warning is noise for the user,
    and copying N x D to silence it is what issue 20's streaming path must not do.
    """
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(x)


@torch.no_grad()
def apply_rows(fn: Callable[[torch.Tensor], torch.Tensor], features: np.ndarray, n_out: int,
               chunk: int = 65536) -> np.ndarray:
    """``fn`` (a (B, D) CPU float tensor -> (B, n_out)) over the rows of ``features`` (N, D), ``chunk``
    rows at a time, as float32 (N, n_out): how a fitted head predicts from frozen features."""
    x = np.asarray(features, dtype=np.float32)
    out = [fn(torch.from_numpy(np.ascontiguousarray(x[s:s + chunk]))).numpy() for s in range(0, len(x), chunk)]
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0, n_out), np.float32)


@torch.no_grad()
def multihead_logits(heads: nn.Module, features: np.ndarray, head: int | None = None, chunk: int = 65536) -> np.ndarray:
    """Logits of a batched multi-head module (``forward`` -> (H, B, K), ``forward_head(x, h)`` -> (B, K))
    in eval mode: all heads (H, N, K), or one head (N, K) when ``head`` is given."""
    heads.eval()
    x = np.asarray(features, dtype=np.float32)
    outs = []
    for s in range(0, len(x), chunk):
        xb = torch.from_numpy(np.ascontiguousarray(x[s:s + chunk]))
        outs.append((heads(xb) if head is None else heads.forward_head(xb, head)).numpy())
    if not outs:
        k = int(heads.n_clusters)
        return np.zeros((heads.n_heads, 0, k) if head is None else (0, k), np.float32)
    return np.concatenate(outs, axis=-2)


#: :func:`multihead_labels` shows a bar from this many rows (10M rows x 50 heads: ~12 minutes of labelling
#: after the last training step, which used to be silent; below 1M rows it takes seconds)
LABEL_BAR_MIN_ROWS = 1_000_000


@torch.no_grad()
def multihead_labels(heads: nn.Module, features: np.ndarray, chunk: int | None = None,
                     progress: bool = False) -> np.ndarray:
    """The cluster of every row under every head of a batched multi-head module: (H, N) int16
    (int32 above 32,768 clusters), ``chunk`` rows at a time so the (H, N, K) logits never exist at once.

    Issue 20: by default blocks of 2^24 logits (64 MB: 3,355 rows at 50 heads x K = 100, where 65,536
    rows were 1.3 GB), and int16 labels (1 GB at 10M x 50 heads instead of 2 GB). From
    :data:`LABEL_BAR_MIN_ROWS` rows it reports progress (a bar when ``progress``; the run log always)."""
    heads.eval()
    x = np.asarray(features, dtype=np.float32)
    k = int(heads.n_clusters)
    chunk = chunk or max(256, (1 << 24) // max(1, heads.n_heads * k))
    out = np.zeros((heads.n_heads, len(x)), dtype=np.int16 if k <= 2**15 else np.int32)
    bar = None
    if len(x) >= LABEL_BAR_MIN_ROWS:
        from imgclust.progress import progress_bar

        bar = progress_bar(len(x), f"label rows under {heads.n_heads} heads", unit="row", enable=progress)
    for s in range(0, len(x), chunk):
        xb = torch.from_numpy(np.ascontiguousarray(x[s:s + chunk]))
        out[:, s:s + len(xb)] = heads(xb).argmax(-1).numpy()
        if bar is not None:
            bar.update(len(xb))
    if bar is not None:
        bar.close()
    return out


def multihead_labels_sharded(heads: nn.Module, features: np.ndarray, chunk: int | None = None,
                             progress: bool = False) -> np.ndarray:
    """:func:`multihead_labels` of every row on every rank, each rank labelling only its contiguous share
    (``dist.shard``) and the shares all-gathered (issue 20: at 10M x 50 heads the labelling is ~1,300 CPU s,
    which P ranks on one machine used to repeat P times). Every rank must call it (a collective). The
    shares' blocks start at other rows than one process's, so a label can differ only on a float-level tie.
    Gathered as int32 (gloo has no int16 collectives): (P, H, ceil(N / P)), 2 GB at 10M x 50 heads."""
    from imgclust.train import dist

    if dist.world_size() == 1:
        return multihead_labels(heads, features, chunk, progress=progress)
    n, p = len(features), dist.world_size()
    mine, per = dist.shard(n), -(-n // p)
    local = np.zeros((heads.n_heads, per), np.int32)
    local[:, :len(mine)] = multihead_labels(heads, features[mine.start:mine.stop], chunk,
                                            progress=progress and dist.is_main())
    parts = dist.all_gather_cat(torch.from_numpy(local)[None], 0).numpy()
    out = np.empty((heads.n_heads, n), dtype=np.int16 if int(heads.n_clusters) <= 2**15 else np.int32)
    for r in range(p):
        rows = dist.shard(n, r, p)
        out[:, rows.start:rows.stop] = parts[r, :, :len(rows)]
    return out


def argmax_blocks(proba: Callable[[np.ndarray], np.ndarray], features: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """``proba(features).argmax(1)`` as (N,) int64, ``chunk`` rows at a time (issue 20): the (N, K) float
    probabilities of every row never exist at once (4 GB at 10M rows x K = 100). With ``chunk`` equal to the
    row blocks ``proba`` computes in itself (65,536 for the heads and the self-trained classifier), every
    block runs the same operations as the whole call, so the labels are bit-identical."""
    out = np.empty(len(features), dtype=np.int64)
    for s in range(0, len(features), chunk):
        out[s:s + chunk] = np.asarray(proba(features[s:s + chunk])).argmax(1)
    return out


def load_multihead(state: dict[str, torch.Tensor], prefix: str, kind: str, norm: str, k: int, name: str) -> nn.Module:
    """A frozen (eval) batched head module from the ``prefix*`` tensors of a saved state: ``kind``
    ``"linear"`` (:class:`~imgclust.heads.multihead.MultiHeadClassifier`) or ``"mlp"``
    (:class:`~imgclust.heads.mlp.MultiHeadMLP`), its sizes read from the tensors; InputError
    naming ``name`` when they are missing or do not fit K = ``k`` / ``norm``."""
    from imgclust.errors import InputError
    from imgclust.heads.mlp import MultiHeadMLP
    from imgclust.heads.multihead import MultiHeadClassifier

    mlp = kind == "mlp"
    w = state.get(f"{prefix}fc1_weight" if mlp else f"{prefix}weight")
    v = state.get(f"{prefix}last_v") if mlp else w
    if w is None or w.ndim != 3 or v is None or v.ndim != 3:
        raise InputError(f"not a {name} state with head={kind}: {prefix.rstrip('.')} weights (H, D, .) missing")
    h, d, kk = w.shape[0], w.shape[1], v.shape[2]
    if kk != k:
        raise InputError(f"saved model has K={kk} clusters, expected {k}")
    t: nn.Module = (MultiHeadMLP(d, kk, h, norm, hidden_dim=w.shape[2], bottleneck_dim=v.shape[1]) if mlp
                    else MultiHeadClassifier(d, kk, h, norm))
    return load_frozen(t, state, prefix, f"saved {name} heads do not match norm={norm!r}")


def load_frozen(module: nn.Module, state: dict[str, torch.Tensor], prefix: str, what: str) -> nn.Module:
    """``module`` loaded from the ``prefix*`` tensors of a saved state, frozen and in eval mode;
    InputError ``"<what>: <torch's reason>"`` when they do not fit."""
    from imgclust.errors import InputError

    try:
        module.load_state_dict({key[len(prefix):]: val for key, val in state.items() if key.startswith(prefix)})
    except RuntimeError as e:
        raise InputError(f"{what}: {e}") from e
    module.requires_grad_(False)
    return module.eval()


def predict_finetuned_images(backbone: nn.Module, tuned: dict[str, torch.Tensor], head: Callable[[torch.Tensor], torch.Tensor],
                             source: Any, n_out: int, *, size: int | None = None, batch_size: int = 64,
                             device: torch.device | str = "cpu", workers: int | None = None, progress: bool = True,
                             desc: str = "predict") -> np.ndarray:
    """``head`` (float32 backbone features -> (B, n_out)) of every image of ``source`` through a frozen copy
    of the pretrained ``backbone`` with its fine-tuned parameters ``tuned`` put back
    (:func:`~imgclust.backbones.finetune.finetuned_copy`), at ``size`` (default: the backbone's):
    how a fine-tuned (``image_level``) model predicts. Rows of images that do not decode are all zero."""
    from imgclust.backbones.finetune import finetuned_copy
    from imgclust.data.batches import ImageBatches

    bb = finetuned_copy(backbone, tuned, device)
    images = ImageBatches(source, np.arange(len(source)), size or backbone.preprocess.size, backbone.preprocess, workers)
    return images.apply(lambda x: head(bb(x).float()), n_out, batch_size=batch_size, device=device, progress=progress,
                        desc=desc)



def encode_images(images: Any, net: BackboneHead, features: np.ndarray, n_out: int, device: torch.device | str = "cpu",
                  batch_size: int = 64) -> np.ndarray:
    """``net`` over every image of ``images`` (:class:`~imgclust.data.batches.ImageBatches`), (N, n_out);
    an image that no longer decodes (an all-zero output row) takes ``net.head`` of its frozen
    ``features`` row instead. Modes are the caller's."""
    z = images.apply(net, n_out, batch_size=batch_size, device=device, progress=False)
    bad = ~z.any(axis=1)
    if bad.any():
        z[bad] = apply_rows(lambda xb: net.head(xb.to(device)).cpu(), features[bad], n_out)
    return z


__all__ = ["BackboneHead", "apply_rows", "argmax_blocks", "encode_images", "load_frozen", "load_multihead", "multihead_labels", "multihead_labels_sharded", "multihead_logits",
           "predict_finetuned_images"]
