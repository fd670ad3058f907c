"""``imgclust review RUN``: a local web app to look at a run's clusters and correct them.

Starlette + uvicorn; pages are rendered on the server as plain HTML with a little inline JS
(no CDN, no external resources). Pages: cluster overview, one cluster (sorted by confidence,
lazy-loaded thumbnails, paging), its boundary (least confident first), the 2-D map with
rectangle selection, similar images (faiss), near-duplicate groups, outliers, the edit log
with undo, and an Apply button (:func:`imgclust.review.apply.apply_edits`).

Security: binds 127.0.0.1 by default; any other host needs a random token that the printed
URL carries (then kept in an HttpOnly, SameSite=Strict cookie); a non-loopback bind without
a token refuses to start. Images are served by id through a dictionary of the run's ids, so
no client string reaches the filesystem; anything else is 404. Edits are POSTed as JSON only
(``Content-Type: application/json`` cannot be sent cross-site without a CORS preflight,
which this app never grants) and the Host header must be the served one (DNS rebinding).
"""

from __future__ import annotations

import html
import ipaddress
import json
import secrets
import socket
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from imgclust.errors import InputError
from imgclust.review.state import ReviewState

PER_PAGE = 200
COOKIE = "imgclust_review_token"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _q(image_id: str) -> str:
    return quote(image_id, safe="")


def _script_json(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":")).replace("<", "\\u003c").replace(">", "\\u003e")


_CSS = """
body{font:14px system-ui,sans-serif;margin:0;color:#222}header{background:#263238;color:#fff;padding:8px 16px;display:flex;gap:16px;align-items:center}
header a{color:#cfd8dc;text-decoration:none}header a:hover{color:#fff}main{padding:12px 16px}
table{border-collapse:collapse}td,th{padding:3px 8px;border-bottom:1px solid #ddd;text-align:left}th{background:#f5f5f5}
.grid{display:flex;flex-wrap:wrap;gap:4px}.cell{position:relative;width:100px;text-align:center;font-size:11px;border:2px solid transparent;cursor:pointer}
.cell img{width:96px;height:96px;object-fit:contain;image-rendering:pixelated;background:#eee;display:block}
.cell.selected{border-color:#e53935;background:#ffebee}.bar{position:sticky;top:0;background:#fafafa;padding:6px;border-bottom:1px solid #ccc;z-index:2;display:flex;gap:8px;align-items:center;flex-wrap:wrap}
.msg{color:#c62828}.ok{color:#2e7d32}.undone{color:#999;text-decoration:line-through}.pager a{margin:0 4px}
svg{border:1px solid #ccc;background:#fff;user-select:none}.sim{color:#555}
"""

_JS = """
const SEL=new Set();
function toggle(el){const id=el.dataset.id;if(SEL.has(id)){SEL.delete(id);el.classList.remove('selected')}else{SEL.add(id);el.classList.add('selected')}
 const c=document.getElementById('nsel');if(c)c.textContent=SEL.size;}
async function post(url,body){const r=await fetch(url,{method:'POST',headers:{'Content-Type':'application/json'},body:JSON.stringify(body)});
 let j={};try{j=await r.json()}catch(e){}const m=document.getElementById('msg');
 if(!r.ok){if(m){m.className='msg';m.textContent=j.error||('error '+r.status)}return null}return j}
async function edit(body){const j=await post('/api/edit',body);if(j)location.reload();return j}
function moveSel(){const to=parseInt(document.getElementById('move-to').value);if(!SEL.size)return;edit({op:'move',ids:[...SEL],to:to})}
function outlierSel(){if(!SEL.size)return;edit({op:'outlier',ids:[...SEL]})}
function mergeSel(){const cl=[...document.querySelectorAll('input.pick-cluster:checked')].map(x=>parseInt(x.value));edit({op:'merge',clusters:cl,into:Math.min(...cl)})}
function rename(c){const v=document.getElementById('name-'+c).value;edit({op:'rename',cluster:c,name:v})}
function split(c){const k=parseInt(document.getElementById('k-'+c).value);edit({op:'split',cluster:c,k:k})}
function undo(s){edit({op:'undo',target:s})}
async function applyEdits(){const o=document.getElementById('apply-out').value;const m=document.getElementById('apply-result');m.textContent='applying...';
 const j=await post('/api/apply',{out:o});if(j){m.className='ok';m.textContent='written: '+j.out+' ('+j.n_changed+' images changed)'}else{m.textContent=''}}
"""


