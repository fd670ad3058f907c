#!/usr/bin/env python
"""Run benchmark cases through the real CLI and print a table.

    python benchmarks/run.py --shared ../shared                # every case
    python benchmarks/run.py --shared ../shared --tag quick    # a group
    python benchmarks/run.py --case digits/pixels/kmeans       # by name

Each case runs `imgclust cluster` in its own process (so peak memory is that case's alone)
and reads the run's run.json: ACC/NMI/ARI, wall time, feature throughput, peak RSS. Features
are cached (IMGCLUST_CACHE or --cache-dir), so a rerun measures clustering only unless
--fresh-cache is given. Results are also written as JSON next to the run directories.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import tomllib

HERE = Path(__file__).resolve().parent


def load_cases(path: Path) -> list[dict]:
    return tomllib.loads(path.read_text())["case"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=Path, default=HERE / "cases.toml")
    ap.add_argument("--case", action="append", help="run only cases with this name (repeatable)")
    ap.add_argument("--tag", action="append", help="run only cases with this tag (repeatable)")
    ap.add_argument("--shared", default=os.environ.get("IMGCLUST_SHARED"), help="shared data dir (or $IMGCLUST_SHARED)")
    ap.add_argument("--out", type=Path, default=Path("runs/benchmarks"), help="where run directories go")
    ap.add_argument("--cache-dir", default=None, help="feature cache (default: imgclust's)")
    ap.add_argument("--fresh-cache", action="store_true", help="use an empty temporary feature cache")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    cases = load_cases(args.cases)
    if args.case:
        cases = [c for c in cases if c["name"] in args.case]
    if args.tag:
        cases = [c for c in cases if set(args.tag) & set(c.get("tags", []))]
    if not cases:
        print("no case selected", file=sys.stderr)
        return 2
    cache = tempfile.mkdtemp(prefix="imgclust-bench-") if args.fresh_cache else args.cache_dir
    results = []
    for c in cases:
        src = c["source"]
        if "{shared}" in src:
            if not args.shared:
                print(f"skip {c['name']}: needs --shared or IMGCLUST_SHARED", file=sys.stderr)
                continue
            src = src.replace("{shared}", str(Path(args.shared).resolve()))
        run_dir = args.out / c["name"].replace("/", "__")
        cmd = [sys.executable, "-m", "imgclust.cli", "cluster", src, "--k", str(c["k"]), "--out", str(run_dir),
               "--seed", str(args.seed), "--quiet", *c.get("args", [])]
        if cache:
            cmd += ["--cache-dir", str(cache)]
        print(f"[{c['name']}] {' '.join(cmd[2:])}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            print(proc.stderr[-2000:], file=sys.stderr)
            results.append({"name": c["name"], "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"})
            continue
        run = json.loads((run_dir / "run.json").read_text())
        m = run.get("metrics") or {}
        results.append({
            "name": c["name"], "n": run["n_clustered"], "acc": m.get("acc"), "nmi": m.get("nmi"), "ari": m.get("ari"),
            "wall_s": wall, "features_s": run["timings_s"]["features"], "method_s": run["timings_s"]["method"],
            "img_per_s": None if run["features"]["from_cache"] else run["features"]["images_per_second"],
            "peak_rss_mb": run["peak_rss_mb"],
        })
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    print(table(results))
    return 0 if all("error" not in r for r in results) else 1


def table(rows: list[dict]) -> str:
    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    lines = ["| case | n | ACC | NMI | ARI | wall s | features s | method s | img/s | peak MB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | error: {r['error']} |||||||||")
            continue
        lines.append(
            f"| {r['name']} | {r['n']} | {f(r['acc'], '.4f')} | {f(r['nmi'], '.4f')} | {f(r['ari'], '.4f')} | "
            f"{r['wall_s']:.1f} | {r['features_s']:.1f} | {r['method_s']:.2f} | {f(r['img_per_s'], '.0f')} | {r['peak_rss_mb']:.0f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
