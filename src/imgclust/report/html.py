"""``report.html``: one self-contained file that shows a clustering run.

Sections: a summary (sizes, metrics when labels are known), the choice of K (when the run
chose it, ``choose_k.json``), a 2-D map of the features coloured by cluster with the image
under the mouse, the contingency table after Hungarian matching with per-cluster purity
(labels known), a gallery per cluster (the most confident members first, then the least
confident: the boundary, where mistakes live), and the run's config and timings.

Everything is inline: CSS, a few lines of hand-written JavaScript (hover and highlight:
no plotting library, so nothing to fetch and nothing to vendor), SVG charts and thumbnails
as ``data:`` URIs. No ``http(s)://`` reference, web font or external script: the file opens
offline and keeps no link to the images' location. Its size is bounded whatever the run's
size: at most ``max_thumbs`` gallery thumbnails (shared out over the clusters) and
``map_points`` points on the map (a stratified sample: every cluster is on it), so a
100,000-image run gives a report of a few MB.
"""

from __future__ import annotations

import html
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from imgclust.data import ImageSource
from imgclust.errors import InputError
from imgclust.report.embed import embed_2d, resolve_method
from imgclust.report.rundata import (
    RunData,
    load_run,
    load_run_features,
    open_run_source,
)
from imgclust.report.selection import selection_section
from imgclust.report.thumbnails import make_thumbnails
from imgclust.rundir import atomic_open

REPORT_NAME = "report.html"
_NAV = [("summary", "summary"), ("choose-k", "choice of K"), ("selection", "choice of method"), ("hierarchy", "hierarchy"),
        ("map", "map"), ("contingency", "labels"), ("gallery", "clusters"), ("duplicates", "duplicates"),
        ("changes", "edits"), ("config", "config")]
_TAB10 = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]


def cluster_colors(k: int) -> list[str]:
    """Tableau-10 for the first ten clusters, then hues spaced by the golden angle (distinct for any K)."""
    out = list(_TAB10[:k])
    for c in range(len(out), k):
        out.append(f"hsl({(c * 137.508) % 360:.1f}, 65%, {45 + 10 * (c % 3)}%)")
    return out


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _script_json(obj: Any) -> str:
    """JSON safe inside <script>: no ``</script>`` or ``<!--`` can close or confuse the element."""
    return json.dumps(obj, separators=(",", ":")).replace("<", "\\u003c").replace(">", "\\u003e")


