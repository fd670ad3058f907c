"""Untrusted files: model directories, checkpoints and configs are data. A pickle payload is
refused, wrong types or values end in one clear line, never a traceback or code execution."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from imgclust import ImageClusterer
from imgclust.config import load_config
from imgclust.errors import InputError
from imgclust.methods import get_method


def _cli(*args, cache):
    env = dict(os.environ, IMGCLUST_CACHE=str(cache), IMGCLUST_QUIET="1")
    return subprocess.run([sys.executable, "-m", "imgclust.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=600)


def _one_error_line(r, contains: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and contains in lines[0], r.stderr


@pytest.fixture(scope="module")
def images():
    return (load_digits().images[:200] * 255 / 16).astype(np.uint8)


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, images):
    base = tmp_path_factory.mktemp("saved")
    m = ImageClusterer(n_clusters=4, method="kmeans", backbone="pixels", image_size=8, pca=6, method_options={"n_init": 1},
                       cache_dir=str(base / "c"), progress=False)
    return m.fit(images).save(base / "model")


@pytest.fixture()
def model_dir(tmp_path, saved_model):
    """A fresh copy of a valid saved model, to tamper with."""
    shutil.copytree(saved_model, tmp_path / "model")
    return tmp_path / "model"


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _rewrite_json(d, edit):
    meta = json.loads((d / "model.json").read_text())
    edit(meta)
    (d / "model.json").write_text(json.dumps(meta))


def _fix_digest(d):
    """What an attacker would do: make model.json's digest match the crafted model.pt."""
    _rewrite_json(d, lambda m: m.update(model_pt_sha256=hashlib.sha256((d / "model.pt").read_bytes()).hexdigest()))


def test_cli_predict_refuses_a_pickle_payload_in_model_pt(model_dir, tmp_path, images):
    marker = tmp_path / "pwned"
    (model_dir / "model.pt").write_bytes(pickle.dumps({"method.centroids": _Payload(marker)}, protocol=2))
    _fix_digest(model_dir)
    (tmp_path / "imgs").mkdir()
    from PIL import Image

    Image.fromarray(images[0]).save(tmp_path / "imgs" / "a.png")
    r = _cli("predict", model_dir, tmp_path / "imgs", "--out", tmp_path / "p.csv", cache=tmp_path / "c")
    _one_error_line(r, "refusing to load")
    assert not marker.exists() and not (tmp_path / "p.csv").exists()


def test_cli_predict_with_a_bad_model_json_is_one_line(model_dir, tmp_path):
    _rewrite_json(model_dir, lambda m: m["params"].update(n_clusters="four"))
    r = _cli("predict", model_dir, "digits", cache=tmp_path / "c")
    _one_error_line(r, "parameter 'n_clusters'")


BAD_JSON = {
    "not json": (lambda d: (d / "model.json").write_text("{format: 1"), "not valid JSON"),
    "a list": (lambda d: (d / "model.json").write_text("[1, 2]"), "expected a JSON object"),
    "format": (lambda d: _rewrite_json(d, lambda m: m.update(format="1")), "unsupported model format"),
    "params type": (lambda d: _rewrite_json(d, lambda m: m.update(params=[1])), "'params' must be an object"),
    "unknown param": (lambda d: _rewrite_json(d, lambda m: m["params"].update(evil="x")), "unknown parameter(s) ['evil']"),
    "k as string": (lambda d: _rewrite_json(d, lambda m: m["params"].update(n_clusters="4")), "'n_clusters' must be int"),
    "k as bool": (lambda d: _rewrite_json(d, lambda m: m["params"].update(n_clusters=True)), "'n_clusters' must be int"),
    "k too small": (lambda d: _rewrite_json(d, lambda m: m["params"].update(n_clusters=1)), "at least 2"),
    "k mismatch": (lambda d: _rewrite_json(d, lambda m: m["params"].update(n_clusters=5)), "4 centroids, expected 5"),
    "pca as list": (lambda d: _rewrite_json(d, lambda m: m["params"].update(pca=[6])), "'pca' must be"),
    "method": (lambda d: _rewrite_json(d, lambda m: m["params"].update(method="os.system")), "unknown method"),
    "method options": (lambda d: _rewrite_json(d, lambda m: m.update(method_config={"n_init": "x"})), "'n_init'"),
    "method config type": (lambda d: _rewrite_json(d, lambda m: m.update(method_config=[1])), "'method_config'"),
    "n_features_in": (lambda d: _rewrite_json(d, lambda m: m.update(n_features_in=-3)), "'n_features_in'"),
    "n_features_in mismatch": (lambda d: _rewrite_json(d, lambda m: m.update(n_features_in=10)), "PCA tensors"),
    "weights type": (lambda d: _rewrite_json(d, lambda m: m.update(backbone={"weights": 5})), "'weights'"),
}


@pytest.mark.parametrize("case", list(BAD_JSON), ids=list(BAD_JSON))
def test_bad_model_json_is_refused_with_a_clear_message(model_dir, case):
    edit, message = BAD_JSON[case]
    edit(model_dir)
    with pytest.raises(InputError) as e:
        ImageClusterer.load(model_dir)
    assert message in str(e.value) and "\n" not in str(e.value)


def _state(d):
    return torch.load(d / "model.pt", weights_only=True)


