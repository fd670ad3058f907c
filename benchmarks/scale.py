#!/usr/bin/env python
"""Scale-out benchmark (issue 20): N x 384 synthetic features in a memmap -> neighbours -> H heads
(a few epochs) -> consensus -> self-training, with wall time and peak RSS per stage, the sampled
recall@50 of the approximate neighbour index, and 1 vs P processes for the heads (data-parallel,
gloo on 127.0.0.1, launched with torchrun).

    nice -n 10 python benchmarks/scale.py --n 1000000                 # full pipeline, 1 process
    nice -n 10 python benchmarks/scale.py --n 100000 --ratio 2        # heads: 1 vs 2 processes, interleaved
    nice -n 10 python benchmarks/scale.py --n 10000000 --epochs 1     # 10M (needs ~16 GB disk for the memmap)
    ... --n 10000000 --work DIR --stop-after neighbors                # 10M in two sittings: features + neighbours,
    ... --n 10000000 --work DIR --epochs 1 --checkpoint --reuse-heads # then the rest (the neighbours read from DIR;
                                                                      # the heads resume inside their epoch after a kill)

Features: a mixture of 100 Gaussians in 384-d (as benchmarks/heads_speed.py), written in blocks of
100k rows into ``<work>/features.npy`` (open_memmap) so the generator never holds N x D in RAM.
Peak RSS is the process's maximum resident set so far (``ru_maxrss``; memmap pages that were read
count while resident). The 1-vs-P ratio on a 2-core machine cannot exceed ~2 and is lower when other
work shares the cores: it shows that the data-parallel path works and what it costs, not GPU scaling.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class AnonPeak:
    """Peak *anonymous* resident memory (``RssAnon`` of /proc/self/status, sampled every 0.2 s).

    ``ru_maxrss`` also counts the memory-mapped feature file's resident pages (file-backed, page
    cache that the kernel drops under pressure): at 10M x 384 that alone is up to 15 GB. RssAnon is
    what the process itself holds (arrays, indexes, tensors), the number that must stay small.
    """

    def __init__(self) -> None:
        import threading

        self.peak = self.now()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    @staticmethod
    def now() -> float:
        try:
            for line in open("/proc/self/status"):
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return 0.0

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self.peak = max(self.peak, self.now())

    def take(self) -> float:
        """Peak since the last call (then reset to the current value)."""
        p, self.peak = max(self.peak, self.now()), self.now()
        return round(p, 1)


def make_features(path: Path, n: int, dim: int, seed: int = 0) -> np.ndarray:
    from numpy.lib.format import open_memmap

    if path.exists():
        x = np.load(path, mmap_mode="r")
        if x.shape == (n, dim):
            return x
    # written under a temporary name and renamed when complete: a run killed mid-write leaves no file of
    # the right shape that a re-run would take for finished (the 10M file takes minutes to write)
    part = path.with_name(path.name + ".part")
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(100, dim)).astype(np.float32)
    x = open_memmap(part, mode="w+", dtype=np.float32, shape=(n, dim))
    for s in range(0, n, 100_000):
        m = min(100_000, n - s)
        x[s:s + m] = centers[rng.integers(0, 100, m)] + 0.8 * rng.normal(size=(m, dim)).astype(np.float32)
    x.flush()
    del x
    os.replace(part, path)
    return np.load(path, mmap_mode="r")


def pipeline(args) -> dict:
    """Run in each rank (torchrun) or in one process."""
    import torch

    from imgclust.methods import FitContext, get_method
    from imgclust.neighbors import load_or_mine_neighbors
    from imgclust.train import dist

    dist.init_from_env()
    anon = AnonPeak()
    work = Path(args.work)
    rows: dict = {"n": args.n, "dim": args.dim, "heads": args.heads, "epochs": args.epochs,
                  "processes": dist.world_size(), "threads": torch.get_num_threads()}
    if args.fast_min_rows:  # the large-N neighbour index from this many rows (measure it below 4M)
        import imgclust.neighbors as nbm

        nbm.IVF_FAST_MIN_ROWS = args.fast_min_rows
    t, cpu = time.perf_counter(), time.process_time()
    x = make_features(work / "features.npy", args.n, args.dim) if dist.is_main() else None
    dist.barrier()
    x = np.load(work / "features.npy", mmap_mode="r")
    rows["features_s"], rows["features_rss_mb"] = time.perf_counter() - t, rss_mb()
    rows["features_cpu_s"] = time.process_time() - cpu
    rows["features_anon_mb"] = anon.take()
    print("stage", json.dumps(rows), file=sys.stderr, flush=True)

    if args.synthetic_heads:  # the streaming stages alone: consensus + self-training on stand-in head labels
        return streaming_stages(args, x, synthetic_heads(args.n, args.heads, args.k), rows, anon)
    model = get_method("temi")(args.k, {"heads": args.heads, "epochs": args.epochs, "batch_size": args.batch_size,
                                        "warmup_epochs": 0, "checkpoint": args.checkpoint})  # off: no resume between cases
    cfg = model.config
    t, cpu = time.perf_counter(), time.process_time()
    # under torchrun rank 0 mines and caches, the others wait and read the cache (inside the call)
    nb = load_or_mine_neighbors(x, work, k=cfg.k, seed=0, progress=args.progress, exact_max_rows=args.exact_max_rows)
    rows.update(neighbors_s=time.perf_counter() - t, neighbors_cpu_s=time.process_time() - cpu,
                neighbors_rss_mb=rss_mb(), index=nb.info.get("index"),
                recall_at_50=nb.info.get("recall_at_k"), neighbors_cache=nb.info.get("cache"),
                neighbors_anon_mb=anon.take(),
                neighbors_info={k: nb.info.get(k) for k in ("nlist", "nprobe", "k_factor", "build_s", "search_s",
                                                            "recall_s")})
    del nb
    print("stage", json.dumps(rows), file=sys.stderr, flush=True)
    if args.stop_after == "neighbors":  # a 10M run split over two sittings: the neighbours stay cached in --work
        dist.shutdown()
        return rows

    t, cpu = time.perf_counter(), time.process_time()
    # the heads' labels are kept in the work dir, so a re-run after a later stage failed skips the heads
    tag = f"{args.n}-{args.heads}-{args.epochs}-{args.k}-{args.batch_size}-p{dist.world_size()}"
    saved = work / f"head_labels-{tag}.npy"
    if saved.is_file() and not args.heads_only and args.reuse_heads:
        head_labels = np.load(saved)
        rows.update(heads_reused=str(saved))
    else:
        model.fit(x, FitContext(seed=0, progress=args.progress, work_dir=work))
        ep = model.history_["epoch_s"]
        head_labels = model.head_labels_
        rows.update(heads_epoch_s=float(np.median(ep)), head_labels_dtype=str(head_labels.dtype),
                    heads_train_s=model.history_.get("train_s"), heads_neighbors_s=model.history_.get("neighbors_s"))
        if dist.is_main() and not args.heads_only:
            np.save(saved, head_labels)
        del model
    # CPU seconds of the heads summed over ranks: on a shared machine the wall ratio also measures how
    # the scheduler shares the cores (2 processes get 2 shares); the CPU total shows the cost of parallelism
    cpu_t = torch.tensor([time.process_time() - cpu], dtype=torch.float64)
    rows.update(heads_s=time.perf_counter() - t, heads_cpu_s=float(dist.all_reduce_sum(cpu_t)[0]),
                heads_rss_mb=rss_mb(), heads_anon_mb=anon.take())
    print("stage", json.dumps(rows), file=sys.stderr, flush=True)
    if args.heads_only or not dist.is_main():
        dist.shutdown()
        return rows
    return streaming_stages(args, x, head_labels, rows, anon)


def synthetic_heads(n: int, heads: int, k: int, noise: float = 0.3, seed: int = 0) -> np.ndarray:
    """(heads, n) int16 stand-in head labels: noisy, relabelled copies of one K-way labelling."""
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, k, n).astype(np.int16)
    out = np.empty((heads, n), np.int16)
    for h in range(heads):
        for s in range(0, n, 1 << 20):
            t = truth[s:s + (1 << 20)]
            out[h, s:s + len(t)] = rng.permutation(k).astype(np.int16)[
                np.where(rng.random(len(t)) < noise, rng.integers(0, k, len(t)), t)]
    return out


def streaming_stages(args, x, head_labels, rows: dict, anon) -> dict:
    """Consensus (MCLA + HBGF) over the (H, N) head labels, then self-training on the memmap."""
    from imgclust.consensus import consensus
    from imgclust.refine.selftrain import self_train
    from imgclust.train import dist

    rows["synthetic_heads"] = bool(args.synthetic_heads)
    anon.take()
    t, cpu = time.perf_counter(), time.process_time()
    res = consensus(head_labels, args.k, methods=("mcla", "hbgf"), seed=0)
    rows.update(consensus_s=time.perf_counter() - t, consensus_cpu_s=time.process_time() - cpu,
                consensus_rss_mb=rss_mb(), consensus_anon_mb=anon.take(), consensus=res.summary())
    labels = res.labels
    del res, head_labels
    print("stage", json.dumps(rows), file=sys.stderr, flush=True)
    t, cpu = time.perf_counter(), time.process_time()
    st = self_train(x, labels, args.k, lrs=(1e-3, 1e-2), weight_decays=(1e-4,), epochs=args.st_epochs,
                    batch_size=1024, seed=0, progress=args.progress)
    pred = st.classifier.predict(x)  # blocks of 65,536 rows
    rows.update(selftrain_s=time.perf_counter() - t, selftrain_cpu_s=time.process_time() - cpu,
                selftrain_rss_mb=rss_mb(), selftrain_anon_mb=anon.take(),
                selftrain_holdout_acc=max((g.get("holdout_acc") or 0.0) for g in st.grid) if st.grid else None,
                selftrain_agreement=float((pred == labels).mean()))
    dist.shutdown()
    return rows


def launch(args, world: int, heads_only: bool) -> dict:
    out = Path(args.work) / f"result-{world}-{int(heads_only)}.json"
    common = [__file__, "--child", "--n", str(args.n), "--dim", str(args.dim), "--heads", str(args.heads),
              "--epochs", str(args.epochs), "--k", str(args.k), "--batch-size", str(args.batch_size),
              "--st-epochs", str(args.st_epochs), "--exact-max-rows", str(args.exact_max_rows), "--work", args.work, "--out", str(out),
              "--fast-min-rows", str(args.fast_min_rows)]
    common += ["--reuse-heads"] * args.reuse_heads + ["--progress"] * args.progress + ["--checkpoint"] * args.checkpoint
    common += ["--synthetic-heads"] * args.synthetic_heads
    common += ["--stop-after", args.stop_after] if args.stop_after else []
    if heads_only:
        common.append("--heads-only")
    # The child's options travel in the environment: torchrun's own parser would take "--n" for "--nnodes".
    threads = args.threads or max(1, (os.cpu_count() or 1) // world)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads),
           "IMGCLUST_SCALE_CHILD": json.dumps(common[1:])}
    if world == 1:
        cmd = [sys.executable, __file__]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
               "--master_addr=127.0.0.1", __file__]
    subprocess.run(cmd, check=True, env=env)
    return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--heads", type=int, default=50)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--st-epochs", type=int, default=2)
    ap.add_argument("--exact-max-rows", type=int, default=200_000, help="IVF above this many rows (lower it to "
                    "measure the approximate index's recall on a small N)")
    ap.add_argument("--fast-min-rows", type=int, default=0, help="the large-N neighbour index (IVF + PQ fast-scan + "
                    "SQ8 re-rank) from this many rows (default: the library's, 4M)")
    ap.add_argument("--ratio", type=int, default=0, help="also time the heads with this many processes (and 1)")
    ap.add_argument("--threads", type=int, default=0, help="threads per process (default: cores / processes)")
    ap.add_argument("--work", default=None)
    ap.add_argument("--reuse-heads", action="store_true", help="reuse the heads' labels a previous run left in --work")
    ap.add_argument("--checkpoint", action="store_true", help="checkpoint the heads in --work (per epoch and every "
                    "10 minutes inside one), so a killed 10M run resumes where it stopped")
    ap.add_argument("--progress", action="store_true", help="progress bars (stderr)")
    ap.add_argument("--synthetic-heads", action="store_true", help="skip neighbours and heads: consensus and "
                    "self-training on stand-in head labels (noisy copies of one labelling), the streaming stages alone")
    ap.add_argument("--stop-after", choices=["neighbors"], default=None, help="end after this stage (its result "
                    "stays cached in --work; the same command without it goes on from there)")
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--heads-only", action="store_true")
    ap.add_argument("--out", default=None)
    child = os.environ.pop("IMGCLUST_SCALE_CHILD", None)
    args = ap.parse_args(json.loads(child) if child else None)
    if args.child:
        rows = pipeline(args)
        if int(os.environ.get("RANK", "0")) == 0:
            Path(args.out).write_text(json.dumps(rows))
        return
    tmp = None
    if args.work is None:
        tmp = tempfile.mkdtemp(prefix="imgclust-scale-")
        args.work = tmp
    Path(args.work).mkdir(parents=True, exist_ok=True)
    try:
        results = []
        if args.ratio:
            one = launch(args, 1, heads_only=True)
            many = launch(args, args.ratio, heads_only=True)
            results += [one, many]
            print(f"heads epoch, 1 vs {args.ratio} processes: {one['heads_epoch_s']:.1f} s vs "
                  f"{many['heads_epoch_s']:.1f} s (ratio {one['heads_epoch_s'] / many['heads_epoch_s']:.2f}); "
                  f"heads CPU s summed over ranks {one['heads_cpu_s']:.1f} vs {many['heads_cpu_s']:.1f}")
        else:
            results.append(launch(args, 1, heads_only=False))
        cols = ["n", "processes", "features_s", "neighbors_s", "neighbors_cpu_s", "index", "recall_at_50", "heads_s",
                "heads_epoch_s", "heads_cpu_s", "consensus_s", "consensus_cpu_s", "selftrain_s", "selftrain_cpu_s", "features_anon_mb", "neighbors_anon_mb", "heads_anon_mb",
                "consensus_anon_mb", "selftrain_anon_mb", "selftrain_rss_mb"]
        print(" | ".join(cols))
        for r in results:
            print(" | ".join(f"{r[c]:.3g}" if isinstance(r.get(c), float) else str(r.get(c, "-")) for c in cols))
        print(json.dumps(results))
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
