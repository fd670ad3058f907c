"""Same seeds, same rows before and after a refactor (issue 17): ACC/NMI/ARI and a digest of the labels.

Fits ``ImageClusterer`` on scikit-learn's digits as precomputed features (64-d, so every row
takes seconds) for each method, and prints one row per method. Run it with two source trees and
compare the tables (identical digests = identical assignments)::

    PYTHONPATH=/work/main/src   python benchmarks/shape_parity.py > before.txt
    PYTHONPATH=/work/wt/17s/src python benchmarks/shape_parity.py > after.txt
    diff before.txt after.txt

Any other feature matrix: ``--features X.npy --labels Y.npy`` (e.g. the cached CIFAR-10 test
EfficientNet-Lite0 features, dumped with ``benchmarks/baselines.py``'s ``load``).
"""

from __future__ import annotations

import argparse
import hashlib
import time

import numpy as np
from sklearn.datasets import load_digits

from imgclust.api import ImageClusterer
from imgclust.metrics import evaluate

FAST = {"temi": {"epochs": 20}, "icce-heads": {"epochs": 20}, "icce": {"epochs": 20},
        "spice-self": {"epochs": 20}, "icbpl": {"epochs": 20}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="kmeans,spectral-kmeans,auto,temi,icce-heads,spice-self,icbpl,icsr")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--features", default=None, help=".npy feature matrix (default: scikit-learn's digits)")
    ap.add_argument("--labels", default=None, help=".npy labels for --features")
    args = ap.parse_args()
    if args.features:
        x, y = np.load(args.features).astype(np.float32), np.load(args.labels)
    else:
        x, y = load_digits(return_X_y=True)
        x = (x / 16.0).astype(np.float32)
    print(f"{'method':<16} {'ACC':>7} {'NMI':>7} {'ARI':>7}  labels-sha1   seconds")
    for name in args.methods.split(","):
        t0 = time.perf_counter()
        est = ImageClusterer(n_clusters=10, method=name, method_options=FAST.get(name), seed=args.seed, progress=False)
        try:
            lab = est.fit_predict(x)
        except Exception as e:  # noqa: BLE001 - a row per method, whatever happens
            print(f"{name:<16} error: {type(e).__name__}: {str(e)[:80]}")
            continue
        m = evaluate(y, lab)
        digest = hashlib.sha1(np.ascontiguousarray(lab, np.int64).tobytes()).hexdigest()[:12]
        print(f"{name:<16} {m['acc']:7.4f} {m['nmi']:7.4f} {m['ari']:7.4f}  {digest}  {time.perf_counter() - t0:7.1f}",
              flush=True)


if __name__ == "__main__":
    main()
