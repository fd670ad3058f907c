"""The declared method protocol, the typed fit context, the refiner registry and the moved run jobs (issue 17)."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import numpy as np
import pytest
import torch

from imgclust import api
from imgclust.api import ImageClusterer
from imgclust.errors import InputError
from imgclust.methods import ClusteringMethod, FitContext, MethodConfig, get_method, register_method

API_FILE = Path(api.__file__)


class _Pixels(ClusteringMethod):
    """A fake image-level method: clusters by the mean brightness of the images it reads from ctx."""

    name = "_test-image-level"
    Config = MethodConfig
    seen: dict = {}

    @property
    def image_level(self) -> bool:
        return True

    def fit(self, features, ctx: FitContext):
        _Pixels.seen = {"source": ctx.source, "rows": ctx.rows, "batch_size": ctx.batch_size, "backbone": ctx.backbone}
        imgs = np.stack([ctx.source.read(int(i)).mean() for i in ctx.rows]).astype(np.float32)
        self.cut_ = float(np.median(imgs))
        p = (imgs > self.cut_).astype(np.float32)
        self.fit_proba_ = np.stack([1 - p, p], axis=1)
        self.labels_ = self.fit_proba_.argmax(1)
        return self

    def predict_proba(self, features):
        return np.full((len(features), self.n_clusters), 1.0 / self.n_clusters, np.float32)

    def predict_proba_images(self, source, backbone, batch_size=64, device="auto", workers=None, progress=True):
        imgs = np.stack([source.read(i).mean() for i in range(len(source))])
        p = (imgs > self.cut_).astype(np.float32)
        return np.stack([1 - p, p], axis=1)

    def state_dict(self):
        return {"cut": torch.tensor([self.cut_])}

    def load_state_dict(self, state):
        self.cut_ = float(state["cut"][0])


register_method(_Pixels)


def test_api_calls_only_the_protocol_no_getattr_probing_of_methods():
    tree = ast.parse(API_FILE.read_text(encoding="utf-8"))
    probes = [ast.unparse(n) for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "getattr"
              and "model" in ast.unparse(n.args[0])]
    assert probes == []
    assert "fit_proba_" not in API_FILE.read_text(encoding="utf-8")  # it calls model.fit_proba(x)


def test_image_level_method_gets_typed_context_and_predicts_images(tmp_path):
    from imgclust.data import digits

    src = digits()
    imgs = src.images[:200]
    est = ImageClusterer(n_clusters=2, method=_Pixels.name, backbone="pixels", image_size=8, progress=False,
                         cache_dir=str(tmp_path),
                         batch_size=17)
    est.fit(imgs)
    assert _Pixels.seen["batch_size"] == 17 and _Pixels.seen["backbone"] is not None
    np.testing.assert_array_equal(_Pixels.seen["rows"], np.arange(200))
    bright = np.array([src.read(i).mean() for i in range(200)])
    np.testing.assert_array_equal(est.labels_, (bright > np.median(bright)).astype(int))  # fit_proba, not predict_proba
    np.testing.assert_array_equal(est.predict(imgs), est.labels_)  # predict_proba_images on images
    with pytest.raises(InputError, match="needs images"):
        est.predict(np.zeros((3, 192), np.float32))


def test_default_protocol_of_a_feature_method():
    km = get_method("kmeans")(3, {"n_init": 1})
    assert km.inputs == "features" and km.image_level is False
    x = np.random.default_rng(0).normal(size=(60, 4)).astype(np.float32)
    km.fit(x, FitContext(progress=False))
    np.testing.assert_allclose(km.fit_proba(x), km.predict_proba(x))
    with pytest.raises(InputError, match="not images"):
        km.predict_proba_images(None, None)


def test_declared_inputs_follow_the_options():
    assert get_method("icbpl")(3, {"finetune": "last_blocks"}).inputs == "images"
    assert get_method("icbpl")(3, {}).inputs == "features"
    assert get_method("pici")(3, {}).inputs == "images"
    assert get_method("spice")(3, {"semi_mode": "end_to_end"}).inputs == "images"


def test_fit_context_is_typed_and_the_old_extras_dict_maps_onto_it():
    names = {p for p in inspect.signature(FitContext).parameters}
    assert {"source", "backbone", "rows", "cache_dir", "batch_size", "precision", "workers", "base_proba", "truth",
            "labels", "certain"} <= names
    with pytest.warns(DeprecationWarning):
        ctx = FitContext(extras={"rows": np.arange(3), "truth": np.zeros(3)})
    np.testing.assert_array_equal(ctx.rows, np.arange(3))
    with pytest.raises(TypeError, match="unknown extras"):
        FitContext(extras={"sauce": 1})


def test_refiner_registry_and_the_cli_uses_it():
    import subprocess
    import sys

    from imgclust.refine.base import available_refiners, get_refiner

    info = get_refiner("icsr")
    assert info.method == "icsr" and info.diagnostics == "icsr.json" and "icsr" in available_refiners()
    assert get_method(info.method) is not None
    with pytest.raises(InputError, match="unknown refiner 'nope'; available: icsr"):
        get_refiner("nope")
    r = subprocess.run([sys.executable, "-m", "imgclust.cli", "refine", "somewhere", "--method", "nope"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "unknown refiner 'nope'; available: icsr" in r.stderr


def test_moved_run_jobs_still_import_from_api_for_one_release():
    import imgclust
    from imgclust import run

    assert api.cluster is run.cluster and imgclust.cluster is run.cluster
    from imgclust.api import refine_estimator  # noqa: F401 - the old import path keeps working

    with pytest.raises(AttributeError):
        api.no_such_name  # noqa: B018


def test_refine_feeds_the_method_its_full_input_pca_and_manifold(tmp_path):
    """A model fitted with --reduce: refine gives the method the reduced features (main crashed in a matmul)."""
    from sklearn.datasets import load_digits

    from imgclust.run import refine_estimator

    x, y = load_digits(return_X_y=True)
    x = (x[:400] / 16.0).astype(np.float32)
    est = ImageClusterer(n_clusters=10, method="kmeans", reduce="spectral:8", progress=False,
                         cache_dir=str(tmp_path)).fit(x)
    new = refine_estimator(est, x, {"epochs": 3}, truth=y[:400])
    assert new.method == "icsr" and new.labels_.shape == (400,)
    np.testing.assert_array_equal(new.base_labels_, est.predict(x))  # the base model as it predicts
    np.testing.assert_array_equal(new.predict(x[:50]), new.labels_[:50])
