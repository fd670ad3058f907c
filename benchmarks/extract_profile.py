"""Where the time goes on large photos (issue 19 (b)): CPU seconds per image of each stage.

Thread CPU time (``time.thread_time``), so the numbers hold on a loaded machine, on ``--n``
photos of the benchmarks/extract_speed.py large-photo folder: full decode, draft decode at
2 x (sessions 1-2's default) and 1 x (session 3's ``DRAFT_GAP``) the size the resize needs, the resize to 224 px from each, and one
image's share of a batch of 16 through OpenVINO fp32 (1 thread) and eager PyTorch fp32
(1 thread, channels_last).

    PYTHONPATH=src nice -n 10 python benchmarks/extract_profile.py \
        --large-dir /tmp/e19/large --cache /tmp/e19/bcache --n 24
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--large-dir", type=Path, required=True)
    ap.add_argument("--n", type=int, default=24)
    ap.add_argument("--cache", type=Path, default=Path("/tmp/imgclust-profile-cache"), help="compiled-model cache")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    from imgclust.backbones import build_backbone
    from imgclust.data import open_source
    from imgclust.data.decode import decode_image, jpeg_draft
    from imgclust.engines import pipeline

    bb = build_backbone("efficientnet-lite0")
    pre = bb.preprocess
    src = open_source(str(args.large_dir))
    idx = np.linspace(0, len(src) - 1, args.n).round().astype(int)
    raw = [Path(src.path(int(i))).read_bytes() for i in idx]  # the files, read once
    side2, side1 = pipeline.draft_side(pre, 2), pipeline.draft_side(pre, 1)
    rows = []
    for label, min_side in (("full decode", None), ("draft 2x", side2), ("draft 1x", side1)):
        t_dec = t_res = 0.0
        shape = None
        for r in raw:
            t = time.thread_time()
            with jpeg_draft(min_side):
                img = decode_image(r)
            t_dec += time.thread_time() - t
            shape = img.shape
            t = time.thread_time()
            pre.resize_image(img)
            t_res += time.thread_time() - t
        rows.append((label, t_dec / len(raw), t_res / len(raw), shape))
    batch = np.stack([pre.resize_image(decode_image(r)) for r in raw[:16]])
    from imgclust.engines import build_engine

    eng = build_engine(bb, "openvino", "fp32", torch.device("cpu"), cache_root=args.cache, rows=10**9)
    eng(batch)  # warm-up
    t = time.process_time()  # OpenVINO infers on its own thread(s): the process's CPU time
    for _ in range(2):
        eng(batch)
    ov_s = (time.process_time() - t) / (2 * len(batch))
    model = bb.eval().to(memory_format=torch.channels_last)
    x = pre.to_tensor(batch).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        model(x)
        t = time.process_time()
        model(x)
    pt_s = (time.process_time() - t) / len(batch)
    feats = {}
    for label, min_side in (("full", None), ("2x", side2), ("1x", side1)):
        with jpeg_draft(min_side):
            ims = np.stack([pre.resize_image(decode_image(r)) for r in raw])
        feats[label] = np.concatenate([eng(ims[s:s + 16]) for s in range(0, len(ims), 16)])

    def cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))

    for label in ("2x", "1x"):
        c = cos(feats[label], feats["full"])
        print(f"# feature cosine, draft {label} vs full decode (OpenVINO fp32, {len(raw)} photos): "
              f"min {c.min():.4f} median {np.median(c):.4f}")
    print("| stage | CPU ms / image | decoded size |\n|---|---:|---|")
    for label, d, r, shape in rows:
        print(f"| {label}: decode | {1000 * d:.1f} | {shape[1]}x{shape[0]} |")
        print(f"| {label}: resize to {pre.size} | {1000 * r:.1f} | |")
    print(f"| OpenVINO fp32 (1 thread, batch 16) | {1000 * ov_s:.1f} | |")
    print(f"| PyTorch eager fp32 (1 thread, batch 16) | {1000 * pt_s:.1f} | |")


if __name__ == "__main__":
    main()
