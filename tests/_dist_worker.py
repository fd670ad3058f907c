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
    from imgclust.features_dist import extract_features

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
    """temi_loss on this rank's slice of one fixed global batch: the prior and the SK-centred teacher."""
    from imgclust.losses.temi import temi_loss
    from imgclust.train import dist

    g = torch.Generator().manual_seed(0)
    h, b, k = 3, args["global_batch"], args["k"]
    s_all = torch.randn(h, 2, b, k, generator=g)
    t_all = torch.randn(h, 2, b, k, generator=g) * 3
    prior = torch.softmax(torch.randn(h, k, generator=g), -1)
    mine = dist.shard(b)
    s_mine = s_all[:, :, mine.start:mine.stop].clone().requires_grad_(True)
    out = temi_loss(s_mine, t_all[:, :, mine.start:mine.stop], prior, sinkhorn_iters=3, ce_weight=0.5)
    out.loss.backward()
    grad = s_mine.grad.contiguous()
    grad_all = dist.all_gather_cat(grad, dim=2) / dist.world_size()  # each rank's loss is a mean over its rows
    return {"prior": out.prior.tolist(), "grad": grad_all.tolist(),
            "loss": float(dist.all_reduce_mean(out.loss.detach().clone()))}


def heads(args):
    """TEMI / ICCE heads on the 1,797 digits (64-d pixel features), 1 or 2 processes, same global batch."""
    from sklearn.datasets import load_digits

    import imgclust.methods  # noqa: F401  (registers the methods)
    from imgclust.methods.base import FitContext, get_method

    x = load_digits().data.astype(np.float32)
    m = get_method(args["method"])(10, args["config"])
    m.fit(x, FitContext(seed=0, progress=False))
    st = m.state_dict()
    return {"labels": m.labels_.tolist(), "head_losses": [float(v) for v in m.head_losses_],
            "best_head": m.best_head_, "prior": m.prior_.tolist(),
            "teacher": {k: v.tolist() for k, v in st.items() if k.startswith("teacher.") and v.is_floating_point()}}


def neighbors(args):
    """load_or_mine_neighbors with a shared work dir: rank 0 mines and writes, the others read (issue 20)."""
    from sklearn.datasets import load_digits

    from imgclust.neighbors import load_or_mine_neighbors
    from imgclust.train import dist

    nb = load_or_mine_neighbors(load_digits().data.astype(np.float32), args["work"], k=10, progress=False,
                                exact_max_rows=args["exact_max_rows"])
    status = torch.tensor([{"written": 1, "hit": 2}.get(nb.info["cache"], 9)])
    return {"cache": dist.all_gather_cat(status).tolist(), "indices": nb.indices.tolist(),
            "recall": nb.info.get("recall_at_k")}


def spice(args):
    """SPICE-Self heads on the 1,797 digits (64-d), 1 or 2 processes, same global mini-batches (issue 20)."""
    from sklearn.datasets import load_digits

    import imgclust.methods  # noqa: F401  (registers the methods)
    import imgclust.methods.spice as sp
    from imgclust.methods.base import FitContext, get_method

    seen, loss = set(), sp.cluster_loss

    def counting_loss(logits, targets, *a, **k):  # the mini-batch rows this rank trains on
        if torch.is_grad_enabled():
            seen.add(int(targets.shape[-1]))
        return loss(logits, targets, *a, **k)

    sp.cluster_loss = counting_loss
    x = load_digits().data.astype(np.float32)
    m = get_method("spice-self")(10, args["config"])
    m.fit(x, FitContext(seed=0, progress=False))
    return {"rows_per_step": sorted(seen), "labels": m.labels_.tolist(), "head_losses": [float(v) for v in m.head_losses_],
            "best_head": m.best_head_, "train_loss": m.history_["train_loss"],
            "heads": {k: v.tolist() for k, v in m.state_dict().items() if v.is_floating_point()}}


def selftrain(args):
    """Self-training (grid + refit) on noisy digit pseudo-labels with sample weights, 1 or 2 processes."""
    from sklearn.datasets import load_digits

    from imgclust.refine.selftrain import self_train

    x, y = load_digits(return_X_y=True)
    rng = np.random.default_rng(0)
    noisy = np.where(rng.random(len(y)) < 0.3, rng.integers(0, 10, len(y)), y)
    r = self_train(x.astype(np.float32), noisy, 10, weights=rng.random(len(y)).astype(np.float32),
                   epochs=args["epochs"], batch_size=args["batch_size"], seed=1)
    return {"weight": r.classifier.weight.tolist(), "bias": r.classifier.bias.tolist(), "lr": r.lr,
            "grid": r.grid, "labels": r.classifier.predict(x.astype(np.float32)).tolist()}


def consensus(args):
    """consensus_once on noisy relabelled copies of one labelling: rank 0 computes, the others receive (issue 20)."""
    import imgclust.consensus as cm
    from imgclust.train import dist

    rng = np.random.default_rng(0)
    truth = rng.integers(0, 6, 3000)
    heads = np.stack([rng.permutation(6)[np.where(rng.random(3000) < 0.2, rng.integers(0, 6, 3000), truth)]
                      for _ in range(8)])
    ran, real = [], cm.consensus
    cm.consensus = lambda *a, **k: ran.append(1) or real(*a, **k)
    res = cm.consensus_once(heads, 6, methods=("mcla", "hbgf"), seed=0)
    runs = dist.all_gather_cat(torch.tensor([len(ran)])).tolist()
    same = dist.all_gather_cat(torch.from_numpy(np.asarray(res.labels, np.int64))[None])
    return {"runs": runs, "labels": res.labels.tolist(), "summary": res.summary(),
            "ranks_agree": bool((same == same[0]).all()), "candidates": sorted(res.candidates)}


def head_labels(args):
    """multihead_labels_sharded: each rank labels its share of the rows, every rank gets all labels (issue 20)."""
    from sklearn.datasets import load_digits

    import imgclust.heads.wrap as wrap
    from imgclust.heads.multihead import MultiHeadClassifier
    from imgclust.train import dist

    x = load_digits().data.astype(np.float32)[:1001]  # odd: unequal shares
    heads = MultiHeadClassifier(64, 7, 5, "l2", generator=torch.Generator().manual_seed(0))
    whole = wrap.multihead_labels(heads, x, 100)
    rows, real = [], wrap.multihead_labels
    wrap.multihead_labels = lambda h, f, c=None, progress=False: rows.append(len(f)) or real(h, f, c)
    got = wrap.multihead_labels_sharded(heads, x, 100)
    same = dist.all_gather_cat(torch.from_numpy(got.astype(np.int64))[None])
    return {"rows": dist.all_gather_cat(torch.tensor(rows)).tolist(), "equal_whole": bool((got == whole).all()),
            "ranks_agree": bool((same == same[0]).all()), "dtype": str(got.dtype), "shape": list(got.shape),
            "distinct": int(len(np.unique(got)))}


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