# ----------------------------------------------------------------------------- selection
def select_gallery(clusters: np.ndarray, confidence: np.ndarray, k: int, per_cluster: int, boundary: int,
                   max_thumbs: int) -> dict[int, tuple[list[int], list[int]]]:
    """Rows to show per cluster: (most confident first, least confident last), disjoint.

    The per-cluster budget shrinks with K so that the total stays under ``max_thumbs``
    (at least 4 per cluster), a quarter-or-so of it (``boundary``) for the boundary.
    """
    budget = max(4, min(per_cluster, max_thumbs // max(k, 1)))
    n_bnd = min(boundary, budget // 3)
    out: dict[int, tuple[list[int], list[int]]] = {}
    for c in range(k):
        rows = np.flatnonzero(clusters == c)
        order = rows[np.lexsort((rows, -confidence[rows]))]  # confidence descending, ties by row
        if len(order) <= budget:
            out[c] = (order.tolist(), [])
        else:
            out[c] = (order[: budget - n_bnd].tolist(), order[len(order) - n_bnd:][::-1].tolist())
    return out


def select_map_rows(clusters: np.ndarray, k: int, n_points: int, seed: int = 0) -> np.ndarray:
    """A stratified random sample of at most ``n_points`` rows: each cluster in proportion to its
    size, at least min(size, 10), so small clusters stay visible."""
    n = len(clusters)
    if n <= n_points:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    picked = []
    for c in range(k):
        rows = np.flatnonzero(clusters == c)
        if len(rows) == 0:
            continue
        m = min(len(rows), max(10, round(n_points * len(rows) / n)))
        picked.append(rng.choice(rows, size=m, replace=False))
    return np.sort(np.concatenate(picked)) if picked else np.arange(0)


# ----------------------------------------------------------------------------- contingency
def contingency(clusters: np.ndarray, label_names: list[str], k: int) -> dict[str, Any]:
    """Counts (clusters x classes) with the clusters reordered so that each one's Hungarian
    match sits on the diagonal; purity = largest class share of a cluster."""
    from imgclust.metrics import hungarian_mapping

    names = sorted(set(label_names), key=lambda s: (0, int(s)) if s.lstrip("-").isdigit() else (1, s))
    code = {s: j for j, s in enumerate(names)}
    y = np.array([code[s] for s in label_names], dtype=np.int64)
    counts = np.zeros((k, len(names)), dtype=np.int64)
    np.add.at(counts, (clusters, y), 1)
    match = hungarian_mapping(y, clusters) if len(y) else {}
    matched = sorted((c for c in range(k) if c in match), key=lambda c: match[c])
    rest = sorted((c for c in range(k) if c not in match), key=lambda c: -counts[c].sum())
    order = matched + rest
    sizes = counts.sum(axis=1)
    purity = np.where(sizes > 0, counts.max(axis=1) / np.maximum(sizes, 1), np.nan)
    return {"classes": names, "counts": counts, "order": order, "match": match, "purity": purity,
            "majority": [names[j] for j in counts.argmax(axis=1)]}


# ----------------------------------------------------------------------------- charts
def choose_k_svg(ck: dict[str, Any], width: int = 760, height: int = 280) -> str:
    """The three criteria (each min-max scaled) and their mean over K, the pick marked."""
    curve = ck["curve"]
    ks = [r["k"] for r in curve]
    series = {}
    for name in ("silhouette", "stability", "eigengap", "score"):
        v = np.nan_to_num(np.array([r[name] for r in curve], dtype=float))
        lo, hi = v.min(), v.max()
        series[name] = (v - lo) / (hi - lo) if hi > lo else np.zeros_like(v)
    colors = {"silhouette": "#1f77b4", "stability": "#ff7f0e", "eigengap": "#2ca02c", "score": "#111"}
    ml, mr, mt, mb = 40, 130, 12, 34
    pw, ph = width - ml - mr, height - mt - mb
    def kx(k: float) -> float:
        return ml + pw * (k - ks[0]) / max(ks[-1] - ks[0], 1)

    def vy(v: float) -> float:
        return mt + ph * (1 - v)

    parts = [(f'<svg viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
              f'aria-label="choice of K">'), f'<rect x="{ml}" y="{mt}" width="{pw}" height="{ph}" fill="#fafafa" stroke="#ccc"/>']
    px = kx(ck["k"])
    parts.append(f'<line x1="{px:.1f}" y1="{mt}" x2="{px:.1f}" y2="{mt + ph}" stroke="#d62728" stroke-dasharray="4 3"/>')
    parts.append(f'<text x="{px + 4:.1f}" y="{mt + 12}" fill="#d62728" font-size="12">K = {ck["k"]}</text>')
    for k in ks:
        parts.append(f'<text x="{kx(k):.1f}" y="{height - 16}" font-size="11" text-anchor="middle">{k}</text>')
    parts.append(f'<text x="{ml + pw / 2:.1f}" y="{height - 2}" font-size="11" text-anchor="middle">K</text>')
    for t in (0, 0.5, 1):
        parts.append(f'<text x="{ml - 6}" y="{vy(t) + 4:.1f}" font-size="11" text-anchor="end">{t:g}</text>')
    for j, (name, v) in enumerate(series.items()):
        pts = " ".join(f"{kx(k):.1f},{vy(val):.1f}" for k, val in zip(ks, v))
        w = 3 if name == "score" else 1.6
        parts.append(f'<polyline points="{pts}" fill="none" stroke="{colors[name]}" stroke-width="{w}"/>')
        for k, val in zip(ks, v):
            parts.append(f'<circle cx="{kx(k):.1f}" cy="{vy(val):.1f}" r="2.5" fill="{colors[name]}"/>')
        label = "mean (score)" if name == "score" else name
        parts.append(f'<line x1="{width - mr + 12}" y1="{mt + 14 + 18 * j}" x2="{width - mr + 32}" '
                     f'y2="{mt + 14 + 18 * j}" stroke="{colors[name]}" stroke-width="{w}"/>'
                     f'<text x="{width - mr + 38}" y="{mt + 18 + 18 * j}" font-size="12">{label}</text>')
    parts.append("</svg>")
    return "".join(parts)


# ----------------------------------------------------------------------------- the report
def build_report(
    run_dir: str | Path,
    *,
    source: ImageSource | None = None,
    features: np.ndarray | None = None,
    rows: np.ndarray | None = None,
    out: str | Path | None = None,
    per_cluster: int = 24,
    boundary: int = 8,
    max_thumbs: int = 2400,
    map_points: int = 3000,
    map_method: str = "auto",
    thumb_size: int = 64,
    map_thumb_size: int = 40,
    seed: int = 0,
    run_t0: float | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Write ``report.html`` for the run in ``run_dir`` (or to ``out``); returns a summary.

    ``source``/``features``/``rows`` (source index of each assignments.csv row) are what
    ``cluster`` already holds in memory; when absent the source is re-opened from run.json
    and the features read from the run's feature-cache entry. Missing pieces (a moved
    source, a deleted cache) leave their section out with a note, never fail the report.
    ``run_t0`` (``time.perf_counter()`` at the start of the run writing this report) makes the
    shown total include the report's own time.
    """
    from imgclust.progress import log_progress, progress_bar
    from imgclust.report.hierarchy_view import hierarchy_section

    t0 = time.perf_counter()
    bar = progress_bar(4, "report", unit="step", enable=progress)  # sources/features, thumbnails, map, page (also in log.jsonl)
    data = load_run(run_dir)
    notes: list[str] = []
    k = data.k
    if source is None:
        try:
            source = open_run_source(data.run)
        except (InputError, OSError) as e:
            notes.append(f"No thumbnails: the source could not be opened ({e}).")
    if rows is None and source is not None:
        index = {sid: j for j, sid in enumerate(source.ids())}
        got = [index.get(s, -1) for s in data.ids]
        rows = np.asarray(got, dtype=np.int64) if min(got, default=0) >= 0 else None
    if rows is None and not data.run.get("n_skipped"):
        rows = np.arange(len(data.ids))
    if features is None and rows is not None:
        features = load_run_features(data.run, int(data.run.get("n_images", len(data.ids))))
        if features is None:
            notes.append("No map: the run's feature-cache entry is gone or does not match run.json.")

    bar.update(1)
    gallery = select_gallery(data.clusters, data.confidence, k, per_cluster, boundary, max_thumbs)
    thumbs: dict[int, str] = {}
    if source is not None and rows is not None:
        want = [int(rows[r]) for top, low in gallery.values() for r in top + low]
        thumbs = make_thumbnails(source, want, size=thumb_size)
    bar.update(1)

    map_html, map_used = "", None
    if features is not None and rows is not None and len(data.ids) >= 3:
        sel = select_map_rows(data.clusters, k, map_points, seed)
        what = f"map of {len(sel):,} points ({resolve_method(map_method, len(sel))})"
        bar.set_postfix_str(what)
        log_progress("report", step=what)
        xy, map_used = embed_2d(np.asarray(features[rows[sel]], dtype=np.float32), map_method, seed, progress=progress)
        mthumbs = make_thumbnails(source, [int(rows[r]) for r in sel], size=map_thumb_size) if source is not None else {}
        map_html = _map_section(data, sel, xy, mthumbs, rows, map_used, k)
    bar.update(1)
    if run_t0 is not None:  # the total shown covers the report too (the page is written right after)
        timings = dict(data.run.get("timings_s") or {})
        timings["report"] = round(time.perf_counter() - t0, 3)
        timings["total"] = round(time.perf_counter() - run_t0, 3)
        data.run["timings_s"] = timings

    ct = contingency(data.clusters, data.label_names, k) if data.label_names is not None and len(data.ids) else None
    from imgclust.report import quality  # issue 21: duplicates/outliers and applied edits

    qrows = quality.quality_rows(data.run_dir)
    qwant = quality.wanted_rows(qrows, data.ids, rows) if source is not None else []
    qthumbs = make_thumbnails(source, qwant, size=thumb_size) if qwant else {}
    body = [
        _summary_section(data, ct, notes),
        _choose_k_section(data.choose_k) if data.choose_k else "",
        hierarchy_section(data.run_dir, data.run),  # issue 23: merge tree, marked K, trust score
        selection_section(data.run),  # issue 18: the label-free choice of method
        map_html,
        _contingency_section(ct, k) if ct is not None else "",
        _gallery_section(data, gallery, thumbs, rows, ct, k),
        quality.quality_section(qrows, data.ids, rows, qthumbs),
        quality.changes_section(data.run_dir, data.run),
        _config_section(data),
    ]
    title = f"imgclust report: {Path(str((data.run.get('config') or {}).get('source', {}).get('path', ''))).name} · K={k}"
    nav = "".join(f'<a href="#{sid}">{name}</a>' for sid, name in _NAV if any(f'<section id="{sid}"' in b for b in body))
    doc = _PAGE.format(title=_e(title), css=_CSS, body="\n".join(b for b in body if b), js=_JS, nav=nav,
                       colors=_script_json(cluster_colors(k)))
    path = Path(out) if out is not None else data.run_dir / REPORT_NAME
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(doc)
    bar.update(1)
    bar.close()
    return {"path": str(path), "bytes": path.stat().st_size, "seconds": round(time.perf_counter() - t0, 3),
            "map_method": map_used, "n_thumbnails": len(thumbs), "notes": notes}


def _fmt_s(s: float | None) -> str:
    return "-" if s is None else (f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min")


def _summary_section(data: RunData, ct: dict | None, notes: list[str]) -> str:
    run = data.run
    cfg = run.get("config") or {}
    sizes = np.bincount(data.clusters, minlength=data.k)
    items = [
        ("source", (cfg.get("source") or {}).get("path", "?") + (f" ({cfg['source'].get('split')})" if (cfg.get("source") or {}).get("split") else "")),
        ("images clustered", f"{run.get('n_clustered', len(data.ids)):,} of {run.get('n_images', len(data.ids)):,}"
         + (f" ({run.get('n_skipped')} unreadable, see skipped.csv)" if run.get("n_skipped") else "")),
        ("K", str(data.k) + (" (chosen automatically, see below)" if data.choose_k else "")),
        ("backbone", (run.get("backbone") or {}).get("name", "?")),
        ("method", cfg.get("method", "?")),
        ("total time", _fmt_s((run.get("timings_s") or {}).get("total"))),
        ("created", run.get("created", "")),
    ]
    m = data.metrics or run.get("metrics")
    if m:
        items.append(("metrics", (f"ACC {m['acc']:.4f} · NMI {m['nmi']:.4f} · ARI {m['ari']:.4f} · majority-vote ACC "
                                  f"{m.get('majority_acc', float('nan')):.4f} (on {m.get('n_evaluated', '?')} labelled images)")))
    dl = "".join(f"<dt>{_e(a)}</dt><dd>{_e(b)}</dd>" for a, b in items)
    chips = []
    for c in range(data.k):
        conf = data.confidence[data.clusters == c]
        mc = f"{conf.mean():.2f}" if len(conf) else "-"
        pur = "" if ct is None or np.isnan(ct["purity"][c]) else f" · purity {ct['purity'][c]:.2f}"
        chips.append(f'<a class="chip" href="#cluster-{c}" data-c="{c}"><span class="sw" style="background:var(--c{c})"></span>'
                     f'{c}<small> {sizes[c]:,} · conf {mc}{pur}</small></a>')
    note = "".join(f'<p class="note">{_e(n)}</p>' for n in notes)
    note += "".join(f'<p class="note warning">Warning: {_e(fb.get("message"))}; this run kept the '
                    f'{_e(fb.get("kept"))} result instead.</p>' for fb in run.get("fallbacks") or [])
    return (f'<section id="summary"><h2>Summary</h2><dl class="kv">{dl}</dl>{note}'
            f'<h3>Clusters (size · mean confidence{" · purity" if ct else ""})</h3><div class="chips">{"".join(chips)}</div></section>')


def _choose_k_section(ck: dict[str, Any]) -> str:
    has_ext = "majority_acc" in ck["curve"][0]
    head = "<tr><th>K</th><th>silhouette</th><th>stability (ANMI)</th><th>eigengap</th><th>score</th>" + (
        "<th>ACC</th><th>NMI</th><th>majority-vote ACC</th>" if has_ext else "") + "</tr>"
    trs = []
    for r in ck["curve"]:
        cls = ' class="pick"' if r["k"] == ck["k"] else ""
        tds = f"<td>{r['k']}</td><td>{r['silhouette']:.4f}</td><td>{r['stability']:.4f}</td><td>{r['eigengap']:.4f}</td><td>{r['score']:.3f}</td>"
        if has_ext:
            tds += f"<td>{r['acc']:.4f}</td><td>{r['nmi']:.4f}</td><td>{r['majority_acc']:.4f}</td>"
        trs.append(f"<tr{cls}>{tds}</tr>")
    pc = ck.get("per_criterion", {})
    st = ck.get("settings", {})
    return (f'<section id="choose-k"><h2>Choice of K: {ck["k"]}</h2>'
            f'<p>Rule: {_e(ck.get("rule", ""))}. Each criterion alone: silhouette {pc.get("silhouette")}, '
            f'stability {pc.get("stability")}, eigengap {pc.get("eigengap")}. Scored on {st.get("n_scored", "?"):,} images '
            f'(PCA {st.get("pca_dim", "?")}-d, L2-normalised; {st.get("n_runs", "?")} k-means runs per K).'
            + (" ACC/NMI/majority-vote ACC use the labels, only to check the pick." if has_ext else "")
            + f'</p>{choose_k_svg(ck)}<details><summary>values</summary><table class="num">{head}{"".join(trs)}</table></details></section>')


def _map_section(data: RunData, sel: np.ndarray, xy: np.ndarray, mthumbs: dict[int, str], rows: np.ndarray,
                 used: str | None, k: int) -> str:
    uris: list[str] = []
    pos: dict[int, int] = {}
    pts = []
    for j, r in enumerate(sel):
        src_i = int(rows[r])
        t = -1
        if src_i in mthumbs:
            t = pos.setdefault(src_i, len(uris))
            if t == len(uris):
                uris.append(mthumbs[src_i])
        lab = data.label_names[r] if data.label_names is not None else ""
        pts.append([round(float(xy[j, 0]), 4), round(float(xy[j, 1]), 4), int(data.clusters[r]), t,
                    data.ids[r], round(float(data.confidence[r]), 3), lab])
    legend = "".join(f'<span class="lg" data-c="{c}"><span class="sw" style="background:var(--c{c})"></span>{c}</span>'
                     for c in range(k))
    return (f'<section id="map"><h2>Map of the features ({_e(used)}, {len(sel):,} of {len(data.ids):,} images)</h2>'
            '<p>Hover a point to see its image; click a cluster in the legend to highlight it (click again to clear).</p>'
            f'<div class="legend">{legend}</div><div id="mapwrap"><svg id="mapsvg" viewBox="0 0 1000 700" '
            'preserveAspectRatio="xMidYMid meet"></svg><div id="tip"></div></div>'
            f'<script>const MAP_POINTS={_script_json(pts)};const MAP_THUMBS={_script_json(uris)};</script></section>')


def _contingency_section(ct: dict[str, Any], k: int) -> str:
    classes, counts, order = ct["classes"], ct["counts"], ct["order"]
    head = "<tr><th>cluster</th>" + "".join(f"<th>{_e(c)}</th>" for c in classes) + "<th>size</th><th>purity</th><th>majority class</th></tr>"
    trs = []
    for c in order:
        size = int(counts[c].sum())
        cells = []
        for j, _ in enumerate(classes):
            v = int(counts[c, j])
            a = 0 if size == 0 else v / size
            diag = " diag" if ct["match"].get(c) == j else ""
            ink = ";color:#fff" if a > 0.55 else ""
            cells.append(f'<td class="cell{diag}" style="background:rgba(31,119,180,{a:.2f}){ink}">{v if v else ""}</td>')
        pur = "-" if np.isnan(ct["purity"][c]) else f"{ct['purity'][c]:.3f}"
        trs.append(f'<tr><th><a href="#cluster-{c}">{c}</a></th>{"".join(cells)}<td>{size:,}</td><td>{pur}</td>'
                   f'<td>{_e(ct["majority"][c]) if size else "-"}</td></tr>')
    return ('<section id="contingency"><h2>Clusters vs known labels</h2><p>Rows: clusters, ordered so that each one\'s '
            'Hungarian (one-to-one) match is on the outlined diagonal; shading = share of the cluster. Purity = the largest '
            f'class share of a cluster.</p><div class="scroll"><table class="ct">{head}{"".join(trs)}</table></div></section>')


def _gallery_section(data: RunData, gallery: dict, thumbs: dict[int, str], rows: np.ndarray | None,
                     ct: dict | None, k: int) -> str:
    out = ['<section id="gallery"><h2>Clusters</h2>']
    sizes = np.bincount(data.clusters, minlength=k)

    def img(r: int) -> str:
        lab = f" · label {data.label_names[r]}" if data.label_names is not None else ""
        tip = f"{data.ids[r]} · confidence {data.confidence[r]:.3f}{lab}"
        uri = thumbs.get(int(rows[r])) if rows is not None else None
        if uri is None:
            return f'<span class="ph" title="{_e(tip)}"></span>'
        return f'<img src="{uri}" title="{_e(tip)}" alt="{_e(data.ids[r])}" loading="lazy">'

    for c in range(k):
        top, low = gallery[c]
        conf = data.confidence[data.clusters == c]
        info = f"{sizes[c]:,} images" + (f" · mean confidence {conf.mean():.3f}" if len(conf) else "")
        if ct is not None and sizes[c]:
            info += f" · purity {ct['purity'][c]:.3f} (majority: {_e(ct['majority'][c])})"
        out.append(f'<div class="cluster" id="cluster-{c}"><h3><span class="sw" style="background:var(--c{c})"></span>'
                   f'Cluster {c} <small>{info}</small></h3>')
        if not sizes[c]:
            out.append('<p class="note">Empty: no image was assigned to this cluster.</p></div>')
            continue
        out.append(f'<div class="row"><span class="tag">most confident</span>{"".join(img(r) for r in top)}</div>')
        if low:
            out.append(f'<div class="row low"><span class="tag">least confident</span>{"".join(img(r) for r in low)}</div>')
        out.append("</div>")
    out.append("</section>")
    return "".join(out)


def _config_section(data: RunData) -> str:
    from imgclust.config import RunConfig, dump_toml

    run = data.run
    try:
        cfg_text = dump_toml(RunConfig.from_dict(run.get("config") or {}))
    except Exception:  # noqa: BLE001 - an older or hand-edited run.json: show it as JSON
        cfg_text = json.dumps(run.get("config"), indent=2)
    timings = run.get("timings_s") or {}
    trs = "".join(f"<tr><td>{_e(a)}</td><td>{_fmt_s(b) if isinstance(b, (int, float)) else _e(b)}</td></tr>"
                  for a, b in timings.items())
    feat = run.get("features") or {}
    ips = feat.get("images_per_second")
    extra = []
    if feat.get("from_cache"):
        extra.append("features read from the cache" + (f" (extracted at {ips:.0f} images/s)" if ips else ""))
    elif ips:
        extra.append(f"feature extraction {ips:.0f} images/s")
    if run.get("peak_rss_mb"):
        extra.append(f"peak memory {run['peak_rss_mb']:,.0f} MB")
    log = ""
    logp = data.run_dir / "log.jsonl"
    if logp.is_file():
        from imgclust.runlog import read_log

        ev = [e for e in read_log(logp) if e.get("event") in ("stage_end", "stage_error")]
        if ev:
            log = "<h3>Stages (log.jsonl)</h3><table class='num'>" + "".join(
                f"<tr><td>{_e(e.get('stage'))}</td><td>{_fmt_s(e.get('seconds'))}</td><td>{_e(e.get('error', ''))}</td></tr>"
                for e in ev) + "</table>"
    return (f'<section id="config"><h2>Config and timings</h2><div class="two"><div><h3>Config (re-run with '
            f'<code>imgclust cluster --config config.toml</code>)</h3><pre>{_e(cfg_text)}</pre></div><div><h3>Timings</h3>'
            f'<table class="num">{trs}</table><p>{_e(" · ".join(extra))}</p>{log}</div></div></section>')


_CSS = """
:root{--fg:#222;--mut:#666;--bd:#ddd}
*{box-sizing:border-box}
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;color:var(--fg);margin:0;padding:0 24px 40px;background:#fff}
header{position:sticky;top:0;background:#fff;border-bottom:1px solid var(--bd);padding:10px 0;z-index:5}
header h1{font-size:18px;margin:0}
header nav a{margin-right:14px;color:#1f5f99;text-decoration:none}
h2{font-size:17px;margin:26px 0 8px;border-bottom:1px solid var(--bd);padding-bottom:4px}
h3{font-size:14px;margin:14px 0 6px}
small{color:var(--mut);font-weight:normal}
.kv{display:grid;grid-template-columns:max-content 1fr;gap:2px 16px;margin:0}
.kv dt{color:var(--mut)} .kv dd{margin:0}
.note{color:#8a5300;background:#fff6e5;padding:4px 8px;border-radius:4px}
.chips{display:flex;flex-wrap:wrap;gap:6px}
.chip{border:1px solid var(--bd);border-radius:12px;padding:1px 9px;color:var(--fg);text-decoration:none;white-space:nowrap}
.sw{display:inline-block;width:10px;height:10px;border-radius:50%;margin-right:5px;vertical-align:baseline}
.legend{display:flex;flex-wrap:wrap;gap:4px 10px;margin:4px 0}
.lg{cursor:pointer;user-select:none} .lg.off{opacity:.35}
#mapwrap{position:relative;max-width:1000px;border:1px solid var(--bd);background:#fcfcfc}
#mapsvg{width:100%;height:auto;display:block}
#mapsvg circle{stroke:#fff;stroke-width:.4}
#mapsvg.hl circle{opacity:.08} #mapsvg.hl circle.on{opacity:1}
#tip{position:absolute;display:none;pointer-events:none;background:#fff;border:1px solid #999;padding:4px;font-size:12px;box-shadow:0 2px 6px rgba(0,0,0,.2);max-width:220px}
#tip img{display:block;width:96px;height:96px;object-fit:contain;image-rendering:pixelated;background:#eee}
table{border-collapse:collapse} td,th{padding:2px 7px;border:1px solid #eee}
table.num td{text-align:right} tr.pick td{font-weight:bold;background:#fdeaea}
.ct td.cell{text-align:right;min-width:38px} .ct td.diag{outline:2px solid #d62728;outline-offset:-2px}
.scroll{overflow-x:auto}
.cluster{margin:10px 0 18px}
.row{display:flex;flex-wrap:wrap;gap:3px;align-items:center;margin:3px 0}
.row img,.row .ph{width:64px;height:64px;object-fit:contain;image-rendering:pixelated;background:#eee;border-radius:2px}
.row.low img{outline:2px solid #f0a030;outline-offset:-2px}
.tag{width:110px;color:var(--mut);font-size:12px}
.two{display:grid;grid-template-columns:1fr 1fr;gap:20px} pre{background:#f6f6f6;padding:8px;overflow:auto;font-size:12px}
"""

_JS = """
(function(){
const root=document.documentElement;COLORS.forEach((c,i)=>root.style.setProperty('--c'+i,c));
const svg=document.getElementById('mapsvg');
if(!svg||typeof MAP_POINTS==='undefined')return;
const W=1000,H=700,P=12,R=MAP_POINTS.length>2000?3:4;
// innerHTML on the <svg> element parses the circles as SVG: no namespace URI needed in the page
svg.innerHTML=MAP_POINTS.map((p,i)=>'<circle cx="'+(P+p[0]*(W-2*P)).toFixed(1)+'" cy="'+(P+(1-p[1])*(H-2*P)).toFixed(1)+
 '" r="'+R+'" fill="'+COLORS[p[2]]+'" data-i="'+i+'" data-c="'+p[2]+'"></circle>').join('');
const tip=document.getElementById('tip'),wrap=document.getElementById('mapwrap');
svg.addEventListener('mousemove',ev=>{const t=ev.target;if(t.tagName!=='circle'){tip.style.display='none';return;}
 const p=MAP_POINTS[+t.dataset.i];const r=wrap.getBoundingClientRect();
 tip.innerHTML=(p[3]>=0?'<img src="'+MAP_THUMBS[p[3]]+'">':'')+'<div></div>';
 tip.lastChild.textContent='cluster '+p[2]+' · conf '+p[5]+(p[6]!==''?' · label '+p[6]:'')+' · '+p[4];
 tip.style.display='block';let x=ev.clientX-r.left+14,y=ev.clientY-r.top+14;
 if(x+230>r.width)x-=250; tip.style.left=x+'px';tip.style.top=y+'px';});
svg.addEventListener('mouseleave',()=>{tip.style.display='none';});
let cur=null;document.querySelectorAll('.lg').forEach(el=>el.addEventListener('click',()=>{
 const c=el.dataset.c;cur=(cur===c)?null:c;svg.classList.toggle('hl',cur!==null);
 document.querySelectorAll('.lg').forEach(g=>g.classList.toggle('off',cur!==null&&g.dataset.c!==cur));
 svg.querySelectorAll('circle').forEach(e=>e.classList.toggle('on',e.dataset.c===cur));}));
})();
"""

_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="imgclust">
<title>{title}</title><style>{css}</style></head>
<body><header><h1>{title}</h1><nav>{nav}</nav></header>
<script>const COLORS={colors};</script>
{body}
<script>{js}</script>
</body></html>
"""
