"""``st_confident``: the manifold methods self-train on the images every run agrees on (issue 18, session 3)."""

import numpy as np
import pytest

from imgclust.methods import FitContext, get_method
from imgclust.metrics import cluster_acc


def test_spectral_runs_self_train_on_the_confident_images_and_reload(digits_xy, tmp_path):
    x, y = digits_xy
    ctx = FitContext(seed=0, progress=False, work_dir=tmp_path)
    opts = {"runs": 3, "st_confident": True, "graph_k": 10}
    m = get_method("spectral-kmeans")(10, opts).fit(x, ctx)
    st = m.history_["self_training"]
    assert 0.2 <= st["confident_share"] <= 1.0 and st["fallback_to_all"] is False
    assert cluster_acc(y, m.labels_) > 0.8
    again = get_method("spectral-kmeans")(10, opts)
    again.load_state_dict(m.state_dict())
    np.testing.assert_array_equal(again.predict(x), m.labels_)
    with pytest.raises(Exception, match="st_confident"):
        get_method("spectral-kmeans")(10, {"st_confident": "yes"})
