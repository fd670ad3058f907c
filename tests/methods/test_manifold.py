"""Manifold stage (UMAP / spectral, cached), umap-kmeans / spectral-kmeans, auto, and --reduce in the API."""

import numpy as np
import pytest

from imgclust import ImageClusterer
from imgclust.errors import InputError
from imgclust.methods import FitContext, get_method
from imgclust.metrics import cluster_acc
from imgclust.reduce import ReduceSpec, extend, reduce_features


def test_spectral_reduce_is_cached_keyed_and_beats_kmeans_on_digits(digits_xy, tmp_path):
    x, y = digits_xy
    z, info = reduce_features(x, "spectral:10", seed=0, cache_dir=tmp_path, progress=False)
    assert z.shape == (len(x), 10) and info["cache"] == "written"
    z2, info2 = reduce_features(x, "spectral:10", seed=0, cache_dir=tmp_path, progress=False)
    assert info2["cache"] == "hit" and np.array_equal(z, z2)
    reduce_features(x, "spectral:8", seed=0, cache_dir=tmp_path, progress=False)  # other params, other entry
    reduce_features(x * 2 + 1, "spectral:10", seed=0, cache_dir=tmp_path, progress=False)  # other features
    assert len(list(tmp_path.glob("reduced-*.npy"))) == 3
    m = get_method("spectral-kmeans")(10, {"self_train": False}).fit(x, FitContext(seed=0, progress=False,
                                                                                  work_dir=tmp_path))
    km = get_method("kmeans")(10).fit(x, FitContext(seed=0, progress=False))
    assert cluster_acc(y, m.labels_) > cluster_acc(y, km.labels_) + 0.05  # 0.89 vs 0.79
    # new points land next to their nearest fitted neighbours
    near = extend(x, z, x[:50] + 0.01)
    assert np.abs(near - z[:50]).max() < 0.5


def test_reduce_spec_parsing():
    assert str(ReduceSpec.parse("umap:10")) == "umap:10" and ReduceSpec.parse(None).kind == "none"
    assert ReduceSpec.parse("spectral").dim == 10
    for bad in ("pca:3", "umap:x", "umap:0"):
        with pytest.raises(InputError):
            ReduceSpec.parse(bad)


def test_umap_kmeans_is_the_n2d_baseline_and_self_training_predicts(digits_xy, tmp_path):
    x, y = digits_xy
    x, y = x[:600], y[:600]
    ctx = FitContext(seed=0, progress=False, work_dir=tmp_path)
    base = get_method("umap-kmeans")(10, {"self_train": False}).fit(x, ctx)
    assert cluster_acc(y, base.labels_) > 0.8
    st = get_method("umap-kmeans")(10).fit(x, ctx)  # the embedding is read back from the cache
    assert all(i["cache"] == "hit" for i in st.history_["reduce"])
    assert np.array_equal(st.cluster_labels_, base.labels_)
    assert cluster_acc(y, st.labels_) > 0.8 and st.history_["self_training"]["agreement_with_clustering"] > 0.85
    again = get_method("umap-kmeans")(10)
    again.load_state_dict(st.state_dict())
    np.testing.assert_array_equal(again.predict(x), st.labels_)


def test_auto_records_every_candidate_and_keeps_the_chosen_model(digits_xy, tmp_path):
    x, y = digits_xy
    cands = ["kmeans", "spectral-kmeans?graph_k=10", "spectral-kmeans"]
    m = get_method("auto")(10, {"candidates": cands}).fit(x, FitContext(seed=0, progress=False, work_dir=tmp_path))
    sel = m.history_["selection"]
    assert [c["name"] for c in sel["candidates"]] == cands
    best = max(sel["candidates"], key=lambda c: c["generalization"])
    assert sel["chosen"] == best["name"] != "kmeans"
    again = get_method("auto")(10, {"candidates": cands})
    again.load_state_dict(m.state_dict())
    np.testing.assert_array_equal(again.predict(x), m.predict(x))
    with pytest.raises(InputError):
        get_method("auto")(10, {"candidates": ["nope"]})
    with pytest.raises(InputError):
        get_method("auto")(10, {"candidates": ["kmeans?n_init=0"]})