def _page(title: str, body: str, state: ReviewState, extra_js: str = "") -> HTMLResponse:
    name = _e(state.run_dir.name)
    nav = ('<a href="/">overview</a><a href="/map">map</a><a href="/duplicates">duplicates</a>'
           '<a href="/outliers">outliers</a><a href="/edits">edits</a>')
    doc = (f'<!doctype html><html><head><meta charset="utf-8"><title>{_e(title)} · imgclust review</title>'
           f'<style>{_CSS}</style></head><body><header><b>imgclust review · {name}</b>{nav}</header>'
           f'<main><h2>{_e(title)}</h2><div id="msg"></div>{body}</main><script>{_JS}{extra_js}</script></body></html>')
    return HTMLResponse(doc)


def _cell(state: ReviewState, row: int, caption: str) -> str:
    i = state.data.ids[row]
    return (f'<div class="cell" data-id="{_e(i)}" onclick="toggle(this)"><img loading="lazy" width="96" height="96" '
            f'src="/thumb/{_q(i)}" alt="{_e(i)}"><a href="/similar/{_q(i)}" onclick="event.stopPropagation()" '
            f'title="similar images">{_e(caption)}</a></div>')


def _cluster_options(k: int, names: dict[int, str]) -> str:
    return "".join(f'<option value="{c}">{c}{" · " + _e(names[c]) if c in names else ""}</option>' for c in range(k))


def _action_bar(state: ReviewState, rep: Any) -> str:
    return ('<div class="bar"><span><span id="nsel">0</span> selected</span>'
            f'<label>move to <select id="move-to">{_cluster_options(rep.n_clusters, rep.names)}</select></label>'
            '<button id="move-btn" onclick="moveSel()">move</button>'
            '<button id="outlier-btn" onclick="outlierSel()">mark as outliers</button></div>')


