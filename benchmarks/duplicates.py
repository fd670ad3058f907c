"""Recall and precision of the near-duplicate stage (imgclust.duplicates) on injected copies.

CIFAR-10 test (10,000 images) plus 1 % injected copies of randomly chosen images, four kinds
of 25 each: exact, resized (down to 20 px and back up to 32, bilinear), re-encoded (JPEG
quality 40), cropped (3 px off every side, resized back to 32). Features: EfficientNet-Lite0 at
its default size, the originals from the feature cache (the same entry `imgclust cluster` uses),
the copies extracted here. A true pair is (original, its copy); a predicted pair is any two images
in one duplicate group. Precision counts only injected pairs as right, so it is a lower bound
(CIFAR-10 test has a few near-duplicates of its own).

    PYTHONPATH=src IMGCLUST_CACHE=/work/cache python benchmarks/duplicates.py /work/shared/data/cifar10-jpg.tar.gz \
        [--limit N] [--backbone efficientnet-lite0]
    PYTHONPATH=src python benchmarks/duplicates.py /work/shared/data/fashion-mnist --backbone pixels --image-size 28 --grayscale

Prints one row per setting: the feature threshold (cosine of the centred, PCA-128 features) and the
thumbnail threshold (cosine of the 16x16 grey, mean-removed thumbnails; "-": features only), and
the outlier count.
"""

from __future__ import annotations

import argparse
import io
import os
import time

import numpy as np
from PIL import Image

from imgclust.backbones import build_backbone
from imgclust.data import ArraySource, open_source
from imgclust.data.base import SubsetSource
from imgclust.duplicates import find_quality, thumb_vectors
from imgclust.features import extract_features

KINDS = ("exact", "resized", "reencoded", "cropped")


def make_copy(img: np.ndarray, kind: str) -> np.ndarray:
    im = Image.fromarray(img)
    w, h = im.size
    if kind == "resized":
        im = im.resize((20, 20), Image.Resampling.BILINEAR).resize((w, h), Image.Resampling.BILINEAR)
    elif kind == "reencoded":
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=40)
        im = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    elif kind == "cropped":
        im = im.crop((3, 3, w - 3, h - 3)).resize((w, h), Image.Resampling.BILINEAR)
    return np.asarray(im, dtype=np.uint8)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("source")
    ap.add_argument("--split", default="test")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--backbone", default="efficientnet-lite0")
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--grayscale", action="store_true", help="pixels backbone: grey levels (Fashion-MNIST)")
    ap.add_argument("--fraction", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    t0 = time.perf_counter()
    src = open_source(a.source, split=a.split)
    if a.limit:
        src = SubsetSource.sample(src, a.limit, seed=a.seed)
    opts = {k: v for k, v in (("image_size", a.image_size), ("grayscale", a.grayscale or None)) if v is not None}
    bb = build_backbone(a.backbone, **opts)
    cache = os.environ.get("IMGCLUST_CACHE")
    fs = extract_features(src, bb, cache_dir=cache, progress=True)
    base = np.asarray(fs.features, dtype=np.float32)
    n = len(base)
    rng = np.random.default_rng(a.seed)
    m = max(len(KINDS), int(round(a.fraction * n)))
    orig = rng.choice(n, size=m, replace=False)
    kinds = [KINDS[i % len(KINDS)] for i in range(m)]
    copies = np.stack([make_copy(src.read(int(i)), k) for i, k in zip(orig, kinds)])
    cf = np.asarray(extract_features(ArraySource(copies, name="copies"), bb, cache_dir=None, use_cache=False,
                                     progress=False).features, dtype=np.float32)
    x = np.concatenate([base, cf])
    truth = {(int(o), n + j) for j, o in enumerate(orig)}
    kind_of = {(int(o), n + j): kinds[j] for j, o in enumerate(orig)}
    print(f"{n} images + {m} injected copies ({', '.join(KINDS)}), {a.backbone}, features {x.shape[1]}-d; "
          f"{time.perf_counter() - t0:.0f} s to get features")
    thumbs = thumb_vectors(src, np.arange(n))
    thumbs = np.concatenate([thumbs, np.stack([thumb_vectors(ArraySource(copies[j:j + 1]), [0])[0] for j in range(m)])])
    print(f"{'features':>8} {'thumbs':>6} {'groups':>6} {'pairs':>6} {'recall':>6} {'precision':>9} "
          + " ".join(f"{k:>9}" for k in KINDS) + "  seconds")
    grid = [(0.85, None), (0.93, None), (0.96, None), (0.98, None), (0.98, 0.975), (0.98, 0.98), (0.98, 0.985),
            (0.98, 0.99), (0.96, 0.985), (0.99, 0.985)]
    for t, tt in grid:
        t1 = time.perf_counter()
        q = find_quality(x, dup_threshold=t, seed=a.seed, thumbs=None if tt is None else thumbs,
                         thumb_threshold=tt or 1.0)
        dt = time.perf_counter() - t1
        pred = set()
        for g in q.groups:
            for i in range(len(g)):
                for j in range(i + 1, len(g)):
                    pred.add((min(g[i], g[j]), max(g[i], g[j])))
        hit = truth & pred
        rec = len(hit) / len(truth)
        prec = len(hit) / max(len(pred), 1)
        per = {k: sum(1 for p in hit if kind_of[p] == k) / max(1, sum(1 for p in truth if kind_of[p] == k)) for k in KINDS}
        print(f"{t:8.3f} {'-' if tt is None else f'{tt:.3f}':>6} {len(q.groups):6d} {len(pred):6d} {rec:6.3f} {prec:9.3f} "
              + " ".join(f"{per[k]:9.3f}" for k in KINDS) + f"  {dt:.2f}", flush=True)
    q = find_quality(x, seed=a.seed)
    print(f"outliers at the default fence: {q.info['n_outliers']} (fence {q.info['outlier_fence']:.4f}); "
          f"injected copies among them: {int((q.outliers >= n).sum())}")


if __name__ == "__main__":
    main()
