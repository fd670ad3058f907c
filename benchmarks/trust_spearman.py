"""Spearman(trust, ACC) over the run tables of one or more benchmarks/choose_k.py logs; the same
partition listed twice (e.g. the pick = the true K) counts once.

    python benchmarks/trust_spearman.py bench_a.log bench_b.log
"""
import re
import sys

from scipy.stats import spearmanr

rows = []
for path in sys.argv[1:]:
    seen = set()
    for line in open(path):
        m = re.match(r"\| (\S+) \| ([^|]+) \| ([0-9.]+) \| ([0-9.]+) \|$", line.strip())
        if not m:
            continue
        key = (m[1], m[3], m[4])  # the same partition twice (e.g. the pick = the true K) counts once
        if key in seen:  # the 4-set log listed the tree cut at the true K twice when it was the pick
            continue
        seen.add(key)
        rows.append((m[1], m[2], float(m[3]), float(m[4])))
for r in rows:
    print(r)
rho, p = spearmanr([r[2] for r in rows], [r[3] for r in rows])
print(f"Spearman(trust, ACC) over {len(rows)} runs on {len({r[0] for r in rows})} sets: rho = {rho:.3f} (p = {p:.2g})")
for s in sorted({r[0] for r in rows}):
    sub = [r for r in rows if r[0] == s]
    print(s, len(sub), round(spearmanr([r[2] for r in sub], [r[3] for r in sub])[0], 3))
