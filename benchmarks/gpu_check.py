#!/usr/bin/env python
"""GPU check (issue 20's "NCCL on GPU" and every ``--device cuda`` path), for a machine with one CUDA GPU.

CI has no GPU, so this is run by hand when one is at hand; it prints one JSON line per section and
writes them all to ``--out``. A failing section records its error and the next one still runs.

1. ``dist``: a 1-process group with :func:`imgclust.train.dist.backend` ("cpu:gloo,cuda:nccl"): the
   helpers on CPU *and* CUDA tensors, the extraction's start flag, the object broadcast; then plain
   "nccl" on a CPU tensor, to show why both backends are needed.
2. ``heads``: TEMI, 50 heads, K = 100 on N x 384 synthetic features (a mixture of 100 Gaussians, as
   benchmarks/scale.py): seconds per epoch on the GPU and on this machine's CPU cores, in the same
   window (ratio), and the ACC of both against the mixture's components.
3. ``methods``: icce-heads and spice-self on 20k rows, GPU vs CPU: both learn the mixture.
4. ``extract``: EfficientNet-Lite0 on a folder of images with the torch engine: CUDA fp32 / fp16 features
   against CPU fp32 (cosine), and images per second.

    python benchmarks/gpu_check.py --images DIR --out gpu.json [--n 100000]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import traceback

import numpy as np
import torch


def mixture(n: int, dim: int, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, dim)).astype(np.float32)
    y = rng.integers(0, k, n)
    return centers[y] + 0.8 * rng.normal(size=(n, dim)).astype(np.float32), y


def check_dist() -> dict:
    import torch.distributed as d

    from imgclust.features_dist import _broadcast_flag
    from imgclust.train import dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29533", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    d.init_process_group(dist.backend())
    r = {"backend": str(d.get_backend())}
    r["cpu_sum"] = dist.all_reduce_sum(torch.ones(3)).tolist()
    r["cuda_sum"] = dist.all_reduce_sum(torch.ones(3, device="cuda")).cpu().tolist()
    r["cuda_mean"] = dist.all_reduce_mean(torch.full((2,), 4.0, device="cuda")).cpu().tolist()
    r["cuda_gather"] = dist.all_gather_cat(torch.arange(4.0, device="cuda")).cpu().tolist()
    r["object"] = dist.broadcast_object({"a": 1})
    r["start_flag"] = _broadcast_flag(1)
    lin = torch.nn.Linear(4, 2).cuda()
    lin(torch.ones(3, 4, device="cuda")).sum().backward()
    before = lin.weight.grad.clone()
    dist.all_reduce_grads(lin.parameters())
    r["grads_unchanged"] = bool(torch.equal(before, lin.weight.grad))
    d.destroy_process_group()
    os.environ["MASTER_PORT"] = "29534"
    d.init_process_group("nccl")
    try:
        dist.all_reduce_sum(torch.ones(3))
        r["nccl_alone_cpu_tensor"] = "accepted"
    except Exception as e:  # noqa: BLE001 - the point is the message
        r["nccl_alone_cpu_tensor"] = f"refused: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
    d.destroy_process_group()
    return r


def fit(method: str, k: int, cfg: dict, x: np.ndarray, device: str, work: str):
    from imgclust.methods import FitContext, get_method

    m = get_method(method)(k, cfg)
    t = time.perf_counter()
    m.fit(x, FitContext(seed=0, device=device, progress=False, work_dir=work))
    return m, time.perf_counter() - t


GPU = "cuda"  # --gpu cpu dry-runs the script on a machine without one


def check_heads(n: int, epochs: int) -> dict:
    from imgclust.metrics import cluster_acc

    x, y = mixture(n, 384, 100)
    cfg = {"heads": 50, "epochs": epochs, "warmup_epochs": 0, "checkpoint": False}
    r: dict = {"n": n, "heads": 50, "k": 100, "cpu_threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as work:  # one work dir: the neighbours are mined once, then cached
        from imgclust.neighbors import load_or_mine_neighbors

        t = time.perf_counter()
        load_or_mine_neighbors(x, work, k=50, seed=0)
        r["neighbors_s"] = round(time.perf_counter() - t, 1)
        for label, dev in (("gpu", GPU), ("cpu", "cpu"), ("gpu", GPU)):  # GPU, CPU, GPU: the ratio in one window
            m, s = fit("temi", 100, cfg, x, dev, work)
            r.setdefault(label, []).append({"fit_s": round(s, 1), "epoch_s": [round(e, 2) for e in m.history_["epoch_s"]],
                                          "acc": round(cluster_acc(y, m.labels_), 4)})
    gpu = min(min(e["epoch_s"]) for e in r["gpu"])
    r["cpu_over_gpu_epoch"] = round(min(r["cpu"][0]["epoch_s"]) / gpu, 1)
    return r


def check_methods() -> dict:
    from imgclust.metrics import cluster_acc

    x, y = mixture(20_000, 128, 10, seed=1)
    r: dict = {}
    with tempfile.TemporaryDirectory() as work:
        for method, cfg in (("icce-heads", {"heads": 10, "epochs": 5, "checkpoint": False}),
                            ("spice-self", {"epochs": 5, "checkpoint": False})):
            for label, dev in (("gpu", GPU), ("cpu", "cpu")):
                m, s = fit(method, 10, cfg, x, dev, work)
                r[f"{method}/{label}"] = {"s": round(s, 1), "acc": round(cluster_acc(y, m.labels_), 4)}
    return r


def check_extract(images: str) -> dict:
    from imgclust.api import ImageClusterer
    from imgclust.data import open_source

    src = open_source(images)
    r: dict = {"images": len(src)}
    feats = {}
    runs = (("cpu", "cpu", "fp32", 64), ("cuda", GPU, "fp32", 256), ("cuda", GPU, "fp16", 256), ("cuda", GPU, "fp32", 256))
    for label, dev, prec, bs in runs if GPU == "cuda" else runs[:2]:
        with tempfile.TemporaryDirectory() as cache:
            est = ImageClusterer(backbone="efficientnet-lite0", device=dev, precision=prec, batch_size=bs,
                                 engine="torch", cache_dir=cache, progress=False)
            t = time.perf_counter()
            f, valid, _, _ = est._features(src)
            s = time.perf_counter() - t
            f = np.asarray(f)[valid].astype(np.float64)
        key = f"{label}/{prec}"
        r[f"{key}/images_per_s"] = round(len(f) / s, 1)  # the second cuda/fp32 run: warm (kernels compiled)
        feats.setdefault(key, f)
    ref = feats["cpu/fp32"] / np.linalg.norm(feats["cpu/fp32"], axis=1, keepdims=True)
    for key in [k for k in feats if k.startswith("cuda")]:
        g = feats[key] / np.linalg.norm(feats[key], axis=1, keepdims=True)
        cos = (g * ref).sum(1)
        r[f"{key}/cosine_to_cpu_min"] = round(float(cos.min()), 6)
        r[f"{key}/cosine_to_cpu_mean"] = round(float(cos.mean()), 6)
    return r


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", help="a folder of images for the extraction check")
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--out", default="gpu_check.json")
    ap.add_argument("--only", default="dist,heads,methods,extract")
    ap.add_argument("--gpu", default="cuda", help="cpu: dry-run the sections on a machine without a GPU")
    args = ap.parse_args()
    global GPU
    GPU = args.gpu
    out: dict = {"torch": torch.__version__, "cuda": torch.cuda.is_available(),
                 "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    print(json.dumps(out), flush=True)
    checks = {"dist": check_dist, "heads": lambda: check_heads(args.n, args.epochs), "methods": check_methods,
              "extract": lambda: check_extract(args.images)}
    for name in args.only.split(","):
        t = time.perf_counter()
        try:
            res = {"ok": True, **checks[name]()}
        except Exception as e:  # noqa: BLE001 - one failing section must not hide the others
            res = {"ok": False, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-3000:]}
        res["s"] = round(time.perf_counter() - t, 1)
        out[name] = res
        print(name, json.dumps(res), flush=True)
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
