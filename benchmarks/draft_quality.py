"""Does JPEG draft decoding change what the clusters are? (issue 19 (b), session 3)

On ``--n`` photos of the benchmarks/extract_speed.py large-photo folder (2000-2800 px JPEGs
built from scikit-image's bundled photos: photo ``i`` is a crop/flip/resize of base photo
``i mod B``, which is a label), EfficientNet-Lite0 features (224 px, OpenVINO fp32) of three
decodes: the full decode, the draft at 2x the size the resize needs (sessions 1-2's default)
and at 1x (session 3's default). Prints the feature cosine of each draft to the full decode,
and spherical k-means (K = B, n_init 10, seed 0) on each: agreement of its clusters with the
full decode's (Hungarian-matched share of images, and ARI) and ACC against the base photo.

    PYTHONPATH=src nice -n 10 python benchmarks/draft_quality.py --large-dir /tmp/e19/large \
        --cache /tmp/e19/bcache --n 500
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

BASES = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry",
         "retina", "cat", "colorwheel", "skin", "lily")  # benchmarks/extract_speed.py build_large


def n_bases() -> int:
    import skimage.data as sd

    n = 0
    for name in BASES:
        try:
            a = np.asarray(getattr(sd, name)())
        except Exception:  # noqa: BLE001 - not bundled in this version (the builder skipped it too)
            continue
        n += int(a.ndim == 3 and a.shape[2] >= 3)
    return n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--large-dir", type=Path, required=True)
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--cache", type=Path, default=Path("/tmp/imgclust-profile-cache"), help="compiled-model cache")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    import torch
    from sklearn.metrics import adjusted_rand_score

    torch.set_num_threads(args.threads)
    from imgclust.backbones import build_backbone
    from imgclust.data import open_source
    from imgclust.data.decode import decode_image, jpeg_draft
    from imgclust.engines import build_engine, pipeline
    from imgclust.methods import FitContext, get_method
    from imgclust.metrics import cluster_acc

    bb = build_backbone("efficientnet-lite0")
    pre = bb.preprocess
    src = open_source(str(args.large_dir))
    paths = sorted(src.path(i) for i in range(len(src)))[: args.n]
    idx = np.array([int(Path(p).stem.split("_")[-1]) for p in paths])
    b = n_bases()
    y = idx % b
    eng = build_engine(bb, "openvino", "fp32", torch.device("cpu"), cache_root=args.cache, rows=10**9)
    feats, secs = {}, {}
    modes = (("full decode", None), ("draft 2x", pipeline.draft_side(pre, 2)), ("draft 1x", pipeline.draft_side(pre, 1)))
    for label, side in modes:
        def load(p: str, side: int | None = side) -> np.ndarray:
            with jpeg_draft(side):
                return pre.resize_image(decode_image(p))

        t = time.perf_counter()
        with ThreadPoolExecutor(args.threads) as pool:
            ims = np.stack(list(pool.map(load, paths)))
        secs[label] = time.perf_counter() - t
        feats[label] = np.concatenate([eng(ims[s:s + 32]) for s in range(0, len(ims), 32)])
        print(f"# {label}: {len(ims)} photos decoded + resized in {secs[label]:.1f} s", flush=True)

    def cos(a: np.ndarray, c: np.ndarray) -> np.ndarray:
        return (a * c).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(c, axis=1))

    labels = {}
    for label, f in feats.items():
        m = get_method("kmeans")(b, None)
        m.fit(f, FitContext(seed=0, progress=False))
        labels[label] = np.asarray(m.labels_)
    full = labels["full decode"]
    print(f"\n{len(paths)} photos, K = {b} base photos, EfficientNet-Lite0 224 px, OpenVINO fp32\n")
    print(f"| decode | decode+resize s (pool of {args.threads}) | feature cosine to full min / 5th pct / median | "
          "share >= 0.99 | k-means agreement with full | ARI to full | k-means ACC (base photo) |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for label, _ in modes:
        c = cos(feats[label], feats["full decode"])
        print(f"| {label} | {secs[label]:.1f} | {c.min():.4f} / {np.percentile(c, 5):.4f} / {np.median(c):.4f} | "
              f"{100 * (c >= 0.99).mean():.1f} % | "
              f"{100 * cluster_acc(full, labels[label]):.1f} % | {adjusted_rand_score(full, labels[label]):.3f} | "
              f"{100 * cluster_acc(y, labels[label]):.1f} |")
    c = cos(feats["draft 1x"], feats["full decode"])
    print("\nmedian / min cosine of the 1x draft per base photo: "
          + ", ".join(f"{j}: {np.median(c[y == j]):.4f} / {c[y == j].min():.4f}" for j in range(b) if (y == j).any()))


if __name__ == "__main__":
    main()
