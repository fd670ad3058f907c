"""The report's "hierarchy" section: the merge tree as a dendrogram with the marked K, and the trust score.

Reads ``hierarchy.json`` (written by ``imgclust cluster --k auto``, see
:mod:`imgclust.hierarchy`) and the ``trust`` entry of ``run.json`` (:mod:`imgclust.trust`).
The dendrogram's leaves are the over-clustering's pieces; a merge at height h leaves
``n_leaves - h`` clusters, so a horizontal cut line at K crosses exactly K branches.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import numpy as np

from imgclust.rundir import read_json


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def linkage_matrix(merges: list[list[int]], n_leaves: int) -> np.ndarray:
    """scipy linkage matrix (L-1, 4) of the merge sequence: merge i at height i + 1."""
    node = {a: a for a in range(n_leaves)}  # representative leaf -> current node id
    count = {a: 1 for a in range(n_leaves)}
    z = np.zeros((len(merges), 4))
    for i, (a, b) in enumerate(merges):
        na, nb = node[a], node[b]
        z[i] = [min(na, nb), max(na, nb), i + 1, count[na] + count[nb]]
        new = n_leaves + i
        count[new] = count[na] + count[nb]
        node[min(a, b)] = new
        node[a] = node[b] = new
    return z


def dendrogram_svg(h: dict[str, Any], width: int = 760, height: int = 300) -> str:
    from scipy.cluster.hierarchy import dendrogram

    n = int(h["n_leaves"])
    z = linkage_matrix(h["merges"], n)
    d = dendrogram(z, no_plot=True)
    ml, mr, mt, mb = 44, 12, 10, 22
    pw, ph = width - ml - mr, height - mt - mb
    k_lo = 2
    top = n - k_lo + 1  # show merges down to K = 2 (the last merge, to 1 cluster, is off the top)

    def x(v: float) -> float:
        return ml + pw * (v - 5) / max(10 * n - 10, 1)

    def y(hgt: float) -> float:
        return mt + ph * (1 - min(hgt, top) / top)

    parts = [f'<svg viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" aria-label="merge tree">',
             f'<rect x="{ml}" y="{mt}" width="{pw}" height="{ph}" fill="#fafafa" stroke="#ccc"/>']
    for ic, dc in zip(d["icoord"], d["dcoord"]):
        pts = " ".join(f"{x(a):.1f},{y(b):.1f}" for a, b in zip(ic, dc))
        parts.append(f'<polyline points="{pts}" fill="none" stroke="#555" stroke-width="1"/>')
    cands = [int(k) for k in h.get("candidates", [])]
    for j, k in enumerate(cands):
        yy = y(n - k + 0.5)
        color = "#d62728" if k == h.get("k") else "#1f77b4"
        parts.append(f'<line x1="{ml}" y1="{yy:.1f}" x2="{ml + pw}" y2="{yy:.1f}" stroke="{color}" stroke-dasharray="5 3"/>'
                     f'<text x="{ml + pw - 4}" y="{yy - 3:.1f}" fill="{color}" font-size="12" text-anchor="end">'
                     f'K = {k}{" (this run)" if k == h.get("k") else f" (candidate {j + 1})"}</text>')
    for k in sorted({2, 5, 10, 20, 40, n} & set(range(2, n + 1))):
        parts.append(f'<text x="{ml - 6}" y="{y(n - k + 0.5) + 4:.1f}" font-size="11" text-anchor="end">{k}</text>')
    parts.append(f'<text x="{ml - 30}" y="{mt + ph / 2:.1f}" font-size="11">K</text>')
    parts.append(f'<text x="{ml + pw / 2:.1f}" y="{height - 6}" font-size="11" text-anchor="middle">'
                 f'{n} leaves (over-clustering), merged bottom-up</text></svg>')
    return "".join(parts)


def hierarchy_section(run_dir: str | Path, run: dict[str, Any]) -> str:
    """HTML of the section, or "" when the run has neither a hierarchy nor a trust score."""
    p = Path(run_dir) / "hierarchy.json"
    trust = run.get("trust")
    out = ['<section id="hierarchy"><h2>Hierarchy and trust</h2>']
    if p.is_file():
        try:
            h = read_json(p)
            svg = dendrogram_svg(h)
        except Exception as e:  # noqa: BLE001 - a damaged file loses its picture, never the report
            out.append(f"<p>hierarchy.json could not be drawn ({_e(type(e).__name__)}).</p>")
        else:
            pers = h.get("persistence", {})
            mod = h.get("modularity", {})
            rows = "".join(
                f'<tr{" class=pick" if int(k) == h.get("k") else ""}><td>{k}</td><td>{float(v):.3f}</td>'
                f'<td>{float(mod.get(str(k), "nan")):.4f}</td></tr>' for k, v in pers.items())
            out.append(
                f'<p>The {h["n_leaves"]} pieces of an over-clustering, merged two at a time by the largest modularity gain '
                f'on the images\' nearest-neighbour graph, down to 2 clusters. Three readings of the tree vote (the cut with '
                f'the highest modularity, the first cut reaching 97 % of the modularity gain, the cut that stays best over '
                f'the widest range of resolutions), in {len(h.get("info", {}).get("votes_all_trees") or [0])} tree(s) from '
                f'over-clusterings of different seeds; the median vote is the pick, marked with every tree\'s '
                f'highest-modularity cut. Marked: '
                f'<b>{", ".join(map(str, h.get("candidates", [])))}</b>. '
                f'This run is cut at K = {h.get("k")}. Another cut, in seconds and without re-training: '
                f'<code>imgclust recut {_e(run.get("out_dir", "RUN"))} --k N --out DIR</code>.</p>{svg}'
                f'<details><summary>values</summary><table class="num"><tr><th>K</th><th>share of resolutions won</th>'
                f'<th>modularity</th></tr>{rows}</table></details>')
    if trust:
        per = trust.get("per_cluster") or []
        chips = "".join(f'<span class="chip">{c}: {v:.2f}</span>' for c, v in enumerate(per) if v is not None)
        heads = (f" Agreement of the heads with the final clusters (ANMI): {trust['head_agreement']:.3f}."
                 if "head_agreement" in trust else "")
        out.append(f'<h3>Trust (no labels): {trust["score"]:.3f}</h3><p>{_e(trust.get("definition", ""))}: '
                   f'0 = no better than a random partition of the same sizes, 1 = every image\'s neighbours share its '
                   f'cluster.{heads} Per cluster:</p><div class="chips">{chips}</div>')
    if len(out) == 1:
        return ""
    out.append("</section>")
    return "".join(out)
