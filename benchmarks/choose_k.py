"""Unknown K and the trust score (issue 23): two tables.

1. Per set: true K, the merge tree's pick and marked candidates (imgclust.hierarchy), whether
   the pick is within [0.7, 1.5] x true K and the true K is marked, ACC of the tree cut and of
   k-means at the pick; beside it the classic criteria (imgclust.choosek) and the plain
   modularity argmax. ``--deep`` adds the deep path: leaves = a TEMI model trained with
   K = k_max (batched heads, public interface), links = kNN graph + head co-association.
2. Trust: label-free trust score (imgclust.trust) and ACC of >= 20 runs (methods x seeds x
   sets), and their Spearman rank correlation.

Labels are used only to score (ACC); every choice is made without them.

    PYTHONPATH=src IMGCLUST_SHARED=/work/shared IMGCLUST_CACHE=/work/cache OMP_NUM_THREADS=2 \
        python benchmarks/choose_k.py [--sets digits,synthetic,fmnist,cifar10] [--deep]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np


def load_sets(names: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray, str]]:
    from sklearn.datasets import make_blobs

    from imgclust.api import ImageClusterer
    from imgclust.data import open_source

    shared = os.environ.get("IMGCLUST_SHARED")
    cache = os.environ.get("IMGCLUST_CACHE")
    out = {}
    for name in names:
        t0 = time.perf_counter()
        if name == "synthetic":
            # 8 Gaussian groups of very unequal sizes (2,000 down to 80 images), 32-d
            sizes = [2000, 1200, 800, 500, 300, 200, 120, 80]
            x, y = make_blobs(n_samples=sizes, n_features=32, cluster_std=2.5, center_box=(-6, 6), random_state=1)
            out[name] = (x.astype(np.float32), y, "32-d blobs, sizes 2000..80")
            continue
        if name == "digits":
            src, bb, size, opts = open_source("digits"), "pixels", 8, {}
        elif name == "digits-effnet":
            src, bb, size, opts = open_source("digits"), "efficientnet-lite0", 96, {}
        elif name in ("fmnist", "fmnist-train"):
            split = "train" if name == "fmnist-train" else "test"
            src = open_source(str(Path(shared) / "data" / "fashion-mnist"), split=split, kind="fashion-mnist")
            bb, size, opts = "pixels", 28, {"grayscale": True}
        elif name in ("fmnist-l0", "fmnist-train-l0"):  # the default backbone (issue 18's Fashion-MNIST rows)
            split = "train" if name == "fmnist-train-l0" else "test"
            src = open_source(str(Path(shared) / "data" / "fashion-mnist"), split=split)
            bb, size, opts = "efficientnet-lite0", None, {}
        elif name in ("cifar10", "cifar10-train"):
            src = open_source(str(Path(shared) / "data" / "cifar10-jpg.tar.gz"), split="train" if name == "cifar10-train" else "test")
            bb, size, opts = "efficientnet-lite0", None, {}
        else:
            raise SystemExit(f"unknown set {name}")
        est = ImageClusterer(n_clusters=2, backbone=bb, image_size=size, backbone_options=opts or None,
                             cache_dir=cache, progress=False)
        feats, valid, _, _ = est._features(src)
        out[name] = (np.asarray(feats)[valid].astype(np.float32), np.asarray(src.labels)[valid],
                     f"{bb}{'@' + str(size) if size else ''}")
        print(f"# {name}: {valid.sum()} images, features {out[name][0].shape[1]}-d ({out[name][2]}) "
              f"in {time.perf_counter() - t0:.1f} s", flush=True)
    return out


def kmeans_labels(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    from imgclust.methods import FitContext, get_method

    m = get_method("kmeans")(k, None)
    m.fit(x, FitContext(seed=seed, progress=False))
    return np.asarray(m.labels_)


def temi_model(x: np.ndarray, k: int, seed: int, heads: int = 10, epochs: int = 30):
    from imgclust.methods import FitContext, get_method

    n = len(x)
    cfg = {"heads": heads, "epochs": epochs, "momentum": 0.99 if n < 5000 else 0.996, "k": 20}
    m = get_method("temi")(k, cfg)
    m.fit(x, FitContext(seed=seed, progress=False))
    return m


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sets", default="digits,synthetic,fmnist,cifar10")
    ap.add_argument("--k-range", default="2:20")
    ap.add_argument("--deep", action="store_true", help="also the deep path (TEMI over-clustering leaves)")
    ap.add_argument("--no-trust", action="store_true")
    ap.add_argument("--no-classic", action="store_true", help="skip the classic criteria (slow on a loaded machine)")
    ap.add_argument("--no-temi", action="store_true", help="trust table without the TEMI runs")
    args = ap.parse_args()
    from scipy.stats import spearmanr

    from imgclust.choosek import choose_k
    from imgclust.hierarchy import build_hierarchy
    from imgclust.metrics import cluster_acc
    from imgclust.trust import trust_score

    sets = load_sets(args.sets.split(","))
    print("\n| set | N | true K | path | chosen K | candidates | in [0.7,1.5]xK | true K marked | ACC tree cut | "
          "ACC k-means@K | classic K (ACC) | votes per tree (argmax Q, 97 % gain, persistent) | ACC cut @ true K | seconds |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    runs: list[tuple[str, str, float, float]] = []
    for name, (x, y, _) in sets.items():
        true_k = len(np.unique(y))
        paths = [("kmeans leaves", None)]
        if args.deep:
            paths.append(("TEMI leaves + heads", "temi"))
        for path, kind in paths:
            t0 = time.perf_counter()
            if kind is None:
                tree = build_hierarchy(x, args.k_range)
            else:
                m = temi_model(x, 60, seed=0)
                tree = build_hierarchy(x, args.k_range, leaves=m.labels_, head_labels=m.head_labels_)
            secs = time.perf_counter() - t0
            k = int(tree.k)
            cut = tree.cut(k)
            km = kmeans_labels(x, k, 0)
            classic = ""
            if kind is None and not args.no_classic:
                ck = choose_k(x, args.k_range, progress=False)
                classic = f"{ck['k']} ({cluster_acc(y, kmeans_labels(x, ck['k'], 0)):.3f})"
            ok = 0.7 * true_k <= k <= 1.5 * true_k
            print(f"| {name} | {len(x)} | {true_k} | {path} | {k} | {', '.join(map(str, tree.candidates))} | "
                  f"{'yes' if ok else 'NO'} | {'yes' if true_k in tree.candidates else 'NO'} | "
                  f"{cluster_acc(y, cut):.3f} | {cluster_acc(y, km):.3f} | {classic} | "
                  f"{' / '.join(', '.join(map(str, v.values())) for v in tree.info['votes_all_trees'])} | "
                  f"{cluster_acc(y, tree.cut(true_k)):.3f} | "
                  f"{secs:.1f} |", flush=True)
            if not args.no_trust and kind is None:
                runs.append((name, f"tree cut K={k}", trust_score(x, cut)["score"], cluster_acc(y, cut)))
                runs.append((name, f"kmeans K={k} (chosen)", trust_score(x, km)["score"], cluster_acc(y, km)))
                if true_k != k:
                    tk = tree.cut(true_k)
                    runs.append((name, f"tree cut K={true_k}", trust_score(x, tk)["score"], cluster_acc(y, tk)))
    if args.no_trust:
        return
    for name, (x, y, _) in sets.items():
        true_k = len(np.unique(y))
        for seed in (0, 1):
            lab = kmeans_labels(x, true_k, seed)
            runs.append((name, f"kmeans K={true_k} seed {seed}", trust_score(x, lab)["score"], cluster_acc(y, lab)))
        lab = kmeans_labels(x, 2 * true_k, 0)  # over-clustered: ACC drops, does trust?
        runs.append((name, f"kmeans K={2 * true_k}", trust_score(x, lab)["score"], cluster_acc(y, lab)))
        if args.no_temi:
            continue
        m = temi_model(x, true_k, seed=0)
        t = trust_score(x, m.labels_, head_labels=m.head_labels_)
        runs.append((name, f"temi K={true_k}", t["score"], cluster_acc(y, m.labels_)))
        print(f"# {name}: temi head agreement {t.get('head_agreement')}", flush=True)
    print("\n| set | run | trust | ACC |\n|---|---|---|---|")
    for r in runs:
        print(f"| {r[0]} | {r[1]} | {r[2]:.3f} | {r[3]:.3f} |")
    rho, p = spearmanr([r[2] for r in runs], [r[3] for r in runs])
    print(f"\nSpearman(trust, ACC) over {len(runs)} runs: rho = {rho:.3f} (p = {p:.2g})")
    for name in sets:
        sub = [r for r in runs if r[0] == name]
        if len(sub) >= 4:
            r2, _ = spearmanr([r[2] for r in sub], [r[3] for r in sub])
            print(f"  within {name} ({len(sub)} runs): rho = {r2:.3f}")


if __name__ == "__main__":
    main()
