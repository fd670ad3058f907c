"""Time every page of the review app (``imgclust review``) in headless Chromium and save screenshots.

Serves RUN on 127.0.0.1 (a free port) in this process, opens each page with Selenium driving
Debian's ``chromium``/``chromedriver``, and prints a markdown table: page, navigation start to
the load event (ms, best of ``--repeat``), HTML size. With ``--shots DIR`` a JPEG screenshot of
each page is written there (docs/review-*.jpg in the repository).

    PYTHONPATH=src python benchmarks/review_pages.py RUN [--shots docs] [--repeat 3]
"""

from __future__ import annotations

import argparse
import io
import threading
import time
from pathlib import Path
from urllib.parse import quote

from selenium import webdriver
from selenium.webdriver.chrome.service import Service


def main() -> None:
    import shutil

    import uvicorn
    from PIL import Image

    from imgclust.review.server import build_app, free_port

    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--shots", default=None)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--cluster", type=int, default=0)
    ap.add_argument("--width", type=int, default=1280)
    a = ap.parse_args()
    t0 = time.perf_counter()
    app = build_app(a.run, allowed_hosts=["127.0.0.1"])
    state = app.state.review
    print(f"app ready in {time.perf_counter() - t0:.1f} s: {len(state.data.ids):,} images, K={state.k}")
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}"
    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium") or "chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={a.width},900"):
        opts.add_argument(arg)
    d = webdriver.Chrome(service=Service(shutil.which("chromedriver") or "chromedriver"), options=opts)
    d.set_page_load_timeout(300)
    first = state.data.ids[int(state.data.confidence.argmax())]
    pages = [("overview", "/"), (f"cluster {a.cluster} (200 images)", f"/cluster/{a.cluster}"),
             (f"cluster {a.cluster} boundary", f"/cluster/{a.cluster}?order=boundary"), ("map", "/map"),
             ("similar images", f"/similar/{quote(first, safe='')}"), ("duplicates", "/duplicates"),
             ("outliers", "/outliers"), ("edits", "/edits")]
    print("| page | first load (ms) | best of repeats (ms) | HTML bytes |\n|---|---:|---:|---:|")
    try:
        for name, path in pages:
            times = []
            for _ in range(max(1, a.repeat)):
                d.get(url + path)
                times.append(d.execute_script("const n=performance.getEntriesByType('navigation')[0];"
                                              "return n.loadEventEnd-n.startTime;"))
            size = len(d.page_source.encode())
            print(f"| {name} | {times[0]:.0f} | {min(times):.0f} | {size:,} |")
            if a.shots:
                time.sleep(0.5)  # lazy thumbnails in view
                png = d.get_screenshot_as_png()
                im = Image.open(io.BytesIO(png)).convert("RGB")
                slug = path.strip("/").split("/")[0].split("?")[0] or "overview"
                if "boundary" in path:
                    slug += "-boundary"
                out = Path(a.shots) / f"review-{slug}.jpg"
                out.parent.mkdir(parents=True, exist_ok=True)
                im.thumbnail((1024, 1024))
                im.save(out, quality=70)
    finally:
        d.quit()
        server.should_exit = True
        th.join(10)


if __name__ == "__main__":
    main()
