"""Render a run's report.html with headless Chromium and save a PNG screenshot.

Builds the report first when asked (``--build``, with ``--map``), then runs Debian's
``chromium`` (``apt-get install -y chromium``) with the network switched off: the page
must render from the file alone. Prints a markdown table: report size, thumbnails, map
method, render time, and whether the page asked for anything outside the file.

    python benchmarks/report_screenshot.py runs/cifar10 --build --map umap --out /tmp/notes/report.png
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def find_chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        p = shutil.which(name)
        if p:
            return p
    raise SystemExit("no chromium found: apt-get install -y chromium")


def external_refs(html_text: str) -> list[str]:
    """src/href/url()/@import values that point outside the file (anything but data: and #anchors)."""
    refs = re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)["']""", html_text)
    refs += re.findall(r"""url\(\s*["']?([^"')]+)""", html_text)
    refs += re.findall(r"""@import\s+["']?([^"';]+)""", html_text)
    return [r for r in refs if r and not r.startswith(("data:", "#"))]


def screenshot(html: Path, png: Path, width: int = 1400, height: int = 2000, timeout: int = 120) -> float:
    chromium = find_chromium()
    png.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as profile:
        cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               f"--user-data-dir={profile}",
               # no network at all: a page that needed a CDN script or a web font would show it
               "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>",
               "--virtual-time-budget=5000", f"--window-size={width},{height}", f"--screenshot={png}",
               html.resolve().as_uri()]
        t = time.perf_counter()
        subprocess.run(cmd, check=True, timeout=timeout, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--build", action="store_true", help="(re)build report.html first")
    ap.add_argument("--map", default="auto", help="map method when building: auto | umap | tsne | pca")
    ap.add_argument("--out", type=Path, default=Path("report.png"))
    ap.add_argument("--width", type=int, default=1400)
    ap.add_argument("--height", type=int, default=2000)
    a = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    html = a.run_dir / "report.html"
    build = None
    if a.build:
        import torch

        torch.set_num_threads(1)
        from imgclust.report import build_report

        build = build_report(a.run_dir, map_method=a.map)
    if not html.is_file():
        sys.exit(f"{html} not found (use --build)")
    text = html.read_text(encoding="utf-8")
    refs = external_refs(text)
    secs = screenshot(html, a.out, a.width, a.height)
    print("| report | size | thumbnails | map | build s | render s | external refs | screenshot |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {html} | {html.stat().st_size / 1e6:.2f} MB | {build['n_thumbnails'] if build else '-'} | "
          f"{build['map_method'] if build else '-'} | {build['seconds'] if build else '-'} | {secs:.1f} | "
          f"{len(refs)} | {a.out} ({a.out.stat().st_size / 1e3:.0f} kB) |")


if __name__ == "__main__":
    main()
