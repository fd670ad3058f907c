"""JPEG draft level in the feature-cache key (issue 19, session 3): it enters the key only when
some image of the source decodes differently at the 1x draft than at sessions 1-2's 2x draft."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from imgclust.backbones.base import Backbone, Preprocess
from imgclust.data import open_source
from imgclust.data.decode import decode_image, jpeg_draft
from imgclust.engines import pipeline
from imgclust.features import cache_key, extract_features


class Mean(Backbone):
    """Deterministic 'backbone': per-channel means of a 4x4 grid of the 32 px image (48-d)."""

    def __init__(self) -> None:
        super().__init__()
        self.name, self.dim, self.weights_id = "grid-mean-test", 48, "none"
        self.preprocess = Preprocess(size=32, resize="squash")

    def forward(self, x):
        import torch

        return torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)


def _photo(w: int, h: int, seed: int, fmt: str = "JPEG") -> bytes:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(2, h // 8), max(2, w // 8), 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)
    arr = np.asarray(img).astype(np.int16) + rng.integers(-20, 21, (h, w, 3))  # grain: drafting must show
    buf = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _folder(root, sizes, fmt="JPEG"):
    root.mkdir()
    for i, (w, h) in enumerate(sizes):
        (root / f"img_{i}.{'jpg' if fmt == 'JPEG' else 'png'}").write_bytes(_photo(w, h, i, fmt))
    return open_source(str(root))


@pytest.fixture(autouse=True)
def _fresh_memo():
    pipeline._DRAFT_MEMO.clear()
    yield
    pipeline._DRAFT_MEMO.clear()


def test_gaps_and_thresholds_are_what_the_key_rule_assumes():
    pre = Mean().preprocess
    assert pipeline.DRAFT_GAP == 1 and pipeline.LEGACY_DRAFT_GAP == 2
    assert pipeline.draft_side(pre) == 32 and pipeline.draft_side(pre, 2) == 64
    assert pipeline.draft_key_suffix(2) == "" and pipeline.draft_key_suffix(1) == "-draft1"


def test_small_images_keep_their_key_and_decode(tmp_path):
    src = _folder(tmp_path / "small", [(48, 40), (60, 45), (40, 40)])  # never drafted at either gap
    bb = Mean()
    fs = extract_features(src, bb, cache_dir=tmp_path / "c", engine="torch", progress=False)
    assert fs.key == cache_key(src, bb)  # no draft suffix: the session 1-2 entry is still the one used
    full = np.stack([bb.preprocess.resize_image(decode_image(src.path(i))) for i in range(len(src))])
    ref = bb(bb.preprocess.to_tensor(full)).detach().numpy()
    np.testing.assert_allclose(np.asarray(fs.features), ref, atol=1e-5)
    assert pipeline.draft_gap_for(src, bb.preprocess) == pipeline.LEGACY_DRAFT_GAP
    # PNGs are never drafted, however large; array sources hold no encoded files at all
    png = _folder(tmp_path / "png", [(400, 300)], fmt="PNG")
    assert pipeline.draft_gap_for(png, bb.preprocess) == pipeline.LEGACY_DRAFT_GAP
    assert pipeline.draft_gap_for(open_source("digits"), bb.preprocess) == pipeline.LEGACY_DRAFT_GAP


@pytest.mark.parametrize("big", [(400, 300), (100, 75)])  # drafted at both gaps (to other scales) / only at 1x
def test_a_photo_that_drafts_differently_changes_the_key_and_its_row(tmp_path, big):
    src = _folder(tmp_path / "mixed", [(48, 40), big, (60, 45)])
    bb = Mean()
    pre = bb.preprocess
    fs = extract_features(src, bb, cache_dir=tmp_path / "c", engine="torch", progress=False)
    assert fs.key == cache_key(src, bb) + "-draft1"
    with jpeg_draft(pipeline.draft_side(pre, 1)):
        d1 = decode_image(src.path(1))
    with jpeg_draft(pipeline.draft_side(pre, 2)):
        d2 = decode_image(src.path(1))
    assert d1.shape[:2] != d2.shape[:2] and min(d1.shape[:2]) >= 32
    row = bb(pre.to_tensor(pre.resize_image(d1)[None])).detach().numpy()[0]
    np.testing.assert_allclose(np.asarray(fs.features)[1], row, atol=1e-5)  # the 1x draft was used
    old = bb(pre.to_tensor(pre.resize_image(d2)[None])).detach().numpy()[0]
    assert np.abs(old - row).max() > 1e-3  # ... and it is not the decode the old key's entry holds
    # the scan's answer is cached on disk: a new process (memo cleared) reads it without scanning
    assert len(list((tmp_path / "c" / "drafts").glob("*.json"))) == 1
    pipeline._DRAFT_MEMO.clear()

    def boom(*a, **k):
        raise AssertionError("scanned again")

    import imgclust.data.decode as dec

    orig, dec.jpeg_draft_size = dec.jpeg_draft_size, boom
    try:
        again = extract_features(src, bb, cache_dir=tmp_path / "c", engine="torch", progress=False)
    finally:
        dec.jpeg_draft_size = orig
    assert again.key == fs.key and again.from_cache
    # a subset without the big photo decodes as before: no suffix
    from imgclust.data.base import SubsetSource

    sub = SubsetSource(src, [0, 2])
    assert pipeline.draft_gap_for(sub, pre) == pipeline.LEGACY_DRAFT_GAP
    assert pipeline.draft_gap_for(SubsetSource(src, [1]), pre) == pipeline.DRAFT_GAP