def test_api_reduce_stage_round_trips(tmp_path, digits_xy):
    x, y = digits_xy
    est = ImageClusterer(n_clusters=10, method="kmeans", reduce="spectral:10", progress=False).fit(x)
    assert cluster_acc(y, est.labels_) > 0.85
    est.save(tmp_path / "m")
    loaded = ImageClusterer.load(tmp_path / "m")
    assert (loaded.predict(x[:300]) == est.labels_[:300]).mean() > 0.95
    with pytest.raises(InputError, match="--reduce"):
        ImageClusterer(n_clusters=10, reduce="tsne:2", progress=False).fit(x)


def test_cli_default_method_is_auto_and_records_the_choice(tmp_path):
    import json
    import os
    import subprocess
    import sys

    env = dict(os.environ, IMGCLUST_CACHE=str(tmp_path / "cache"), IMGCLUST_QUIET="1", IMGCLUST_REPORT_MAP="pca")
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "imgclust.cli", "cluster", "digits", "--k", "10", "--backbone", "pixels",
                        "--image-size", "8", "--out", str(out), "-q"], capture_output=True, text=True, env=env,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["method"] == "auto"
    sel = run["method_history"]["selection"]
    assert [c["name"] for c in sel["candidates"]] == ["kmeans", "spectral-kmeans"]
    assert all("generalization" in c and "acc" in c for c in sel["candidates"])  # labels known: ACC per candidate
    chosen = next(c for c in sel["candidates"] if c["name"] == sel["chosen"])
    assert run["metrics"]["acc"] == pytest.approx(chosen["acc"], abs=0.02)
    kmeans_acc = sel["candidates"][0]["acc"]
    assert run["metrics"]["acc"] >= kmeans_acc - 0.01  # the default is never more than 1 point below k-means here
    assert "Choice of method" in (out / "report.html").read_text()


def test_auto_picks_its_candidates_by_data_size_and_pca_feeds_the_embedding(digits_xy, tmp_path):
    from imgclust.methods.auto import DEFAULT_CANDIDATES, LARGE_CANDIDATES

    cfg = get_method("auto")(10).config
    assert cfg.for_size(cfg.large_from - 1) == DEFAULT_CANDIDATES
    assert cfg.for_size(cfg.large_from) == LARGE_CANDIDATES
    assert cfg.pool()[:len(DEFAULT_CANDIDATES)] == DEFAULT_CANDIDATES  # saved small-data models keep their index
    # session 4 made full-width UMAP the large candidate; models saved with the former one keep index 2
    assert cfg.pool()[2] == "umap-kmeans?runs=3&pca=64" and set(LARGE_CANDIDATES) <= set(cfg.pool())
    assert cfg.pool()[3] == "umap-kmeans?runs=3"  # session 6 changed the embedding's input; index 3 keeps session 4's
    assert get_method("auto")(10, {"candidates": ["kmeans"]}).config.for_size(10**6) == ["kmeans"]
    assert (cfg.criterion_for_size(10), cfg.criterion_for_size(cfg.large_from)) == ("generalization", "balanced")
    assert get_method("auto")(10, {"criterion": "knn"}).config.criterion_for_size(10**6) == "knn"
    x, y = digits_xy
    # small data fits the small set (the large set's UMAP candidate is too slow for a unit test; the rule is above)
    m = get_method("auto")(10).fit(x, FitContext(seed=0, progress=False, work_dir=tmp_path))
    assert [c["name"] for c in m.history_["selection"]["candidates"]] == DEFAULT_CANDIDATES
    assert m.history_["selection"]["criterion"] == "generalization"
    assert all("balanced" in c for c in m.history_["selection"]["candidates"])
    ctx = FitContext(seed=0, progress=False, work_dir=tmp_path)
    p = get_method("spectral-kmeans")(10, {"pca": 16, "self_train": False}).fit(x, ctx)
    assert p.history_["pca"] == 16 and p.history_["reduce"][0]["cache"] == "written"
    assert cluster_acc(y, p.labels_) > 0.8
    p2 = get_method("spectral-kmeans")(10, {"pca": 16, "self_train": False}).fit(x, ctx)  # PCA is deterministic
    assert p2.history_["reduce"][0]["cache"] == "hit" and np.array_equal(p2.labels_, p.labels_)
    with pytest.raises(InputError):
        get_method("spectral-kmeans")(10, {"pca": -1})


