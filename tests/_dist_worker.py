"""One rank of a distributed test (run as a script by tests/distributed.py's ``run_ranks``).

``python tests/_dist_worker.py TASK OUT_JSON ARGS_JSON``; rank/world size come from the
torchrun-style environment (RANK, WORLD_SIZE, MASTER_ADDR=127.0.0.1, MASTER_PORT).
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import torch


def _digits(crash_at=None):
    from sklearn.datasets import load_digits

    from imgclust.data.base import ArraySource

    d = load_digits()

    class Src(ArraySource):
        def read(self, i):
            if crash_at is not None and i == crash_at:
                os._exit(9)  # what SIGKILL / the OOM killer does: no cleanup at all
            return super().read(i)

    return Src((d.images[:512] * 255 / 16).astype(np.uint8), d.target[:512], name="digits512")


def extract(args):
    from imgclust.backbones import build_backbone
    from imgclust.features import extract_features

    if int(os.environ.get("RANK", "0")) == args.get("crash_rank", -1):
        import imgclust.features_dist as fd

        record, calls = fd._record, []

        def record_then_die(*a, **k):  # killed (os._exit: no cleanup, like SIGKILL) after N flushed chunks
            record(*a, **k)
            calls.append(1)
            if len(calls) == args["crash_after_chunks"]:
                os._exit(9)

        fd._record = record_then_die
    fs = extract_features(_digits(), build_backbone("efficientnet-lite0", image_size=32),
                          cache_dir=args["cache"], batch_size=64, chunk_rows=64, progress=False, engine="torch")
    return {"sha256": fs.sha256, "rows_computed": fs.rows_computed, "resumed_from": fs.resumed_from,
            "status": fs.cache_status, "path": str(fs.path)}


def prior(args):
    from imgclust.heads.dist_stats import global_batch_prior_update

    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(args["global_batch"], args["k"], generator=g), dim=1)
    from imgclust.train import dist

    mine = probs[list(dist.shard(len(probs)))]
    prior = torch.full((args["k"],), 1.0 / args["k"])
    out = global_batch_prior_update(prior, mine, momentum=0.9)
    return {"prior": out.tolist()}


def heads(args):
    from imgclust.heads.dist_train import fit_heads_for_test

    return fit_heads_for_test(args)


if __name__ == "__main__":
    torch.set_num_threads(1)
    task, out_path, args = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    from imgclust.train import dist

    dist.init_from_env()
    result = globals()[task](args)
    if dist.is_main():
        with open(out_path, "w") as f:
            json.dump(result, f)
    dist.shutdown()
