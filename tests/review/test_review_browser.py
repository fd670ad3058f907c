"""The review app in a real headless Chromium (Debian's chromium + chromium-driver, through Selenium).

Skips with the reason when Chromium, its driver or selenium is missing, unless
``IMGCLUST_REQUIRE_BROWSER=1`` (set by .ci/run, which installs them): then it fails.
"""

import csv
import os
import shutil
import threading
import time

import numpy as np
import pytest

from imgclust.api import ImageClusterer, cluster
from imgclust.config import BackboneConfig, FeatureConfig, RunConfig, SourceConfig
from imgclust.data import open_source
from imgclust.refine.edits import read_log
from imgclust.report.rundata import load_run
from imgclust.rundir import write_csv, write_json

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
DRIVER = shutil.which("chromedriver")


def _missing() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e .[test])"
    if not CHROMIUM or not DRIVER:
        return "chromium/chromedriver not found (apt-get install -y chromium chromium-driver)"
    return None


if _missing():
    if os.environ.get("IMGCLUST_REQUIRE_BROWSER") == "1":
        raise RuntimeError(f"browser tests required but {_missing()}")
    pytest.skip(_missing(), allow_module_level=True)

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

WAIT = 60


class Server:
    """uvicorn serving the review app of one run on 127.0.0.1 and a free port, in a thread."""

    def __init__(self, run_dir):
        import uvicorn

        from imgclust.review.server import build_app, free_port

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(build_app(run_dir, allowed_hosts=["127.0.0.1"]), host="127.0.0.1",
                                                    port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        t0 = time.time()
        while not self.server.started:
            assert time.time() - t0 < WAIT, "server did not start"
            time.sleep(0.05)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *a):
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def browser():
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,1000"):
        opts.add_argument(a)
    d = webdriver.Chrome(service=Service(DRIVER), options=opts)
    d.set_page_load_timeout(WAIT)
    yield d
    d.quit()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("browser")
    cfg = RunConfig(k=6, source=SourceConfig(path="digits"), backbone=BackboneConfig(name="pixels", image_size=8),
                    features=FeatureConfig(cache_dir=str(tmp / "cache")), report=False)
    cluster(cfg, tmp / "run", progress=False)
    return tmp / "run"


def wait_reload(browser, old):
    from selenium.common.exceptions import WebDriverException

    def gone(_d) -> bool:  # staleness_of, but Chromium may also answer "Node ... does not belong to the document"
        try:
            old.is_enabled()
            return False
        except WebDriverException:  # StaleElementReferenceException is one
            return True

    WebDriverWait(browser, WAIT).until(gone)
    WebDriverWait(browser, WAIT).until(lambda d: d.execute_script("return document.readyState") == "complete")


def nav_ms(browser) -> float:
    """Navigation start to the load event of the current page (ms), from the Navigation Timing API."""
    return float(browser.execute_script(
        "const n=performance.getEntriesByType('navigation')[0];return n.loadEventEnd-n.startTime;"))


