#!/usr/bin/env python
"""Thread settings on a busy machine: k-means and icce-heads epochs with a CPU hog beside them.

    python benchmarks/threads_busy.py                       # 2 hog processes, 5 rounds
    python benchmarks/threads_busy.py --hogs 0 --rounds 3   # idle machine, for comparison

Starts ``--hogs`` busy-loop processes (pure Python ``while True``, one core each), waits
``--warmup`` seconds so the 1-minute load average sees them, then runs, interleaved round by
round so drift in the shared machine's load hits every setting alike, each thread setting
in a fresh process:

* ``cores``: one thread per available CPU, what torch/faiss/OpenBLAS do without a limit
  (the behaviour before issue 24),
* ``auto``: :func:`imgclust.threads.default_threads` (CPUs minus the load),
* ``1``: one thread.

Each child clusters scikit-learn's digits (1,797 images; ``pixels`` backbone at 8 px, 64-d)
with k-means (``n_init=10``), timing only the method step, and trains ``icce-heads``
(10 heads, 5 epochs), reporting the median epoch time. The table prints the median over
rounds and the ratio to ``cores``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import time


def _hog() -> None:  # pragma: no cover - a CPU burner
    x = 0
    while True:
        x += 1


def child(setting: str) -> dict:
    # The environment a user without --threads has: no OMP_NUM_THREADS.
    from imgclust import ImageClusterer
    from imgclust.threads import available_cpus

    threads = {"cores": available_cpus(), "auto": "auto"}.get(setting, setting)
    out = {"setting": setting}
    est = ImageClusterer(n_clusters=10, method="kmeans", backbone="pixels", image_size=8, progress=False,
                         threads=threads, method_options={"n_init": 10})
    est.fit("digits")
    out["kmeans_s"] = est.timings_["method_s"]
    from imgclust.threads import current_threads

    out["threads"] = current_threads()["limit"]
    est = ImageClusterer(n_clusters=10, method="icce-heads", backbone="pixels", image_size=8, progress=False,
                         threads=threads, method_options={"heads": 10, "epochs": 5, "warmup_epochs": 0})
    est.fit("digits")
    ep = est.model_.history_["epoch_s"]
    out["icce_epoch_s"] = statistics.median(ep)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hogs", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=float, default=60.0, help="seconds of hogging before the first round")
    ap.add_argument("--settings", nargs="+", default=["cores", "auto", "1"])
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child)))
        return
    hogs = [mp.Process(target=_hog, daemon=True) for _ in range(a.hogs)]
    for h in hogs:
        h.start()
    try:
        if a.hogs:
            time.sleep(a.warmup)
        env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "IMGCLUST_THREADS",
                                                                    "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
        env["IMGCLUST_QUIET"] = "1"
        res: dict[str, list[dict]] = {s: [] for s in a.settings}
        for r in range(a.rounds):
            for s in a.settings:
                p = subprocess.run([sys.executable, __file__, "--child", s], capture_output=True, text=True, env=env,
                                   check=True)
                row = json.loads(p.stdout.strip().splitlines()[-1])
                row["load"] = os.getloadavg()[0]
                res[s].append(row)
                print(f"round {r + 1} {s:>5}: threads {row['threads']}  k-means {row['kmeans_s']:.3f} s  "
                      f"icce epoch {row['icce_epoch_s']:.3f} s  load {row['load']:.1f}", file=sys.stderr, flush=True)
    finally:
        for h in hogs:
            h.terminate()
    base = {key: statistics.median(r[key] for r in res[a.settings[0]]) for key in ("kmeans_s", "icce_epoch_s")}
    print(f"\n{a.hogs} hog process(es) on {os.cpu_count()} CPUs, {a.rounds} interleaved rounds, medians")
    print(f"{'setting':<8} {'threads':>7} {'k-means s':>10} {'ratio':>6} {'icce epoch s':>13} {'ratio':>6}")
    for s in a.settings:
        km = statistics.median(r["kmeans_s"] for r in res[s])
        ic = statistics.median(r["icce_epoch_s"] for r in res[s])
        th = sorted({r["threads"] for r in res[s]})
        print(f"{s:<8} {'/'.join(map(str, th)):>7} {km:>10.3f} {km / base['kmeans_s']:>6.2f} {ic:>13.3f} "
              f"{ic / base['icce_epoch_s']:>6.2f}")


if __name__ == "__main__":
    main()
