"""int8 recipes for the OpenVINO engine (issue 19): which NNCF settings keep k-means ACC.

For each recipe, EfficientNet-Lite0 @224 is quantised with NNCF on the same calibration
sample of CIFAR-10 test (``--calib`` images spread over the split, as ``--precision int8``
draws them), then ``--n`` evenly spaced test images go through it. Reported: feature cosine
to the fp32 features (read from the feature cache: the lead's CIFAR-10 test entry), cluster
agreement with fp32 k-means (Hungarian-matched), and k-means ACC (K = 10, spherical,
n_init = 10, seed 0) of int8 vs fp32 on the same images. Labels only score.

    PYTHONPATH=src IMGCLUST_SHARED=/work/shared IMGCLUST_CACHE=/work/cache OMP_NUM_THREADS=2 \
        nice -n 10 python benchmarks/int8_recipes.py --onnx MODEL.onnx --n 1000 [--recipes base,mixed,mixed-ignore]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np


def recipes() -> dict[str, dict]:
    import nncf

    return {
        "base": {"fast_bias_correction": True},  # last session's recipe (NNCF defaults)
        "mixed": {"preset": nncf.QuantizationPreset.MIXED, "fast_bias_correction": False},
        "mixed-ignore": {"preset": nncf.QuantizationPreset.MIXED, "fast_bias_correction": False, "ignore": True},
        "ignore": {"fast_bias_correction": True, "ignore": True},
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--onnx", type=Path, required=True, help="the fp32 ONNX of EfficientNet-Lite0 (uint8 input)")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--calib", type=int, default=300)
    ap.add_argument("--recipes", default="base,mixed,ignore,mixed-ignore")
    ap.add_argument("--save", type=Path, default=None, help="folder for the int8 features (npy)")
    args = ap.parse_args()
    import nncf
    import openvino as ov

    from imgclust.api import ImageClusterer
    from imgclust.data import open_source
    from imgclust.engines.base import engine_threads
    from imgclust.engines.pipeline import calibration_sample, make_loader
    from imgclust.metrics import cluster_acc

    src = open_source(str(Path(os.environ["IMGCLUST_SHARED"]) / "data" / "cifar10-jpg.tar.gz"), split="test")
    est = ImageClusterer(n_clusters=10, backbone="efficientnet-lite0", cache_dir=os.environ.get("IMGCLUST_CACHE"),
                         progress=False)
    f32, valid, _, _ = est._features(src)  # fp32 reference from the feature cache
    f32 = np.asarray(f32, np.float32)
    y = np.asarray(src.labels)
    rows = np.linspace(0, len(src) - 1, min(args.n, len(src))).round().astype(int)
    load = make_loader(src, est._backbone().preprocess)
    t = time.perf_counter()
    calib = [b[None] for batch in calibration_sample(src, load, args.calib)() for b in batch]
    imgs = np.stack([load(int(i)) for i in rows])
    print(f"# decoded {len(calib)} calibration + {len(imgs)} test images in {time.perf_counter() - t:.0f} s", flush=True)
    ref = f32[rows]
    acc32, lab32 = acc_of(ref, y[rows])
    print(f"| recipe | ACC int8 | ACC fp32 (same {len(rows)} images) | delta (points) | agreement with fp32 clusters | "
          f"cosine min / median | calibrate s | img/s |\n|---|---|---|---|---|---|---|---|", flush=True)
    core = ov.Core()
    fp32_model = core.read_model(str(args.onnx))
    convs = [op.get_friendly_name() for op in fp32_model.get_ordered_ops() if op.get_type_name() == "Convolution"]
    for name in args.recipes.split(","):
        opts = dict(recipes()[name])
        if opts.pop("ignore", False):  # the stem conv and the 1x1 head conv whose output is the feature
            opts["ignored_scope"] = nncf.IgnoredScope(names=[convs[0], convs[-1]])
        t = time.perf_counter()
        q = nncf.quantize(core.read_model(str(args.onnx)), nncf.Dataset(calib), subset_size=len(calib), **opts)
        cal_s = time.perf_counter() - t
        comp = core.compile_model(q, "CPU", {"INFERENCE_NUM_THREADS": engine_threads(), "PERFORMANCE_HINT": "LATENCY"})
        req = comp.create_infer_request()
        t = time.perf_counter()
        out = []
        for s in range(0, len(imgs), 32):
            req.infer({0: np.ascontiguousarray(imgs[s:s + 32])})
            out.append(np.array(req.get_output_tensor(0).data, dtype=np.float32, copy=True))
        f8 = np.concatenate(out)
        ips = len(imgs) / (time.perf_counter() - t)
        if args.save:
            args.save.mkdir(parents=True, exist_ok=True)
            np.save(args.save / f"{name}_{len(rows)}.npy", f8)
        cos = (f8 * ref).sum(1) / np.maximum(np.linalg.norm(f8, axis=1) * np.linalg.norm(ref, axis=1), 1e-12)
        acc8, lab8 = acc_of(f8, y[rows])
        print(f"| {name} {opts.get('preset', '')} | {100 * acc8:.2f} | {100 * acc32:.2f} | {100 * (acc8 - acc32):+.2f} | "
              f"{100 * cluster_acc(lab32, lab8):.1f} | {cos.min():.4f} / {np.median(cos):.4f} | {cal_s:.0f} | {ips:.1f} |",
              flush=True)


def acc_of(feats: np.ndarray, y: np.ndarray, seed: int = 0) -> tuple[float, np.ndarray]:
    from imgclust.methods.base import FitContext
    from imgclust.methods.kmeans import KMeans
    from imgclust.metrics import cluster_acc

    km = KMeans(10, {"n_init": 10})
    km.fit(feats, FitContext(seed=seed, device="cpu", progress=False, work_dir=None, extras={}))
    return float(cluster_acc(y, km.labels_)), km.labels_


if __name__ == "__main__":
    main()