def test_merge_move_undo_apply_predict(browser, run, tmp_path):
    data = load_run(run)
    base = data.clusters
    a, b = 0, 1
    src_c = 3
    rows = np.flatnonzero(base == src_c)
    rows = rows[np.lexsort((rows, -data.confidence[rows]))]  # the page's order: most confident first
    movers = [data.ids[i] for i in rows[:3]]
    targets = [4, 5, 2]
    with Server(run) as url:
        browser.get(url + "/")
        assert "Clusters" in browser.title
        for c in (a, b):
            browser.find_element(By.CSS_SELECTOR, f'input.pick-cluster[value="{c}"]').click()
        html = browser.find_element(By.TAG_NAME, "html")
        browser.find_element(By.ID, "merge-btn").click()
        wait_reload(browser, html)
        assert len(browser.find_elements(By.CSS_SELECTOR, "tr[data-cluster]")) == 6
        assert browser.find_element(By.CSS_SELECTOR, f'tr[data-cluster="{b}"] td:nth-child(4)').text == "0"
        for img_id, to in zip(movers, targets):  # three moves, one image each
            browser.get(f"{url}/cluster/{src_c}")
            cell = browser.find_element(By.CSS_SELECTOR, f'div.cell[data-id="{img_id}"]')
            cell.click()
            assert "selected" in cell.get_attribute("class")
            Select(browser.find_element(By.ID, "move-to")).select_by_value(str(to))
            html = browser.find_element(By.TAG_NAME, "html")
            browser.find_element(By.ID, "move-btn").click()
            wait_reload(browser, html)
            assert not browser.find_elements(By.CSS_SELECTOR, f'div.cell[data-id="{img_id}"]')
        browser.get(url + "/edits")
        html = browser.find_element(By.TAG_NAME, "html")
        browser.find_element(By.CSS_SELECTOR, 'tr[data-seq="3"] button.undo').click()  # undo the third move
        wait_reload(browser, html)
        assert "undone" in browser.find_element(By.CSS_SELECTOR, 'tr[data-seq="3"]').get_attribute("class")
        log = read_log(run)
        assert [e["op"] for e in log] == ["merge", "move", "move", "move", "undo"]
        browser.get(url + "/")
        out = tmp_path / "reviewed"
        box = browser.find_element(By.ID, "apply-out")
        box.clear()
        box.send_keys(str(out))
        browser.find_element(By.ID, "apply-btn").click()
        WebDriverWait(browser, 300).until(lambda d: "written" in d.find_element(By.ID, "apply-result").text)
    new = load_run(out)
    want = base.copy()
    want[base == b] = a
    index = {s: i for i, s in enumerate(data.ids)}
    for img_id, to in zip(movers[:2], targets[:2]):
        want[index[img_id]] = to
    assert new.ids == data.ids
    assert (new.clusters == want).all()  # differs from the old run exactly by the edits
    assert int((new.clusters != base).sum()) == int((base == b).sum()) + 2
    est = ImageClusterer.load(out / "model", progress=False)
    pred = est.predict(open_source("digits"))
    assert [int(pred[index[i]]) for i in movers[:2]] == targets[:2]  # predict reflects the moves
    assert int(pred[index[movers[2]]]) != targets[2]  # and not the undone one


@pytest.fixture(scope="module")
def big_run(tmp_path_factory):
    """A 50,000-image run (synthetic 8x8 images in an .npz; assignments written directly, no features:
    the overview and cluster pages need none). Clusters of 5,000; confidence random."""
    tmp = tmp_path_factory.mktemp("big")
    n, k = 50_000, 10
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(k), n // k)
    base = rng.integers(0, 256, (k, 8, 8, 3))
    img = np.clip(base[y] + rng.normal(0, 40, (n, 8, 8, 3)), 0, 255).astype(np.uint8)
    np.savez(tmp / "big.npz", images=img, labels=y)
    src = open_source(str(tmp / "big.npz"))
    ids = src.ids()
    d = tmp / "run"
    conf = rng.uniform(0.2, 1.0, n)
    write_csv(d / "assignments.csv", ["id", "path", "cluster", "confidence"],
              [(ids[i], "", int(y[i]), f"{conf[i]:.4f}") for i in range(n)])
    write_json(d / "run.json", {"config": {"source": {"path": str(tmp / "big.npz")}}, "n_images": n,
                                "cluster_sizes": np.bincount(y).tolist(), "seed": 0})
    return d


def test_pages_of_a_50k_run_render_under_a_second(browser, big_run):
    with open(big_run / "assignments.csv", newline="") as f:
        assert sum(1 for _ in csv.DictReader(f)) == 50_000
    with Server(big_run) as url:
        browser.get(url + "/")  # warm-up: the first request of a fresh server
        times = {}
        for name, path in (("overview", "/"), ("cluster (200 images)", "/cluster/3")):
            best = []
            for _ in range(3):
                browser.get(url + path)
                best.append(nav_ms(browser))
            times[name] = min(best)
        n_cells = len(browser.find_elements(By.CSS_SELECTOR, "div.cell"))
        # every thumbnail in view has loaded (lazy ones below the fold load on scroll)
        loaded = browser.execute_script("return [...document.images].filter(i=>i.complete&&i.naturalWidth>0).length")
    print("render ms:", times)
    assert n_cells == 200 and loaded > 0
    assert times["overview"] < 1000 and times["cluster (200 images)"] < 1000, times
