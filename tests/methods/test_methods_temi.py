"""The ``temi`` and ``icce-heads`` methods: fitting, determinism, persistence, API and CLI."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from imgclust import ImageClusterer
from imgclust.errors import InputError
from imgclust.methods import FitContext, available_methods, get_method
from imgclust.metrics import cluster_acc

# Small and fast: 8 heads, 30 short epochs (14 steps each); a faster teacher (momentum 0.9
# instead of 0.996) because digits give few steps; neighbours on centred pixels (raw pixel
# vectors are all non-negative, so ICCE's absolute threshold would admit hundreds).
FAST = {"heads": 8, "epochs": 30, "batch_size": 128, "k": 10, "warmup_epochs": 1, "momentum": 0.9,
        "center_neighbors": True}


@pytest.fixture(scope="module")
def fitted(digits_xy):
    x, _ = digits_xy
    return {name: get_method(name)(10, FAST).fit(x, FitContext(seed=0, progress=False))
            for name in ("temi", "icce-heads")}


def test_both_methods_are_registered_and_differ_only_in_defaults():
    methods = available_methods()
    temi, icce = methods["temi"], methods["icce-heads"]
    assert issubclass(icce, temi)
    a, b = temi.Config().to_dict(), icce.Config().to_dict()
    assert {k for k in a if a[k] != b[k]} == {"neighbors", "norm", "sinkhorn", "ce_weight"}
    assert a["momentum"] == 0.996 and a["threshold"] == 0.3 and not a["center_neighbors"]
    assert (a["neighbors"], a["norm"], a["sinkhorn"], a["ce_weight"]) == ("fixed", "standardize", False, 0.0)
    assert (b["neighbors"], b["norm"], b["sinkhorn"]) == ("adaptive", "batchnorm", True) and b["ce_weight"] > 0
    assert a["heads"] == 50 and a["k"] == 50 and a["weight_decay"] == 1e-4 and a["beta"] == 0.6


@pytest.mark.parametrize("name", ["temi", "icce-heads"])
def test_clusters_digits_well_above_chance_and_keeps_every_head(fitted, digits_xy, name):
    x, y = digits_xy
    m = fitted[name]
    assert cluster_acc(y, m.labels_) > 0.6  # chance is ~0.1
    assert m.head_labels_.shape == (8, len(x)) and m.head_labels_.dtype == np.int16  # issue 20: compact
    np.testing.assert_array_equal(m.labels_, m.head_labels_[m.best_head_])
    assert m.best_head_ == int(np.argmin(m.history_["head_losses"]))
    assert len(m.history_["loss"]) == 30 and m.history_["best_head"] == m.best_head_
    proba = m.predict_proba(x)
    assert proba.shape == (len(x), 10)
    np.testing.assert_allclose(proba.sum(1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(proba.argmax(1), m.labels_)
    np.testing.assert_array_equal(m.predict_heads(x), m.head_labels_)
    assert m.head_logits(x[:5]).shape == (8, 5, 10)


def test_fit_is_deterministic_under_a_seed(digits_xy):
    x, _ = digits_xy
    opts = {**FAST, "epochs": 3}
    a = get_method("icce-heads")(10, opts).fit(x, FitContext(seed=7, progress=False))
    b = get_method("icce-heads")(10, opts).fit(x, FitContext(seed=7, progress=False))
    c = get_method("icce-heads")(10, opts).fit(x, FitContext(seed=8, progress=False))
    np.testing.assert_array_equal(a.head_labels_, b.head_labels_)
    assert a.history_["loss"] == b.history_["loss"]
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    assert not torch.equal(a.state_dict()["teacher.weight"], c.state_dict()["teacher.weight"])


def test_state_round_trip_keeps_all_heads(fitted, digits_xy, tmp_path):
    x, _ = digits_xy
    m = fitted["icce-heads"]
    torch.save(m.state_dict(), tmp_path / "s.pt")
    state = torch.load(tmp_path / "s.pt", weights_only=True)
    assert state["teacher.weight"].shape == (8, 64, 10)
    b = get_method("icce-heads")(10, FAST)
    b.load_state_dict(state)
    np.testing.assert_array_equal(b.predict(x), m.labels_)
    np.testing.assert_array_equal(b.predict_heads(x), m.head_labels_)


def test_estimator_save_load_predicts_identically(digits_xy, tmp_path):
    x, y = digits_xy
    est = ImageClusterer(n_clusters=10, method="temi", method_options=FAST, progress=False).fit(x)
    assert cluster_acc(y, est.labels_) > 0.6
    est.save(tmp_path / "model")
    back = ImageClusterer.load(tmp_path / "model")
    np.testing.assert_array_equal(back.predict(x), est.labels_)
    np.testing.assert_allclose(back.predict_proba(x[:50]), est.predict_proba(x[:50]), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(back.model_.predict_heads(x), est.model_.head_labels_)


def test_fewer_images_than_neighbours_and_bad_options(digits_xy):
    x, _ = digits_xy
    m = get_method("icce-heads")(3, {**FAST, "k": 50, "epochs": 2}).fit(x[:20], FitContext(progress=False))
    assert m.labels_.shape == (20,) and m.history_["neighbors"]["k_effective"] == 19
    with pytest.raises(InputError, match="neighbors must be one of fixed, adaptive"):
        get_method("temi")(3, {"neighbors": "mutual"})
    with pytest.raises(InputError, match="norm must be one of none, l2, standardize, batchnorm"):
        get_method("temi")(3, {"norm": "layernorm"})
    with pytest.raises(InputError, match="unknown option"):
        get_method("temi")(3, {"no_such_option": 3})  # ("head" became a real option: linear | mlp)
    with pytest.raises(InputError, match="'head' .* must be str"):
        get_method("temi")(3, {"head": 3})
    with pytest.raises(InputError, match="heads must be a positive integer"):
        get_method("temi")(3, {"heads": 0})
    with pytest.raises(InputError, match="larger than the number of images"):
        get_method("temi")(30, FAST).fit(x[:10], FitContext(progress=False))
    with pytest.raises(InputError, match="not fitted"):
        get_method("temi")(3).predict_proba(x[:2])


def test_cli_icce_heads_on_digits_end_to_end(tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, IMGCLUST_CACHE=str(tmp_path / "cache"), IMGCLUST_QUIET="1")
    opts = [f"--option={k}={json.dumps(v)}" for k, v in {**FAST, "epochs": 4}.items()]
    r = subprocess.run([sys.executable, "-m", "imgclust.cli", "cluster", "digits", "--k", "10", "--backbone", "pixels",
                        "--image-size", "8", "--method", "icce-heads", *opts, "--out", str(out)],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    run = json.loads((out / "run.json").read_text())
    hist = run["method_history"]
    assert run["config"]["method"] == "icce-heads" and run["metrics"]["acc"] > 0.3
    assert 0 <= hist["best_head"] < 8 and len(hist["loss"]) == 4
    assert hist["neighbors"]["mode"] == "adaptive" and hist["neighbors"]["cache"] == "written"
    assert list((tmp_path / "cache").rglob("neighbors-*.npz"))  # stored next to the feature cache
    r2 = subprocess.run([sys.executable, "-m", "imgclust.cli", "cluster", "digits", "--k", "10", "--backbone", "pixels",
                         "--image-size", "8", "--method", "icce-heads", *opts, "--out", str(tmp_path / "run2")],
                        capture_output=True, text=True, env=env, timeout=600)
    assert r2.returncode == 0, r2.stderr
    run2 = json.loads((tmp_path / "run2" / "run.json").read_text())
    assert run2["method_history"]["neighbors"]["cache"] == "hit"
    assert run2["cluster_sizes"] == run["cluster_sizes"]