def test_auto_large_set_runs_end_to_end_and_reloads(digits_xy, tmp_path):
    x, y = digits_xy
    x, y = x[:600], y[:600]
    m = get_method("auto")(10, {"large_from": 500}).fit(x, FitContext(seed=0, progress=False, work_dir=tmp_path))
    sel = m.history_["selection"]
    assert sel["criterion"] == "balanced"
    assert [c["name"] for c in sel["candidates"]] == ["kmeans", "umap-kmeans?runs=3&power=0.5&centre=true"]
    best = max(sel["candidates"], key=lambda c: c["balanced"])
    assert sel["chosen"] == best["name"]
    assert cluster_acc(y, m.labels_) > 0.75
    again = get_method("auto")(10, {"large_from": 500})
    again.load_state_dict(m.state_dict())
    np.testing.assert_array_equal(again.predict(x), m.predict(x))


def test_auto_model_saved_with_the_former_large_candidate_still_loads_it(digits_xy, tmp_path):
    """Session 4 replaced the large candidate (pca=64 -> full width); a model saved before names
    the former one by its pool index (2) and must come back as that candidate, predicting the same."""
    import torch

    x, _ = digits_xy
    # a self-trained manifold model (spectral embedding: seconds) stands in for the saved UMAP-64 one
    old = get_method("umap-kmeans")(10, {"reduce": "spectral:10"}).fit(x, FitContext(seed=0, progress=False,
                                                                                      work_dir=tmp_path))
    state = {f"chosen.{k}": v for k, v in old.state_dict().items()}
    state["chosen_index"] = torch.tensor(2)
    m = get_method("auto")(10)
    m.load_state_dict(state)
    assert m.chosen_.name == "umap-kmeans" and (m.chosen_.config.pca, m.chosen_.config.runs) == (64, 3)
    np.testing.assert_array_equal(m.predict(x), old.predict(x))


def test_embedding_input_is_the_signed_root_minus_its_mean_and_only_the_embedding_sees_it(digits_xy, tmp_path):
    from imgclust.methods.manifold import embedding_input

    x, y = digits_xy
    assert embedding_input(x) is x  # the default leaves the features alone (same reduce-cache entries as before)
    z = embedding_input(x - 8.0, power=0.5, centre=True)  # negative entries keep their sign
    ref = np.sign(x - 8.0) * np.sqrt(np.abs(x - 8.0))
    np.testing.assert_allclose(z, ref - ref.mean(0, dtype=np.float64), atol=1e-4)
    assert np.abs(z.mean(0)).max() < 1e-4 and z.dtype == np.float32
    ctx = FitContext(seed=0, progress=False, work_dir=tmp_path)
    m = get_method("spectral-kmeans")(10, {"power": 0.5, "centre": True}).fit(x, ctx)
    plain = get_method("spectral-kmeans")(10).fit(x, ctx)
    assert m.history_["embedding_input"] == {"power": 0.5, "centre": True} and "embedding_input" not in plain.history_
    assert len(list(tmp_path.glob("reduced-*.npy"))) == 2  # its own embedding, cached apart from the plain one
    assert not np.array_equal(m.cluster_labels_, plain.cluster_labels_)
    assert cluster_acc(y, m.labels_) > 0.8
    # the self-trained classifier reads the features as they are: a saved model predicts raw features
    again = get_method("spectral-kmeans")(10, {"power": 0.5, "centre": True})
    again.load_state_dict(m.state_dict())
    np.testing.assert_array_equal(again.predict(x), m.labels_)
    with pytest.raises(InputError):
        get_method("umap-kmeans")(10, {"power": 0})
