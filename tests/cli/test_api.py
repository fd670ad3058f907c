"""The scikit-learn style estimator on real images (scikit-learn's bundled digits)."""

import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.base import clone
from sklearn.datasets import load_digits

from imgclust import ImageClusterer
from imgclust.data.base import ArraySource
from imgclust.errors import InputError
from imgclust.metrics import cluster_acc, hungarian_mapping


@pytest.fixture(scope="module")
def digits():
    from imgclust.data import digits as bundled

    src = bundled()
    return src.images, src.labels


def est(tmp_path, **kw):
    kw.setdefault("backbone", "pixels")
    kw.setdefault("image_size", 8)
    return ImageClusterer(n_clusters=10, cache_dir=str(tmp_path / "cache"), progress=False, **kw)


def test_fit_predict_on_named_source_and_arrays_agree(tmp_path, digits):
    images, y = digits
    a = est(tmp_path).fit_predict("digits")
    b = est(tmp_path).fit_predict(images)
    assert a.shape == (len(y),) and cluster_acc(y, a) > 0.75
    np.testing.assert_array_equal(a, b)  # same pixels, same seed -> same clustering


def test_same_seed_same_assignments_other_seed_still_good(tmp_path, digits):
    images, y = digits
    a = est(tmp_path, seed=1).fit(images)
    b = est(tmp_path, seed=1).fit(images)
    np.testing.assert_array_equal(a.labels_, b.labels_)
    assert ((a.confidences_ > 0.1) & (a.confidences_ <= 1.0)).all()


def test_predict_classifies_unseen_images(tmp_path, digits):
    images, y = digits
    m = est(tmp_path).fit(images[:1500])
    mapping = hungarian_mapping(y[:1500], m.labels_)
    pred = m.predict(images[1500:])
    acc = np.mean(np.array([mapping.get(int(c), -1) for c in pred]) == y[1500:])
    assert acc > 0.7


def test_save_load_round_trip_with_whitened_pca(tmp_path, digits):
    images, _ = digits
    m = est(tmp_path, pca=16, pca_whiten=True).fit(images)
    m.save(tmp_path / "model")
    loaded = ImageClusterer.load(tmp_path / "model")
    assert loaded.pca == 16 and loaded.pca_whiten
    np.testing.assert_array_equal(loaded.predict(images[:200]), m.labels_[:200])


def test_load_refuses_a_pickle_payload(tmp_path, digits):
    images, _ = digits
    est(tmp_path).fit(images).save(tmp_path / "model")

    class Evil:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    (tmp_path / "model" / "model.pt").write_bytes(pickle.dumps({"method.centroids": Evil()}))
    with pytest.raises(InputError, match="refusing to load"):
        ImageClusterer.load(tmp_path / "model")
    assert not (tmp_path / "pwned").exists()


def test_precomputed_features_skip_the_backbone(tmp_path):
    x, y = load_digits(return_X_y=True)
    labels = ImageClusterer(n_clusters=10, progress=False).fit_predict(x.astype(np.float32))
    assert cluster_acc(y, labels) > 0.75


def test_unreadable_images_get_label_minus_one(tmp_path, digits):
    images, _ = digits
    root = tmp_path / "imgs"
    root.mkdir()
    for i in range(40):
        Image.fromarray(images[i]).save(root / f"{i:03d}.png")
    (root / "005.png").write_bytes(b"")  # zero-byte
    data = (root / "007.png").read_bytes()
    (root / "007.png").write_bytes(data[: len(data) // 2])  # truncated
    m = ImageClusterer(n_clusters=3, backbone="pixels", image_size=8, cache_dir=str(tmp_path / "c"), progress=False)
    m.fit(str(root))
    assert m.labels_[5] == -1 and m.labels_[7] == -1
    assert (m.labels_[[i for i in range(40) if i not in (5, 7)]] >= 0).all()
    assert sorted(i for i, _, _ in m.skipped_) == [5, 7]


def test_sklearn_clone_and_params(tmp_path):
    m = est(tmp_path, pca=8)
    c = clone(m)
    assert c.get_params() == m.get_params()
    with pytest.raises(InputError, match="not fitted"):
        c.predict(np.zeros((2, 8, 8), np.uint8))


def test_bad_k_and_bad_input_types(tmp_path, digits):
    images, _ = digits
    with pytest.raises(InputError, match="at least 2"):
        est(tmp_path).set_params(n_clusters=1).fit(images)
    with pytest.raises(InputError, match="larger than the number of readable images"):
        est(tmp_path).set_params(n_clusters=50).fit(images[:20])
    with pytest.raises(InputError, match="cannot read images from a dict"):
        est(tmp_path).fit({"a": 1})
    with pytest.raises(InputError):
        est(tmp_path).fit(np.zeros(5))
    assert isinstance(torch.__version__, str)


def test_array_source_accepts_gray_and_rgba(digits):
    images, _ = digits
    rgba = np.repeat(images[:4, :, :, None], 4, axis=3)
    assert ArraySource(rgba).read(0).shape == (8, 8, 3)


def test_readme_python_example_runs(tmp_path, monkeypatch):
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert blocks, "README lost its Python example"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("IMGCLUST_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("IMGCLUST_QUIET", "1")
    scope: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), scope)
    assert cluster_acc(load_digits().target, scope["labels"]) > 0.75
    assert (tmp_path / "model" / "model.pt").is_file()
