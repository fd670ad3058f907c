"""Soak run: `imgclust cluster` on the CIFAR-10 test images with 1 % of them corrupted.

Extracts the test split of the shared CIFAR-10 JPEG tar into a temporary folder (one
sub-folder per class), makes a copy in which N seeded files are corrupted (a mix of
truncation, zero bytes and random bytes, half of these behind a JPEG header), runs
`imgclust cluster` on the clean and the corrupted folder, and checks that

* the clean run skips nothing;
* the corrupted run skips exactly the corrupted files (same set of relative paths);
* both finish and their ACC differs by at most 0.5 points.

Usage::

    python benchmarks/soak_corrupt.py [--tar ../shared/data/cifar10-jpg.tar.gz] [--n-corrupt 100]
                                      [--image-size 96] [--seed 0] [--keep DIR]

The feature cache lives in the temporary folder (``IMGCLUST_CACHE``), so nothing is reused
from or left in the user's cache. Exit status 0 when every check passes, 1 otherwise.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

# The shared data folder: $IMGCLUST_SHARED, else ../shared next to the repository.
SHARED = Path(os.environ.get("IMGCLUST_SHARED") or Path(__file__).resolve().parents[1].parent / "shared")


def extract_split(tar_path: Path, split: str, dest: Path) -> list[str]:
    """Regular files under ``<split>/<class>/`` written to ``dest/<class>/``; returns their relative paths."""
    rels = []
    with tarfile.open(tar_path) as tf:
        for m in tf:
            parts = m.name.split("/")
            if not m.isfile() or len(parts) != 3 or parts[0] != split or any(p in ("", ".", "..") for p in parts):
                continue
            rel = f"{parts[1]}/{parts[2]}"
            out = dest / parts[1] / parts[2]
            out.parent.mkdir(parents=True, exist_ok=True)
            f = tf.extractfile(m)
            assert f is not None
            out.write_bytes(f.read())
            rels.append(rel)
    return sorted(rels)


def corrupt(root: Path, rels: list[str], n: int, seed: int) -> dict[str, str]:
    """Corrupt ``n`` seeded files in place; returns {relative path: kind}."""
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(len(rels), size=n, replace=False))
    kinds = ["truncated", "zero bytes", "random bytes", "random bytes behind a JPEG header"]
    done = {}
    for j, i in enumerate(chosen):
        p = root / rels[i]
        data = p.read_bytes()
        kind = kinds[j % len(kinds)]
        if kind == "truncated":
            new = data[: int(len(data) * rng.uniform(0.1, 0.6))]
        elif kind == "zero bytes":
            new = b""
        elif kind == "random bytes":
            new = rng.integers(0, 256, len(data), dtype=np.uint8).tobytes()
        else:
            new = b"\xff\xd8\xff\xe0" + rng.integers(0, 256, len(data), dtype=np.uint8).tobytes()
        p.write_bytes(new)
        done[rels[i]] = kind
    return done


def run_cluster(folder: Path, out: Path, cache: Path, image_size: int, k: int) -> tuple[dict, list[dict], float]:
    cmd = [sys.executable, "-m", "imgclust.cli", "cluster", str(folder), "--k", str(k), "--backbone",
           "efficientnet-lite0", "--image-size", str(image_size), "--out", str(out), "--quiet"]
    env = dict(os.environ, IMGCLUST_CACHE=str(cache))
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    dt = time.perf_counter() - t0
    print(f"$ IMGCLUST_CACHE={cache} imgclust {' '.join(cmd[3:])}\n{r.stdout.strip()}")
    if r.returncode != 0:
        print(r.stderr, file=sys.stderr)
        raise SystemExit(f"imgclust exited with {r.returncode}")
    with open(out / "skipped.csv", encoding="utf-8", newline="") as f:
        skipped = list(csv.DictReader(f))
    return json.loads((out / "metrics.json").read_text()), skipped, dt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tar", type=Path, default=SHARED / "data" / "cifar10-jpg.tar.gz")
    ap.add_argument("--split", default="test")
    ap.add_argument("--n-corrupt", type=int, default=100)
    ap.add_argument("--image-size", type=int, default=96)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-acc-diff", type=float, default=0.005, help="allowed |ACC clean - ACC corrupt| (0.005 = 0.5 points)")
    ap.add_argument("--keep", type=Path, default=None, help="work here and keep the folders and runs")
    a = ap.parse_args()

    work = a.keep or Path(tempfile.mkdtemp(prefix="imgclust-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        clean, bad = work / "clean", work / "corrupt"
        for d in (clean, bad):
            if d.exists():
                shutil.rmtree(d)
        rels = extract_split(a.tar, a.split, clean)
        shutil.copytree(clean, bad)
        corrupted = corrupt(bad, rels, a.n_corrupt, a.seed)
        kinds = {k: sum(v == k for v in corrupted.values()) for k in sorted(set(corrupted.values()))}
        print(f"{len(rels)} images from {a.tar.name}:{a.split}; corrupted {len(corrupted)} "
              f"({len(corrupted) / len(rels):.1%}): {kinds}\n")

        m_clean, skip_clean, t_clean = run_cluster(clean, work / "run_clean", work / "cache", a.image_size, a.k)
        m_bad, skip_bad, t_bad = run_cluster(bad, work / "run_corrupt", work / "cache", a.image_size, a.k)

        skipped_ids = {row["id"] for row in skip_bad}
        reasons: dict[str, int] = {}
        for row in skip_bad:
            reasons[row["reason"]] = reasons.get(row["reason"], 0) + 1
        diff = abs(m_clean["acc"] - m_bad["acc"])
        checks = {
            "clean run skipped nothing": len(skip_clean) == 0,
            f"corrupt run skipped exactly {len(corrupted)}": len(skip_bad) == len(corrupted),
            "skipped list == corrupted list": skipped_ids == set(corrupted),
            f"|ACC clean - ACC corrupt| <= {a.max_acc_diff * 100:.1f} points": diff <= a.max_acc_diff,
        }
        print(f"\nskipped (clean run):   {len(skip_clean)}")
        print(f"skipped (corrupt run): {len(skip_bad)}  reasons: {reasons}")
        print(f"skipped list equals corrupted list: {skipped_ids == set(corrupted)}"
              + ("" if skipped_ids == set(corrupted) else
                 f" (missed {sorted(set(corrupted) - skipped_ids)[:5]}, extra {sorted(skipped_ids - set(corrupted))[:5]})"))
        print(f"ACC clean   {m_clean['acc']:.4f}  NMI {m_clean['nmi']:.4f}  on {m_clean['n_evaluated']} images  ({t_clean:.0f} s)")
        print(f"ACC corrupt {m_bad['acc']:.4f}  NMI {m_bad['nmi']:.4f}  on {m_bad['n_evaluated']} images  ({t_bad:.0f} s)")
        print(f"ACC difference: {diff * 100:.2f} points")
        for name, ok in checks.items():
            print(f"[{'PASS' if ok else 'FAIL'}] {name}")
        return 0 if all(checks.values()) else 1
    finally:
        if a.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