def build_app(run_dir: str | Path, token: str | None = None, allowed_hosts: list[str] | None = None,
              map_method: str = "pca", warm: bool = False) -> Starlette:
    """The review app of one run. ``token``: required on every request (query ``token=`` once, then a cookie)."""
    state = ReviewState(run_dir, map_method=map_method)
    if warm:
        import threading

        threading.Thread(target=state.warm, daemon=True, name="review-warm").start()

    def row_of(image_id: str) -> int:
        row = state.index.get(image_id)
        if row is None:
            raise KeyError(image_id)
        return row

    async def overview(request: Request) -> Response:
        rep = state.current()
        lab, conf = rep.labels, state.data.confidence
        k = rep.n_clusters
        sizes = np.bincount(lab, minlength=k)
        sum_conf = np.bincount(lab, weights=conf, minlength=k)
        purity: dict[int, tuple[str, float]] = {}
        if state.truth is not None:
            y = state.truth
            ok = y >= 0
            ct = np.zeros((k, int(y.max()) + 1), np.int64)
            np.add.at(ct, (lab[ok], y[ok]), 1)
            for c in range(k):
                if ct[c].sum():
                    top = int(ct[c].argmax())
                    nm = state.class_names[top] if state.class_names and top < len(state.class_names) else top
                    purity[c] = (str(nm), ct[c, top] / ct[c].sum())
        trs = []
        for c in range(k):
            mc = f"{sum_conf[c] / sizes[c]:.3f}" if sizes[c] else "-"
            pu = f"{purity[c][1]:.3f} ({_e(purity[c][0])})" if c in purity else "-"
            trs.append(f'<tr data-cluster="{c}"><td><input type="checkbox" class="pick-cluster" value="{c}"></td>'
                       f'<td><a href="/cluster/{c}">cluster {c}</a></td><td>{_e(rep.names.get(c, ""))}</td>'
                       f'<td>{int(sizes[c])}</td><td>{mc}</td>' + (f"<td>{pu}</td>" if state.truth is not None else "")
                       + f'<td><a href="/cluster/{c}?order=boundary">boundary</a></td>'
                       f'<td><input id="name-{c}" size="10" placeholder="name"><button onclick="rename({c})">rename</button></td>'
                       f'<td><input id="k-{c}" type="number" min="2" max="20" value="2" style="width:3em">'
                       f'<button onclick="split({c})">split</button></td></tr>')
        head = ("<tr><th></th><th>cluster</th><th>name</th><th>size</th><th>mean confidence</th>"
                + ("<th>purity (majority label)</th>" if state.truth is not None else "") + "<th></th><th></th><th></th></tr>")
        n_active = len(rep.active)
        default_out = str(state.run_dir.with_name(state.run_dir.name + "-reviewed"))
        body = (f'<p>{len(lab):,} images · {k} clusters · {n_active} edit(s) in effect '
                f'(<a href="/edits">log</a>)</p><p><button id="merge-btn" onclick="mergeSel()">merge checked clusters</button></p>'
                f'<table id="clusters">{head}{"".join(trs)}</table>'
                f'<h3>Apply</h3><p>Write a new run with these labels and a model retrained on them:</p>'
                f'<input id="apply-out" size="60" value="{_e(default_out)}"> <button id="apply-btn" onclick="applyEdits()">apply edits</button> '
                f'<span id="apply-result"></span>')
        return _page("Clusters", body, state)

    async def cluster_page(request: Request) -> Response:
        try:
            c = int(request.path_params["c"])
            page = int(request.query_params.get("page", "0"))
            per = int(request.query_params.get("per", str(PER_PAGE)))
        except ValueError:
            return PlainTextResponse("bad request", 400)
        order = request.query_params.get("order", "confidence")
        rep = state.current()
        if not 0 <= c < rep.n_clusters or page < 0 or not 1 <= per <= 1000 or order not in ("confidence", "boundary"):
            return PlainTextResponse("not found", 404)
        rows = np.flatnonzero(rep.labels == c)
        conf = state.data.confidence[rows]
        rows = rows[np.lexsort((rows, conf if order == "boundary" else -conf))]
        n_pages = max(1, -(-len(rows) // per))
        show = rows[page * per:(page + 1) * per]
        cells = "".join(_cell(state, int(r), f"{state.data.confidence[r]:.2f}" + (" ⚑" if rep.outlier[r] else ""))
                        for r in show)
        other = "confidence" if order == "boundary" else "boundary"
        pager = " ".join(f'<a href="/cluster/{c}?order={order}&page={p}">{p + 1}</a>' if p != page else f"<b>{p + 1}</b>"
                         for p in range(n_pages))
        title = f"Cluster {c}" + (f" · {rep.names[c]}" if c in rep.names else "") + (" · boundary" if order == "boundary" else "")
        body = (f'<p>{len(rows):,} images, sorted by confidence {"ascending (boundary images first)" if order == "boundary" else "descending"}'
                f' · <a href="/cluster/{c}?order={other}">{other}</a> · click images to select; the number links to similar images</p>'
                f'{_action_bar(state, rep)}<div class="grid" id="grid">{cells}</div><p class="pager">page {pager}</p>')
        return _page(title, body, state)

    async def similar_page(request: Request) -> Response:
        try:
            row = row_of(request.path_params["image_id"])
        except KeyError:
            return PlainTextResponse("not found", 404)
        rep = state.current()
        try:
            sims = state.similar(row)
        except InputError as e:
            return _page("Similar images", f'<p class="msg">{_e(e)}</p>', state)
        cells = _cell(state, row, f"this · c{rep.labels[row]}") + "".join(
            _cell(state, j, f"{s:.3f} · c{rep.labels[j]}") for j, s in sims)
        body = f'<p>Nearest images by cosine similarity of the features.</p>{_action_bar(state, rep)}<div class="grid">{cells}</div>'
        return _page(f"Similar to {state.data.ids[row]}", body, state)

    async def map_page(request: Request) -> Response:
        rep = state.current()
        try:
            sel, xy, used = state.map_xy()
        except InputError as e:
            return _page("Map", f'<p class="msg">{_e(e)}</p>', state)
        from imgclust.report.html import cluster_colors

        pts = [[state.data.ids[r], round(float(x), 4), round(float(y), 4), int(rep.labels[r])] for r, (x, y) in zip(sel, xy)]
        js = ("const PTS=" + _script_json(pts) + ";const COL=" + _script_json(cluster_colors(rep.n_clusters)) + ";"
              "const S=700,svg=document.getElementById('map');let g='';PTS.forEach((p,i)=>{g+=`<circle cx=${10+p[1]*(S-20)} "
              "cy=${10+(1-p[2])*(S-20)} r=3 fill=\"${COL[p[3]]}\" data-i=${i}><title>${p[0]} · cluster ${p[3]}</title></circle>`});"
              "svg.innerHTML=g+'<rect id=\"band\" fill=\"rgba(33,150,243,.15)\" stroke=\"#2196f3\" width=0 height=0></rect>';"
              "let st=null;const band=document.getElementById('band');"
              "function pt(e){const b=svg.getBoundingClientRect();return[e.clientX-b.left,e.clientY-b.top]}"
              "svg.onmousedown=e=>{st=pt(e)};svg.onmousemove=e=>{if(!st)return;const q=pt(e);band.setAttribute('x',Math.min(st[0],q[0]));"
              "band.setAttribute('y',Math.min(st[1],q[1]));band.setAttribute('width',Math.abs(q[0]-st[0]));band.setAttribute('height',Math.abs(q[1]-st[1]))};"
              "svg.onmouseup=e=>{if(!st)return;const q=pt(e);const x0=Math.min(st[0],q[0]),x1=Math.max(st[0],q[0]),y0=Math.min(st[1],q[1]),y1=Math.max(st[1],q[1]);st=null;"
              "SEL.clear();svg.querySelectorAll('circle').forEach(c=>{const x=+c.getAttribute('cx'),y=+c.getAttribute('cy');"
              "const inb=x>=x0&&x<=x1&&y>=y0&&y<=y1;c.setAttribute('stroke',inb?'#000':'none');if(inb)SEL.add(PTS[+c.dataset.i][0])});"
              "document.getElementById('nsel').textContent=SEL.size;"
              "document.getElementById('picked').innerHTML=[...SEL].slice(0,200).map(i=>`<div class=cell><img loading=lazy src=\"/thumb/${encodeURIComponent(i)}\"></div>`).join('')};")
        body = (f'<p>{len(sel):,} of {len(rep.labels):,} images ({_e(used)} of the features); drag a rectangle to select.</p>'
                f'{_action_bar(state, rep)}<svg id="map" width="700" height="700"></svg><div class="grid" id="picked"></div>')
        return _page("Map", body, state, js)

    async def duplicates_page(request: Request) -> Response:
        dups, _ = state.quality()
        groups: dict[str, list[dict[str, str]]] = {}
        for r in dups:
            groups.setdefault(r["group"], []).append(r)
        page = max(0, int(request.query_params.get("page", "0") or 0)) if request.query_params.get("page", "0").isdigit() else 0
        keys = list(groups)[page * 50:(page + 1) * 50]
        rep = state.current()
        out = []
        for g in keys:
            rows = [state.index[r["id"]] for r in groups[g] if r["id"] in state.index]
            out.append(f'<h4>group {_e(g)} · {len(rows)} images · min feature similarity {_e(groups[g][0]["group_min_similarity"])}</h4>'
                       f'<div class="grid">{"".join(_cell(state, j, f"c{rep.labels[j]}") for j in rows[:24])}</div>'
                       + (f"<p>... and {len(rows) - 24} more (duplicates.csv)</p>" if len(rows) > 24 else ""))
        more = f'<p><a href="/duplicates?page={page + 1}">next groups</a></p>' if len(groups) > (page + 1) * 50 else ""
        body = (f'<p>{len(groups)} near-duplicate groups ({len(dups)} images): every two images of a group have features or '
                f'16x16 grey thumbnails above the similarity thresholds (duplicates.csv).</p>{_action_bar(state, rep)}{"".join(out)}{more}')
        return _page("Near-duplicates", body, state)

    async def outliers_page(request: Request) -> Response:
        _, outs = state.quality()
        rep = state.current()
        rows = [(state.index[r["id"]], r["score"] + (" ⚠" if r.get("outlier", "1") == "1" else ""))
                for r in outs if r["id"] in state.index][:PER_PAGE]
        marked = np.flatnonzero(rep.outlier)
        n_out = sum(1 for r in outs if r.get("outlier", "1") == "1")
        body = (f'<p>{n_out} outliers beyond the fence (⚠), then the most isolated images: largest mean cosine distance '
                f'to their nearest neighbours, {len(outs)} listed (outliers.csv); '
                f'{len(marked)} marked by you.</p>{_action_bar(state, rep)}<div class="grid">'
                + "".join(_cell(state, j, f"{s} · c{rep.labels[j]}") for j, s in rows) + "</div>")
        return _page("Outliers", body, state)

    async def edits_page(request: Request) -> Response:
        log = state.log()
        undone = {e["target"] for e in log if e["op"] == "undo"}
        trs = []
        for e in log:
            what = {k: v for k, v in e.items() if k not in ("seq", "time", "op")}
            if "ids" in what:
                what["ids"] = f"{len(what['ids'])} image(s): " + ", ".join(what["ids"][:5]) + (" ..." if len(what["ids"]) > 5 else "")
            cls = ' class="undone"' if e["seq"] in undone else ""
            btn = "" if e["op"] == "undo" or e["seq"] in undone else f'<button class="undo" onclick="undo({e["seq"]})">undo</button>'
            trs.append(f'<tr data-seq="{e["seq"]}"{cls}><td>{e["seq"]}</td><td>{_e(e["time"])}</td><td>{_e(e["op"])}</td>'
                       f'<td>{_e(json.dumps(what, ensure_ascii=False))}</td><td>{btn}</td></tr>')
        body = (f'<p>{len(log)} edit(s) in {_e(state.run_dir / "edits.jsonl")}; the original assignments are never changed.</p>'
                f'<table id="edits"><tr><th>#</th><th>time (UTC)</th><th>op</th><th>what</th><th></th></tr>{"".join(trs)}</table>')
        return _page("Edits", body, state)

    async def thumb(request: Request) -> Response:
        try:
            row = row_of(request.path_params["image_id"])
        except KeyError:
            return PlainTextResponse("not found", 404)
        big = request.url.path.startswith("/image/")
        try:
            from starlette.concurrency import run_in_threadpool

            b = await run_in_threadpool(state.thumbnail, row, 512 if big else 96)
        except InputError:
            return PlainTextResponse("not found", 404)
        return Response(b, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

    async def api_edit(request: Request) -> Response:
        body = await _json_body(request)
        if isinstance(body, Response):
            return body
        try:
            from starlette.concurrency import run_in_threadpool

            e = await run_in_threadpool(state.add_edit, body)
        except InputError as err:
            return JSONResponse({"error": str(err)}, 400)
        return JSONResponse({"edit": e})

    async def api_edits(request: Request) -> Response:
        return JSONResponse({"edits": state.log()})

    async def api_apply(request: Request) -> Response:
        body = await _json_body(request)
        if isinstance(body, Response):
            return body
        out = body.get("out") if isinstance(body, dict) else None
        if not isinstance(out, str) or not out.strip() or set(body) - {"out"}:
            return JSONResponse({"error": "give {\"out\": \"a new directory\"}"}, 400)
        from starlette.concurrency import run_in_threadpool

        from imgclust.review.apply import apply_edits

        try:
            s = await run_in_threadpool(apply_edits, state.run_dir, Path(out).expanduser(), None, False)
        except InputError as err:
            return JSONResponse({"error": str(err)}, 400)
        return JSONResponse({"out": s["out_dir"], "n_changed": s["edits"]["n_changed"]})

    routes = [
        Route("/", overview), Route("/cluster/{c}", cluster_page), Route("/similar/{image_id:path}", similar_page),
        Route("/map", map_page), Route("/duplicates", duplicates_page), Route("/outliers", outliers_page),
        Route("/edits", edits_page), Route("/thumb/{image_id:path}", thumb), Route("/image/{image_id:path}", thumb),
        Route("/api/edit", api_edit, methods=["POST"]), Route("/api/edits", api_edits),
        Route("/api/apply", api_apply, methods=["POST"]),
    ]

    async def guard(request: Request, call_next: Any) -> Response:
        host = (request.headers.get("host") or "").rsplit(":", 1)[0].strip("[]")
        if allowed_hosts is not None and host not in allowed_hosts:
            return PlainTextResponse("forbidden host", 403)
        set_cookie = False
        if token is not None:
            got = request.cookies.get(COOKIE) or ""
            q = request.query_params.get("token") or ""
            if q and secrets.compare_digest(q, token):
                set_cookie = True
            elif not (got and secrets.compare_digest(got, token)):
                return PlainTextResponse("a token is required: open the URL that `imgclust review` printed", 403)
        if request.method == "POST" and request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            return PlainTextResponse("edits are JSON (Content-Type: application/json)", 415)
        resp = await call_next(request)
        resp.headers["X-Content-Type-Options"] = "nosniff"
        resp.headers["Content-Security-Policy"] = ("default-src 'self'; img-src 'self'; style-src 'unsafe-inline'; "
                                                   "script-src 'unsafe-inline'; connect-src 'self'; frame-ancestors 'none'")
        if set_cookie:
            resp.set_cookie(COOKIE, token or "", httponly=True, samesite="strict")
        return resp

    app = Starlette(routes=routes, middleware=[Middleware(BaseHTTPMiddleware, dispatch=guard)])
    app.state.review = state
    return app


async def _json_body(request: Request) -> Any:
    raw = await request.body()
    if len(raw) > 8 << 20:
        return JSONResponse({"error": "request too large"}, 413)
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return JSONResponse({"error": "the body is not JSON"}, 400)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def plan(host: str, port: int, token: str) -> tuple[str | None, str]:
    """(token or None, URL to open) for a bind; refuses a non-loopback bind without a token.

    ``token``: ``auto`` (none on loopback, a random one otherwise), ``none``, or a value.
    """
    if token == "auto":
        tok = None if is_loopback(host) else secrets.token_urlsafe(24)
    elif token == "none":
        tok = None
    else:
        if len(token) < 16:
            raise InputError("a review token must be at least 16 characters")
        tok = token
    if tok is None and not is_loopback(host):
        raise InputError(f"refusing to serve on {host} (not loopback) without a token; drop --token none")
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    url = f"http://{shown}:{port}/" + (f"?token={tok}" if tok else "")
    return tok, url


def serve(run_dir: str | Path, host: str = "127.0.0.1", port: int = 8765, token: str = "auto", open_browser: bool = False,
          map_method: str = "pca") -> None:
    """Run the review app until Ctrl-C."""
    import uvicorn

    tok, url = plan(host, port, token)
    allowed = None if not is_loopback(host) else ["127.0.0.1", "localhost", "::1"]
    print(f"review: loading {run_dir} ...", flush=True)
    app = build_app(run_dir, token=tok, allowed_hosts=allowed, map_method=map_method, warm=True)
    print(f"review: {url}  (Ctrl-C to stop)", flush=True)
    if open_browser:
        import threading
        import webbrowser

        threading.Timer(1.0, webbrowser.open, args=(url,)).start()
    uvicorn.run(app, host=host, port=port, log_level="warning")
