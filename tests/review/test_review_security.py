"""The review app's security rules and its HTTP API (Starlette TestClient, no browser)."""

import threading

import pytest

pytest.importorskip("starlette")
from starlette.testclient import TestClient  # noqa: E402

from imgclust.api import cluster  # noqa: E402
from imgclust.config import BackboneConfig, FeatureConfig, RunConfig, SourceConfig  # noqa: E402
from imgclust.errors import InputError  # noqa: E402
from imgclust.refine.edits import EDITS_NAME  # noqa: E402
from imgclust.review.server import build_app, plan, serve  # noqa: E402

BASE = "http://127.0.0.1"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sec")
    cfg = RunConfig(k=5, source=SourceConfig(path="digits", limit=300),
                    backbone=BackboneConfig(name="pixels", image_size=8),
                    features=FeatureConfig(cache_dir=str(tmp / "cache")), report=False)
    cluster(cfg, tmp / "run", progress=False)
    return tmp / "run"


@pytest.fixture(scope="module")
def client(run):
    return TestClient(build_app(run, allowed_hosts=["127.0.0.1", "localhost"]), base_url=BASE)


def first_id(run):
    import csv

    with open(run / "assignments.csv", newline="") as f:
        return next(csv.DictReader(f))["id"]


@pytest.mark.parametrize("path", [
    "/thumb/../../etc/passwd", "/thumb/..%2F..%2Fetc%2Fpasswd", "/thumb/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "/thumb//etc/passwd", "/thumb/%2Fetc%2Fpasswd", "/image/..%252F..%252Fetc%252Fpasswd",
    "/thumb/not-an-id", "/image/train%2F999999", "/similar/..%2F..%2Fetc%2Fpasswd", "/cluster/99", "/cluster/-1",
])
def test_paths_outside_the_run_are_404(client, path):
    r = client.get(path)
    assert r.status_code == 404
    assert b"root:" not in r.content


def test_images_by_id_and_pages(client, run):
    i = first_id(run)
    from urllib.parse import quote

    r = client.get(f"/thumb/{quote(i, safe='')}")
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg" and r.content[:2] == b"\xff\xd8"
    for p in ("/", "/cluster/0", "/cluster/0?order=boundary", "/map", "/duplicates", "/outliers", "/edits",
              f"/similar/{quote(i, safe='')}"):
        r = client.get(p)
        assert r.status_code == 200, p
        assert "https://" not in r.text and "http://" not in r.text  # nothing from outside (no CDN)
    assert "Content-Security-Policy" in r.headers


def test_host_header_is_checked(run):
    c = TestClient(build_app(run, allowed_hosts=["127.0.0.1"]), base_url="http://evil.example")
    assert c.get("/").status_code == 403


def test_non_loopback_needs_a_token():
    with pytest.raises(InputError, match="without a token"):
        plan("0.0.0.0", 8000, "none")
    with pytest.raises(InputError, match="without a token"):
        serve("unused", host="192.168.1.5", port=8000, token="none")  # refuses before reading the run
    tok, url = plan("0.0.0.0", 8000, "auto")
    assert tok and len(tok) >= 16 and url.endswith(f"?token={tok}")
    assert plan("127.0.0.1", 8000, "auto") == (None, "http://127.0.0.1:8000/")
    with pytest.raises(InputError):
        plan("0.0.0.0", 8000, "short")


def test_token_required_then_cookie(run):
    tok = "t" * 32
    c = TestClient(build_app(run, token=tok), base_url=BASE)
    assert c.get("/").status_code == 403
    assert c.get("/?token=wrong").status_code == 403
    assert c.get(f"/?token={tok}").status_code == 200
    assert c.get("/cluster/0").status_code == 200  # the cookie carries it from here on
    c2 = TestClient(build_app(run, token=tok), base_url=BASE)
    assert c2.post("/api/edit", json={"op": "rename", "cluster": 0, "name": "x"}).status_code == 403


def test_malformed_or_unknown_edits_are_4xx_and_log_unchanged(client, run):
    log = run / EDITS_NAME
    before = log.read_bytes() if log.exists() else b""
    i = first_id(run)
    bad = [
        ("json", {"op": "nope"}), ("json", {"op": "move", "ids": ["../../etc/passwd"], "to": 0}),
        ("json", {"op": "move", "ids": [i], "to": 50}), ("json", {"op": "merge", "clusters": [0]}),
        ("json", {"op": "undo", "target": 10_000}), ("json", [1, 2, 3]), ("json", "move"),
        ("json", {"op": "move", "ids": [i], "to": 1, "path": "/etc/passwd"}),
        ("raw", b"{not json"), ("raw", b"\xff\xfe"),
    ]
    for kind, body in bad:
        if kind == "json":
            r = client.post("/api/edit", json=body)
        else:
            r = client.post("/api/edit", content=body, headers={"content-type": "application/json"})
        assert 400 <= r.status_code < 500, body
        assert "error" in r.json()
    r = client.post("/api/edit", content=b"op=merge", headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 415  # a cross-site form post cannot send JSON
    assert client.get("/api/edit").status_code == 405
    assert (log.read_bytes() if log.exists() else b"") == before


def test_concurrent_edits_from_two_tabs(run):
    import csv

    with open(run / "assignments.csv", newline="") as f:
        ids = [r["id"] for r in csv.DictReader(f)]
    app = build_app(run)
    tabs = [TestClient(app, base_url=BASE), TestClient(app, base_url=BASE)]
    n0 = len(tabs[0].get("/api/edits").json()["edits"])
    barrier = threading.Barrier(2)
    codes = [[], []]

    def tab(t):
        barrier.wait()
        for j in range(10):
            codes[t].append(tabs[t].post("/api/edit", json={"op": "move", "ids": [ids[t * 50 + j]], "to": t}).status_code)

    ts = [threading.Thread(target=tab, args=(t,)) for t in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert codes == [[200] * 10, [200] * 10]
    edits = tabs[1].get("/api/edits").json()["edits"]
    assert [e["seq"] for e in edits] == list(range(n0 + 20))
    assert {e["ids"][0] for e in edits[n0:]} == {ids[t * 50 + j] for t in range(2) for j in range(10)}


def test_cli_refuses_public_bind_without_token(run):
    import os
    import subprocess
    import sys

    env = dict(os.environ, IMGCLUST_QUIET="1", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "imgclust.cli", "review", str(run), "--host", "0.0.0.0", "--token", "none"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and "without a token" in r.stderr and "review: http" not in r.stdout
