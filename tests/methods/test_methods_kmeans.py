import numpy as np
import pytest
import torch

from imgclust.errors import InputError
from imgclust.methods import FitContext, available_methods, get_method
from imgclust.metrics import cluster_acc


def test_registry_lists_kmeans_and_rejects_unknown_names():
    assert "kmeans" in available_methods()
    with pytest.raises(InputError, match="unknown method 'nope'; available: .*kmeans"):
        get_method("nope")


def test_kmeans_clusters_digits_and_is_deterministic(digits_xy):
    x, y = digits_xy
    km = get_method("kmeans")
    a = km(10).fit(x, FitContext(seed=3))
    b = km(10).fit(x, FitContext(seed=3))
    assert cluster_acc(y, a.labels_) > 0.7
    np.testing.assert_array_equal(a.labels_, b.labels_)
    proba = a.predict_proba(x)
    assert proba.shape == (len(x), 10)
    np.testing.assert_allclose(proba.sum(1), 1.0, rtol=1e-5)
    assert (proba.max(1) >= 0.1).all()


def test_kmeans_state_round_trip_predicts_the_same(digits_xy, tmp_path):
    x, _ = digits_xy
    km = get_method("kmeans")
    a = km(10).fit(x, FitContext(seed=0))
    torch.save(a.state_dict(), tmp_path / "s.pt")
    b = km(10)
    b.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    np.testing.assert_array_equal(b.predict(x[:100]), a.labels_[:100])


def test_kmeans_validates_k_and_options(digits_xy):
    x, _ = digits_xy
    km = get_method("kmeans")
    with pytest.raises(InputError, match="at least 2"):
        km(1)
    with pytest.raises(InputError, match="larger than the number of images"):
        km(20).fit(x[:5], FitContext())
    with pytest.raises(InputError, match="unknown option"):
        km(3, {"n_inits": 3})
