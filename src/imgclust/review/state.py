"""What the review app holds for one run: assignments, features, edits, thumbnails, indexes.

Images are only ever looked up by their id in the run (``index``: id -> row of
assignments.csv -> source index); no string from a client reaches the filesystem.
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from imgclust.duplicates import find_quality, l2n, read_quality, thumb_vectors, write_quality
from imgclust.errors import BadImageError, InputError
from imgclust.refine import edits as edit_log
from imgclust.review.apply import run_features

THUMB = 96
THUMB_CACHE = 20_000


class ReviewState:
    def __init__(self, run_dir: str | Path, map_method: str = "pca", seed: int = 0) -> None:
        self.run_dir = Path(run_dir)
        self.data, self.source, self.features, self.src_rows = run_features(self.run_dir)
        self.index = {s: i for i, s in enumerate(self.data.ids)}
        self.k = int(self.data.k)
        self.map_method = map_method
        self.seed = seed
        self.truth = None
        if self.source.labels is not None:
            y = np.asarray(self.source.labels)[self.src_rows]
            self.truth = y if (y >= 0).any() else None
        self.class_names = self.source.class_names
        self._lock = threading.RLock()
        self._replayed: tuple[int, Any] | None = None
        self._thumbs: OrderedDict[tuple[int, int], bytes] = OrderedDict()
        self._faiss: Any = None
        self._xn: np.ndarray | None = None
        self._map: tuple[np.ndarray, np.ndarray, str] | None = None
        self._quality: tuple[list[dict[str, str]], list[dict[str, str]]] | None = None
        log = edit_log.read_log(self.run_dir)  # a damaged log ends here, before serving anything
        self.current(log)

    # ------------------------------------------------------------------ edits
    def current(self, log: list[dict[str, Any]] | None = None) -> edit_log.Replayed:
        """The labels after the edits so far (cached per log length)."""
        with self._lock:
            log = edit_log.read_log(self.run_dir) if log is None else log
            if self._replayed is None or self._replayed[0] != len(log):
                self._replayed = (len(log), edit_log.replay(self.data.clusters, log, self.index, self.features, self.k))
            return self._replayed[1]

    def log(self) -> list[dict[str, Any]]:
        return edit_log.read_log(self.run_dir)

    def add_edit(self, edit: Any) -> dict[str, Any]:
        with self._lock:
            return edit_log.append(self.run_dir, edit, self.index, self.data.clusters, self.features, self.k)

    # ------------------------------------------------------------------ images
    def thumbnail(self, row: int, size: int = THUMB) -> bytes:
        key = (row, size)
        with self._lock:
            b = self._thumbs.get(key)
            if b is not None:
                self._thumbs.move_to_end(key)
                return b
        from PIL import Image

        try:
            img = self.source.read(int(self.src_rows[row]))
        except (BadImageError, OSError, ValueError) as e:
            raise InputError(f"image cannot be read ({e})") from e
        im = Image.fromarray(np.ascontiguousarray(img))
        if max(im.size) > size:
            im.thumbnail((size, size), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        im.convert("RGB").save(buf, format="JPEG", quality=80)
        b = buf.getvalue()
        with self._lock:
            self._thumbs[key] = b
            while len(self._thumbs) > THUMB_CACHE:
                self._thumbs.popitem(last=False)
        return b

    # ------------------------------------------------------------------ search
    def similar(self, row: int, n: int = 24) -> list[tuple[int, float]]:
        from imgclust.duplicates import knn_index

        if self.features is None:
            raise InputError("no features: the run's feature-cache entry is gone")
        with self._lock:
            if self._faiss is None:
                self._xn = l2n(self.features)
                self._faiss = knn_index(self._xn, self.seed)
        assert self._xn is not None
        d, i = self._faiss.search(self._xn[row:row + 1], min(n + 1, len(self._xn)))
        return [(int(j), float(s)) for j, s in zip(i[0], d[0]) if j >= 0 and j != row][:n]

    def warm(self) -> None:
        """Build the faiss index and the map ahead of the first request (run in a background thread)."""
        if self.features is None or len(self.features) < 2:
            return
        try:
            self.similar(0, 1)
            self.map_xy()
        except Exception:  # noqa: BLE001 - a page that needs them reports the problem itself
            pass

    def quality(self) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
        """duplicates.csv / outliers.csv rows; computed from the features and written when the run lacks them."""
        with self._lock:
            if self._quality is None:
                q = read_quality(self.run_dir)
                if q is None:
                    if self.features is None:
                        return [], []
                    res = find_quality(self.features, thumbs=thumb_vectors(self.source, self.src_rows), seed=self.seed)
                    write_quality(self.run_dir, res, self.data.ids, self.data.paths, self.data.clusters)
                    q = read_quality(self.run_dir)
                self._quality = q
            return self._quality

    def map_xy(self) -> tuple[np.ndarray, np.ndarray, str]:
        """(rows, (n, 2) coordinates in [0, 1], method) of a stratified sample of at most 3,000 images."""
        from imgclust.report.embed import embed_2d
        from imgclust.report.html import select_map_rows

        with self._lock:
            if self._map is None:
                if self.features is None:
                    raise InputError("no features: the run's feature-cache entry is gone")
                sel = select_map_rows(self.data.clusters, self.k, 3000, self.seed)
                xy, used = embed_2d(self.features[sel], self.map_method, self.seed)
                self._map = (sel, xy, used)
            return self._map
