"""Report sections of issue 21: near-duplicates and outliers (``duplicates.csv``/``outliers.csv``,
from :mod:`imgclust.duplicates`) and, for a run written by ``imgclust apply-edits``, what the
edits changed (``changes.csv``)."""

from __future__ import annotations

import csv
import html
from pathlib import Path
from typing import Any

import numpy as np

MAX_GROUPS = 20
MAX_OUTLIERS = 32
MAX_CHANGES = 200


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def quality_rows(run_dir: Path) -> tuple[list[dict[str, str]], list[dict[str, str]]] | None:
    from imgclust.duplicates import read_quality

    return read_quality(run_dir)


def wanted_rows(q: tuple[list[dict[str, str]], list[dict[str, str]]] | None, ids: list[str],
                rows: np.ndarray | None) -> list[int]:
    """Source indices of the images these sections show (for thumbnails)."""
    if q is None or rows is None:
        return []
    pos = {s: i for i, s in enumerate(ids)}
    dups, outs = q
    groups: dict[str, list[str]] = {}
    for r in dups:
        if len(groups) < MAX_GROUPS or r["group"] in groups:
            groups.setdefault(r["group"], []).append(r["id"])
    want = [i for g in groups.values() for i in g[:12]] + [r["id"] for r in outs[:MAX_OUTLIERS]]
    return [int(rows[pos[i]]) for i in want if i in pos]


def quality_section(q: tuple[list[dict[str, str]], list[dict[str, str]]] | None, ids: list[str],
                    rows: np.ndarray | None, thumbs: dict[int, str]) -> str:
    if q is None:
        return ""
    dups, outs = q
    pos = {s: i for i, s in enumerate(ids)}

    def img(i: str, cap: str) -> str:
        uri = thumbs.get(int(rows[pos[i]])) if rows is not None and i in pos else None
        if uri is None:
            return f'<span class="ph" title="{_e(i)} · {_e(cap)}"></span>'
        return f'<img src="{uri}" title="{_e(i)} · {_e(cap)}" alt="{_e(i)}" loading="lazy">'

    groups: dict[str, list[dict[str, str]]] = {}
    for r in dups:
        groups.setdefault(r["group"], []).append(r)
    out = [f'<section id="duplicates"><h2>Near-duplicates and outliers</h2><p>{len(groups):,} near-duplicate groups '
           f'({len(dups):,} images; duplicates.csv) and {sum(1 for r in outs if r.get("outlier", "1") == "1"):,} outliers '
           f'beyond the fence among the {len(outs):,} most isolated images (outliers.csv), from the features '
           '(cosine similarity of the centred features, or of 16x16 grey thumbnails; see imgclust.duplicates). '
           'Open <code>imgclust review</code> '
           'to act on them.</p>']
    for g, members in list(groups.items())[:MAX_GROUPS]:
        out.append(f'<div class="row"><span class="tag">group {_e(g)} · {len(members)} · sim &ge; '
                   f'{_e(members[0]["group_min_similarity"])}</span>'
                   + "".join(img(r["id"], f"cluster {r['cluster']}") for r in members[:12]) + "</div>")
    if outs:
        out.append('<div class="row low"><span class="tag">most isolated</span>'
                   + "".join(img(r["id"], f"score {r['score']} · cluster {r['cluster']}") for r in outs[:MAX_OUTLIERS])
                   + "</div>")
    out.append("</section>")
    return "".join(out)


def changes_section(run_dir: Path, run: dict[str, Any]) -> str:
    """What ``apply-edits`` changed: the edit summary and the first rows of changes.csv."""
    p = Path(run_dir) / "changes.csv"
    e = run.get("edits")
    if not p.is_file() or not isinstance(e, dict):
        return ""
    with open(p, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    names = run.get("cluster_names") or {}
    ops = ", ".join(f"{v} {k}" for k, v in (e.get("ops") or {}).items())
    trs = "".join(f"<tr><td>{_e(r['id'])}</td><td>{_e(r['old_cluster'])}</td><td>{_e(r['new_cluster'])}</td>"
                  f"<td>{_e(r['edit'])}</td></tr>" for r in rows[:MAX_CHANGES])
    nm = "".join(f"<li>cluster {_e(c)}: {_e(n)}</li>" for c, n in names.items())
    return (f'<section id="changes"><h2>Edits applied</h2><p>From {_e(run.get("edited_from", "?"))}: {_e(ops)}; '
            f'{e.get("n_changed", 0):,} images changed cluster, {e.get("n_moved", 0):,} moved by hand, '
            f'{e.get("n_outliers_marked", 0):,} marked as outliers (all in changes.csv).</p>'
            + (f"<ul>{nm}</ul>" if nm else "")
            + f'<div class="scroll"><table class="num"><tr><th>id</th><th>old cluster</th><th>new cluster</th><th>edit</th></tr>'
            f'{trs}</table></div>' + (f"<p>... and {len(rows) - MAX_CHANGES:,} more</p>" if len(rows) > MAX_CHANGES else "")
            + "</section>")
