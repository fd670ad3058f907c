"""Feature extraction and the on-disk cache: real digits through real backbones."""

import json

import numpy as np
import pytest

from imgclust.backbones import build_backbone
from imgclust.data.base import ArraySource
from imgclust.errors import BadImageError
from imgclust.features import cache_key, extract_features


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    return ArraySource((d.images * 255 / 16).astype(np.uint8), d.target, name="digits")


class CountingSource(ArraySource):
    """Counts reads; optionally fails (bad image, or a crash) at chosen indices."""

    def __init__(self, base, bad=(), crash_at=None):
        super().__init__(base.images, base.labels, name=base.name)
        self.reads = 0
        self.bad = set(bad)
        self.crash_at = crash_at

    def read(self, i):
        self.reads += 1
        if i == self.crash_at:
            raise KeyboardInterrupt  # what Ctrl-C does mid-extraction
        if i in self.bad:
            raise BadImageError("truncated image")
        return super().read(i)


def test_pixels_features_are_the_resized_pixels(digits, tmp_path):
    bb = build_backbone("pixels", image_size=8)
    fs = extract_features(digits, bb, cache_dir=tmp_path, progress=False)
    assert fs.features.shape == (len(digits), 8 * 8 * 3)
    expected = digits.read(5).astype(np.float32).transpose(2, 0, 1).reshape(-1) / 255.0
    np.testing.assert_allclose(fs.features[5], expected, atol=1e-6)
    assert fs.valid.all() and fs.skipped == []


def test_second_call_is_a_memmapped_cache_hit(digits, tmp_path):
    bb = build_backbone("pixels", image_size=8)
    first = np.array(extract_features(digits, bb, cache_dir=tmp_path, progress=False).features)
    src = CountingSource(digits)
    fs = extract_features(src, bb, cache_dir=tmp_path, progress=False)
    assert fs.from_cache and src.reads == 0
    assert isinstance(fs.features, np.memmap)
    np.testing.assert_array_equal(fs.features, first)


def test_interrupted_extraction_resumes_and_matches_an_uninterrupted_run(digits, tmp_path):
    bb = build_backbone("efficientnet-lite0", image_size=32)
    full = extract_features(digits, bb, use_cache=False, progress=False, batch_size=64).features
    crashing = CountingSource(digits, crash_at=900)
    with pytest.raises(KeyboardInterrupt):
        extract_features(crashing, bb, cache_dir=tmp_path, progress=False, batch_size=64, chunk_rows=256)
    entry = tmp_path / "features" / cache_key(digits, bb)
    done = json.loads((entry / "progress.json").read_text())["done"]
    assert 256 <= done < 900 and not (entry / "meta.json").exists()  # partial, not trusted as complete
    again = CountingSource(digits)
    fs = extract_features(again, bb, cache_dir=tmp_path, progress=False, batch_size=64, chunk_rows=256)
    assert again.reads == len(digits) - done  # only the missing rows were computed
    np.testing.assert_allclose(fs.features, full, rtol=1e-4, atol=1e-5)


def test_unreadable_images_are_skipped_counted_and_listed(digits, tmp_path):
    src = CountingSource(digits, bad={3, 100})
    fs = extract_features(src, build_backbone("pixels", image_size=8), cache_dir=tmp_path, progress=False)
    assert fs.n_valid == len(digits) - 2
    assert [(i, reason) for i, _, reason in fs.skipped] == [(3, "truncated image"), (100, "truncated image")]
    assert not fs.valid[3] and not fs.valid[100]
    # and the cached entry remembers them
    again = extract_features(src, build_backbone("pixels", image_size=8), cache_dir=tmp_path, progress=False)
    assert again.from_cache and [i for i, _, _ in again.skipped] == [3, 100]


def test_cache_key_depends_on_data_backbone_and_preprocessing(digits):
    a = build_backbone("pixels", image_size=8)
    b = build_backbone("pixels", image_size=16)
    other = ArraySource(digits.images[:-1], name="digits")
    assert cache_key(digits, a) != cache_key(digits, b)
    assert cache_key(digits, a) != cache_key(other, a)
    assert cache_key(digits, a) == cache_key(ArraySource(digits.images.copy(), digits.labels), a)


def test_corrupt_cache_entry_is_recomputed_not_trusted(digits, tmp_path):
    bb = build_backbone("pixels", image_size=8)
    good = np.array(extract_features(digits, bb, cache_dir=tmp_path, progress=False).features)
    entry = tmp_path / "features" / cache_key(digits, bb)
    (entry / "features.npy").write_bytes(b"garbage")
    src = CountingSource(digits)
    fs = extract_features(src, bb, cache_dir=tmp_path, progress=False)
    assert src.reads == len(digits) and not fs.from_cache
    np.testing.assert_array_equal(fs.features, good)