BAD_STATE = {
    "not a dict": (lambda s: [s["method.centroids"]], "flat dict of named tensors"),
    "non-tensor value": (lambda s: {**s, "method.centroids": [1.0, 2.0]}, "flat dict of named tensors"),
    "no centroids": (lambda s: {k: v for k, v in s.items() if k != "method.centroids"}, "'centroids'"),
    "1-d centroids": (lambda s: {**s, "method.centroids": s["method.centroids"][0]}, "'centroids'"),
    "int centroids": (lambda s: {**s, "method.centroids": s["method.centroids"].long()}, "'centroids'"),
    "nan centroids": (lambda s: {**s, "method.centroids": s["method.centroids"] * float("nan")}, "non-finite"),
    "wrong dim": (lambda s: {**s, "method.centroids": torch.zeros(4, 3)}, "does not match"),
    "pca shape": (lambda s: {**s, "pca.mean": torch.zeros(5)}, "PCA tensors"),
}


@pytest.mark.parametrize("case", list(BAD_STATE), ids=list(BAD_STATE))
def test_model_pt_with_unexpected_content_is_refused(model_dir, case):
    edit, message = BAD_STATE[case]
    torch.save(edit(_state(model_dir)), model_dir / "model.pt")
    _fix_digest(model_dir)
    with pytest.raises(InputError) as e:
        ImageClusterer.load(model_dir)
    assert message in str(e.value), str(e.value)


def test_model_files_from_different_saves_are_detected(model_dir, tmp_path, images):
    """model.pt replaced (e.g. a save interrupted between its two files): the digest disagrees."""
    other = ImageClusterer(n_clusters=4, backbone="pixels", image_size=8, pca=6, seed=5, method_options={"n_init": 1},
                           cache_dir=str(tmp_path / "c"), progress=False).fit(images[::-1]).save(tmp_path / "other")
    (model_dir / "model.pt").write_bytes((other / "model.pt").read_bytes())
    with pytest.raises(InputError, match="model.pt does not match model.json"):
        ImageClusterer.load(model_dir)
    assert ImageClusterer.load(other).n_clusters == 4


BAD_TOML = {
    'k = "ten"': "config key 'k' must be int, got str 'ten'",
    "k = 2.5": "config key 'k' must be int",
    "seed = true": "config key 'seed' must be int, got bool",
    'method = 3': "config key 'method' must be str",
    'method_options = "n_init=3"': "config key 'method_options' must be dict",
    '[source]\npath = ["a", "b"]': "config key 'path' in [source] must be str",
    '[source]\nlimit = "all"': "config key 'limit' in [source] must be int or none",
    '[backbone]\nimage_size = "96px"': "config key 'image_size' in [backbone]",
    '[backbone]\noptions = 1': "config key 'options' in [backbone] must be dict",
    '[features]\nbatch_size = 6.4': "config key 'batch_size' in [features] must be int",
    '[features]\npca_whiten = "yes"': "config key 'pca_whiten' in [features] must be bool",
    "source = 5": "config section [source] must be a table",
    "k = ": "not valid TOML",
}


@pytest.mark.parametrize("text", list(BAD_TOML), ids=range(len(BAD_TOML)))
def test_toml_config_with_wrong_types_is_one_clear_error(tmp_path, text):
    p = tmp_path / "run.toml"
    p.write_text(text + "\n")
    with pytest.raises(InputError) as e:
        load_config(p)
    assert BAD_TOML[text] in str(e.value)


def test_cli_config_with_wrong_types_and_bad_options_are_one_line(tmp_path):
    p = tmp_path / "run.toml"
    p.write_text('k = 3\n[features]\nbatch_size = "big"\n')
    _one_error_line(_cli("cluster", "digits", "--config", p, cache=tmp_path), "'batch_size' in [features] must be int")
    _one_error_line(_cli("cluster", "digits", "--k", 3, "--backbone", "pixels", "--option", "n_init=many", "--out",
                         tmp_path / "r", cache=tmp_path), "'n_init' in [method_options] must be int")


def test_method_options_are_checked_for_type_and_range():
    km = get_method("kmeans")
    with pytest.raises(InputError, match="'n_init' in \\[method_options\\] must be int"):
        km(3, {"n_init": "3"})
    with pytest.raises(InputError, match="n_init must be a positive integer"):
        km(3, {"n_init": 0})
    with pytest.raises(InputError, match="temperature must be > 0"):
        km(3, {"temperature": -1.0})
    assert km(3, {"temperature": 1}).config.temperature == 1  # an int is a fine float


def test_os_error_writing_outputs_is_one_line_not_a_traceback(tmp_path, monkeypatch, capsys):
    """An output path that cannot be created (here: below a regular file) - exit 1, one line."""
    import signal

    from imgclust import cli

    (tmp_path / "file.txt").write_text("x")
    monkeypatch.setattr(sys, "argv", ["imgclust", "cluster", "digits", "--k", "3", "--backbone", "pixels",
                                      "--image-size", "8", "--limit", "100", "--option", "n_init=1", "-q",
                                      "--cache-dir", str(tmp_path / "c"), "--out", str(tmp_path / "file.txt" / "run")])
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with pytest.raises(SystemExit) as e:
            cli.main()
    finally:
        for s, h in saved.items():
            signal.signal(s, h)
    assert e.value.code == 1
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("error: Not a directory: "), err
